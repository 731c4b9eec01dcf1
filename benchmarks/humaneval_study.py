"""The HumanEval study of a scored run (``prompts.scorer: humaneval``), as JSON.

    python benchmarks/humaneval_study.py RUN_DIR [--out FILE.json]

Per decoder label: pass@1 with a 95% Wilson interval, mean output perplexity
(95% bootstrap), tokens/s, J/token (the sweeps' measured energy windows over
their tokens), and tokens per target call. Then:

- greedy check: greedy ``specdecode`` (temperature 0) must pass exactly the
  problems greedy ``sampling`` passes, since it commits the same tokens; the
  JSON lists the problems where the verdicts, or the tokens, differ;
- paired comparisons of every other sampled (T > 0) decoder with sampled
  ``sampling``, matched on (problem, repeat): the pass@1 difference with a
  paired bootstrap interval, McNemar's exact test on the discordant pairs
  (``scipy.stats.binomtest``, two-sided), and the perplexity ratio of means with
  a paired bootstrap interval.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from harness import trace
from harness.stats import Estimate, bootstrap, mean_ci, pass_rate, ratio_of_sums_ci

KEYS = ["prompt_id", "repeat"]


def _est(e: Estimate) -> dict[str, float]:
    return {"value": e.value, "ci95": [e.low, e.high]}


def _temperature(g: pd.DataFrame) -> float:
    return float(json.loads(g.params_json.iloc[0]).get("temperature", 1.0))


def _find(gens: pd.DataFrame, decoder: str, greedy: bool) -> str | None:
    """The first label of ``decoder`` run greedily (temperature 0) or sampled (T > 0)."""
    for label, g in gens.groupby("decoder_label", sort=False):
        if g.decoder.iloc[0] == decoder and (_temperature(g) == 0.0) == greedy:
            return str(label)
    return None


def mcnemar(base: pd.Series, other: pd.Series) -> dict[str, Any]:
    """McNemar's exact test on paired pass/fail verdicts (aligned boolean Series)."""
    only_base = int((base & ~other).sum())
    only_other = int((~base & other).sum())
    n = only_base + only_other
    p = float(binomtest(only_other, n, 0.5).pvalue) if n else 1.0
    return {"only_baseline_passes": only_base, "only_this_passes": only_other, "exact_p": p}


