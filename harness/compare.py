"""``harness compare``: a regression gate between a baseline run and a current run.

Speed and energy compare as ratios with paired bootstrap intervals: a slowdown is
flagged only when the whole interval lies beyond the allowed slowdown, so noise
alone does not cry wolf. Deterministic figures (tokens at fixed seeds, acceptance
counts, output perplexity) compare exactly, or within a stated tolerance.

Only complete runs are compared: a run whose run.json status is not
"complete", or a current run missing decoder labels or generations the baseline
has, is bad input unless partial runs are allowed explicitly; the summary says
how much was compared either way.

Exit codes: 0 nothing regressed, 1 something did, 2 bad input.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harness.report import load_run
from harness.stats import ratio_of_ratios_ci
from harness.trace import CorruptRunError

KEYS = ["decoder_label", "prompt_id", "repeat"]
PPL_RTOL = 1e-4  # float32 perplexity from the same tokens: equal up to reduction order
CHECKS = ("all", "deterministic", "timing")


class CompareInputError(ValueError):
    """Runs that cannot be compared (missing, corrupt, empty, partial, or with nothing in common)."""


@dataclass
class Finding:
    label: str
    check: str
    status: str  # "ok", "regressed", "improved", "changed", "skipped"
    detail: str


@dataclass
class Comparison:
    baseline: str
    current: str
    max_slowdown: float
    findings: list[Finding] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    compared: int = 0  # generations matched in both runs
    baseline_generations: int = 0
    compared_labels: int = 0
    baseline_labels: int = 0
    partial: list[str] = field(default_factory=list)  # why a run is partial (only with allow_partial)

    @property
    def coverage(self) -> str:
        return (f"Compared {self.compared} of {self.baseline_generations} baseline generations "
                f"({self.compared_labels} of {self.baseline_labels} decoder labels).")

    @property
    def regressed(self) -> bool:
        return any(f.status in ("regressed", "changed") for f in self.findings)


def _load(path: str | Path, role: str):
    try:
        run = load_run(path)
    except (FileNotFoundError, CorruptRunError) as err:
        raise CompareInputError(f"{role} run: {err}") from None
    if run.gens.empty:
        raise CompareInputError(f"{role} run {path} holds no generations")
    return run


def compare_runs(baseline: str | Path, current: str | Path, max_slowdown: float = 0.05,
                 checks: str = "all", allow_partial: bool = False) -> Comparison:
    """Match generations by (decoder label, prompt, repeat) and check each decoder label.

    Raises:
        CompareInputError: a run is missing, corrupt, empty or not comparable, or
            partial (incomplete, or missing what the baseline has) without ``allow_partial``.
    """
    if checks not in CHECKS:
        raise CompareInputError(f"checks must be one of {', '.join(CHECKS)}, got {checks!r}")
    if not max_slowdown >= 0:
        raise CompareInputError(f"--max-slowdown must be >= 0, got {max_slowdown}")
    base, cur = _load(baseline, "baseline"), _load(current, "current")
    m = base.gens.merge(cur.gens, on=KEYS, suffixes=("_b", "_c"))
    if m.empty:
        raise CompareInputError(
            f"no generation of {current} matches {baseline} by decoder label, prompt and repeat "
            f"(baseline labels: {sorted(base.gens.decoder_label.unique())}, "
            f"current: {sorted(cur.gens.decoder_label.unique())})"
        )
    _check_comparable(base, cur, m)
    partial = _partial(base, cur, m, baseline, current)
    if partial and not allow_partial:
        raise CompareInputError("cannot vouch for a partial run: " + "; ".join(partial)
                                + "; or pass --allow-partial to compare only what both runs hold")
    result = Comparison(str(baseline), str(current), max_slowdown, compared=len(m),
                        baseline_generations=len(base.gens), compared_labels=m.decoder_label.nunique(),
                        baseline_labels=base.gens.decoder_label.nunique(), partial=partial)
    for side, run in (("baseline", base), ("current", cur)):
        keys = set(map(tuple, run.gens[KEYS].to_numpy().tolist()))
        missing = keys - set(map(tuple, m[KEYS].to_numpy().tolist()))
        if missing:
            result.unmatched.append(f"{len(missing)} generation(s) only in the {side} run")
    same_device = (m.device_b == m.device_c).all() and (m.dtype_b == m.dtype_c).all()
    for label, g in m.groupby("decoder_label", sort=False):
        if checks in ("all", "deterministic"):
            result.findings.extend(_deterministic(label, g, same_device))
        if checks in ("all", "timing"):
            result.findings.append(_ratio_check(label, "time per token", g.time_s_c, g.new_tokens_c,
                                                g.time_s_b, g.new_tokens_b, max_slowdown))
            if g.gpu_energy_j_b.notna().all() and g.gpu_energy_j_c.notna().all():
                result.findings.append(_ratio_check(label, "energy per token", g.gpu_energy_j_c, g.new_tokens_c,
                                                    g.gpu_energy_j_b, g.new_tokens_b, max_slowdown))
    return result


def _partial(base, cur, m: pd.DataFrame, baseline: str | Path, current: str | Path) -> list[str]:
    """Why the comparison would not cover both runs in full (empty when it would)."""
    problems = []
    for role, run, path in (("baseline", base, baseline), ("current", cur, current)):
        status = run.info.get("status")
        if status != "complete":
            problems.append(f"the {role} run {path} is incomplete (run.json status {status!r}); complete it with "
                            f"harness profile PROFILE -o {path} --resume (same profile and --set values)")
    missing = len(base.gens) - len(m)
    if missing:
        labels = sorted(set(base.gens.decoder_label) - set(cur.gens.decoder_label))
        which = f", all of decoder label(s) {', '.join(labels)}" if labels else ""
        problems.append(f"{missing} of {len(base.gens)} baseline generations are missing from the current run "
                        f"{current}{which}")
    return problems


def _check_comparable(base, cur, m: pd.DataFrame) -> None:
    """Refuse runs whose rows share keys but not the settings that produced them."""
    problems = []
    gb = base.info.get("profile", {}).get("generation", {})
    gc = cur.info.get("profile", {}).get("generation", {})
    for key in ("max_new_tokens", "seed"):
        if gb.get(key) != gc.get(key):
            problems.append(f"generation.{key} differs ({gb.get(key)} vs {gc.get(key)})")
    for label, g in m.groupby("decoder_label"):
        if (g.params_json_b != g.params_json_c).any() or (g.decoder_b != g.decoder_c).any():
            problems.append(f"decoder {label!r} has different parameters "
                            f"({g.params_json_b.iloc[0]} vs {g.params_json_c.iloc[0]})")
    if (m.target_model_b != m.target_model_c).any() or (m.draft_model_b.fillna("") != m.draft_model_c.fillna("")).any():
        problems.append("the runs used different models")
    if problems:
        raise CompareInputError("runs are not comparable: " + "; ".join(problems))


def _ratio_check(label, name, cur_num, cur_den, base_num, base_den, allowed) -> Finding:
    est = ratio_of_ratios_ci(np.asarray(cur_num, float), np.asarray(cur_den, float),
                             np.asarray(base_num, float), np.asarray(base_den, float), paired=True)
    text = f"current/baseline {est.value:.3f} [95% CI {est.low:.3f}, {est.high:.3f}], allowed up to {1 + allowed:.3f}"
    if np.isfinite(est.low) and est.low > 1 + allowed:
        return Finding(label, name, "regressed", text)
    if np.isfinite(est.high) and est.high < 1 - allowed:
        return Finding(label, name, "improved", text)
    return Finding(label, name, "ok", text)


def _deterministic(label: str, g: pd.DataFrame, same_device: bool) -> list[Finding]:
    out = []
    if not same_device:
        return [Finding(label, "tokens", "skipped", "runs used different devices or dtypes; tokens may differ")]
    diff_tokens = int(sum(list(a) != list(b) for a, b in zip(g.output_tokens_b, g.output_tokens_c, strict=True)))
    out.append(Finding(label, "tokens at fixed seeds", "changed" if diff_tokens else "ok",
                       f"{diff_tokens} of {len(g)} generations produced different tokens"))
    counts = ["iterations", "drafted_tokens", "accepted_tokens"]
    diff_counts = int(sum((g[f"{c}_b"] != g[f"{c}_c"]).sum() for c in counts))
    out.append(Finding(label, "acceptance counts", "changed" if diff_counts else "ok",
                       f"{diff_counts} differing values of {', '.join(counts)} over {len(g)} generations"))
    close = np.isclose(g.output_ppl_c, g.output_ppl_b, rtol=PPL_RTOL, atol=0)
    out.append(Finding(label, "output perplexity", "ok" if close.all() else "changed",
                       f"{int((~close).sum())} of {len(g)} differ by more than rtol {PPL_RTOL:g}"))
    return out


_ICON = {"ok": "✅", "regressed": "❌", "changed": "❌", "improved": "🚀", "skipped": "⏭️"}


def to_markdown(c: Comparison) -> str:
    verdict = "**Regression found.**" if c.regressed else "**No regression.**"
    lines = [f"### Decoding benchmark comparison: {verdict}", "",
             f"Baseline `{c.baseline}` vs current `{c.current}`; a slowdown is flagged when its whole 95% "
             f"interval exceeds {c.max_slowdown:.0%}.", "",
             c.coverage + "".join(f" Partial run allowed: {p}." for p in c.partial), "",
             "| decoder | check | status | detail |", "|---|---|---|---|"]
    lines += [f"| {f.label} | {f.check} | {_ICON[f.status]} {f.status} | {f.detail} |" for f in c.findings]
    if c.unmatched:
        lines += ["", "Not compared: " + "; ".join(c.unmatched) + "."]
    return "\n".join(lines) + "\n"


def to_html(c: Comparison) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(f.label)}</td><td>{html.escape(f.check)}</td><td>{_ICON[f.status]} {f.status}</td>"
        f"<td>{html.escape(f.detail)}</td></tr>" for f in c.findings)
    verdict = "Regression found" if c.regressed else "No regression"
    partial = "".join(f"<p>Partial run allowed: {html.escape(p)}.</p>" for p in c.partial)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{verdict}</title></head><body>"
            f"<h1>{verdict}</h1><p>Baseline <code>{html.escape(c.baseline)}</code> vs current "
            f"<code>{html.escape(c.current)}</code>; allowed slowdown {c.max_slowdown:.0%}.</p>"
            f"<p>{html.escape(c.coverage)}</p>{partial}"
            f"<table border='1' cellpadding='4'><tr><th>decoder</th><th>check</th><th>status</th><th>detail</th></tr>"
            f"{rows}</table><p>{html.escape('; '.join(c.unmatched))}</p></body></html>")