def per_decoder(gens: pd.DataFrame, info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    windows: dict[str, list[float]] = {}
    for w in info.get("energy_windows", []):
        j, n = windows.get(w["decoder_label"], [0.0, 0])
        windows[w["decoder_label"]] = [j + w["total_energy_j"], n + w["new_tokens"]]
    out = {}
    for label, g in gens.groupby("decoder_label", sort=False):
        energy = windows.get(label)
        out[str(label)] = {
            "decoder": g.decoder.iloc[0],
            "params": json.loads(g.params_json.iloc[0]),
            "generations": len(g),
            "scored": int(g.passed.notna().sum()),
            "pass_at_1": _est(pass_rate(g.passed)),
            "output_ppl": _est(mean_ci(g.output_ppl.to_numpy())),
            "tokens_per_s": _est(ratio_of_sums_ci(g.new_tokens.to_numpy(), g.time_s.to_numpy())),
            "j_per_token_measured": energy[0] / energy[1] if energy and energy[1] else None,
            "tokens_per_target_call": _est(ratio_of_sums_ci(g.new_tokens.to_numpy(),
                                                            g.target_forwards.to_numpy())),
            "mean_new_tokens": float(g.new_tokens.mean()),
            "stopped_at_eos": float(g.stopped_at_eos.mean()),
        }
    return out


def greedy_check(gens: pd.DataFrame) -> dict[str, Any] | None:
    a, b = _find(gens, "sampling", greedy=True), _find(gens, "specdecode", greedy=True)
    if a is None or b is None:
        return None
    m = gens[gens.decoder_label == a].merge(gens[gens.decoder_label == b], on=KEYS, suffixes=("_s", "_d"))
    verdicts = m[m.passed_s != m.passed_d].prompt_id.tolist()
    tokens = m[[list(x) != list(y) for x, y in zip(m.output_tokens_s, m.output_tokens_d, strict=True)]]
    return {"sampling": a, "specdecode": b, "paired": len(m), "same_passes": not verdicts,
            "problems_with_other_verdicts": verdicts, "problems_with_other_tokens": tokens.prompt_id.tolist()}


def paired_comparisons(gens: pd.DataFrame) -> dict[str, dict[str, Any]]:
    base_label = _find(gens, "sampling", greedy=False)
    if base_label is None:
        return {}
    base = gens[gens.decoder_label == base_label]
    out = {}
    for label, g in gens.groupby("decoder_label", sort=False):
        if label == base_label or g.decoder.iloc[0] == "sampling" or _temperature(g) == 0.0:
            continue
        m = g.merge(base, on=KEYS, suffixes=("", "_base")).dropna(subset=["passed", "passed_base"])
        if m.empty:
            continue
        this, ref = m.passed.astype(bool), m.passed_base.astype(bool)
        cols = {"a": this.to_numpy(dtype=float), "b": ref.to_numpy(dtype=float),
                "pa": m.output_ppl.to_numpy(), "pb": m.output_ppl_base.to_numpy()}
        diff = bootstrap(cols, lambda c: float(c["a"].mean() - c["b"].mean()))
        ratio = bootstrap(cols, lambda c: float(c["pa"].mean() / c["pb"].mean()))
        out[str(label)] = {"baseline": base_label, "paired": len(m), "pass_at_1_difference": _est(diff),
                           "mcnemar": mcnemar(ref, this), "ppl_ratio_to_baseline": _est(ratio)}
    return out


def study(run_dir: str | Path) -> dict[str, Any]:
    gens = trace.read_table(run_dir)
    info = trace.read_run_json(run_dir)
    if gens.empty or gens.passed.isna().all():
        raise SystemExit(f"{run_dir}: no scored generations (run the profile with prompts.scorer: humaneval)")
    return {
        "run": str(run_dir),
        "profile": info.get("profile", {}).get("name"),
        "target": info.get("profile", {}).get("models", {}).get("target"),
        "draft": info.get("profile", {}).get("models", {}).get("draft"),
        "device": info.get("model_info", {}).get("device"),
        "gpus": [g.get("name") for g in info.get("environment", {}).get("gpus") or []],
        "energy": info.get("energy"),
        "scoring": info.get("scoring"),
        "problems": int(gens.prompt_id.nunique()),
        "decoders": per_decoder(gens, info),
        "greedy_check": greedy_check(gens),
        "against_sampling": paired_comparisons(gens),
    }


def _fmt(e: dict[str, Any], spec: str) -> str:
    v, (lo, hi) = e["value"], e["ci95"]
    return "-" if not np.isfinite(v) else f"{v:{spec}} [{lo:{spec}}, {hi:{spec}}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--out")
    args = ap.parse_args()
    result = study(args.run_dir)
    print(f"{'decoder':<20}{'n':>5}  {'pass@1 [95% CI]':<24}{'ppl [95% CI]':<26}"
          f"{'tok/s':>8}{'J/tok':>8}{'tok/call':>9}")
    for label, d in result["decoders"].items():
        jpt = f"{d['j_per_token_measured']:.3f}" if d["j_per_token_measured"] else "-"
        print(f"{label:<20}{d['generations']:>5}  {_fmt(d['pass_at_1'], '.3f'):<24}{_fmt(d['output_ppl'], '.3f'):<26}"
              f"{d['tokens_per_s']['value']:>8.1f}{jpt:>8}{d['tokens_per_target_call']['value']:>9.2f}")
    if result["greedy_check"]:
        g = result["greedy_check"]
        print(f"greedy check ({g['specdecode']} vs {g['sampling']}, {g['paired']} problems): same passes "
              f"{g['same_passes']}; other tokens on {len(g['problems_with_other_tokens'])}")
    for label, c in result["against_sampling"].items():
        print(f"{label} vs {c['baseline']}: pass@1 difference {_fmt(c['pass_at_1_difference'], '+.3f')}, "
              f"McNemar exact p = {c['mcnemar']['exact_p']:.3g} ({c['mcnemar']['only_this_passes']} vs "
              f"{c['mcnemar']['only_baseline_passes']} discordant), "
              f"ppl ratio {_fmt(c['ppl_ratio_to_baseline'], '.3f')}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
