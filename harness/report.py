"""``harness report``: one self-contained HTML file from one or more run directories."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd

from harness import figures, trace
from harness.outputs import check_output_file, write_output_file
from harness.stats import NAN, Estimate, mean_ci, pass_rate, ratio_of_ratios_ci, ratio_of_sums_ci

BASELINE = "sampling"


@dataclass
class RunData:
    name: str
    path: Path
    info: dict[str, Any]
    gens: pd.DataFrame
    steps: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def load_run(path: str | Path, name: str | None = None) -> RunData:
    """Read a run directory.

    Raises:
        FileNotFoundError: ``path`` is not a run directory.
        trace.CorruptRunError: a file of the run is damaged (named in the message).
    """
    path = Path(path)
    info = trace.read_run_json(path)
    gens = trace.read_table(path, trace.GENERATIONS)
    steps = trace.read_table(path, trace.STEPS)
    return RunData(name or path.name, path, info, gens, steps)


def _windows_by_label(info: dict[str, Any]) -> dict[str, tuple[float, int, float]]:
    """Per label: measured joules, new tokens and window seconds of its sweeps."""
    out: dict[str, tuple[float, int, float]] = {}
    for w in info.get("energy_windows", []):
        j, n, t = out.get(w["decoder_label"], (0.0, 0, 0.0))
        out[w["decoder_label"]] = (j + w["total_energy_j"], n + w["new_tokens"], t + w["time_s"])
    return out


def _paired(a: pd.DataFrame, b: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Rows of ``a`` and ``b`` matched on (prompt, repeat), or None if they don't match one to one."""
    keys = ["prompt_id", "repeat"]
    m = a.merge(b, on=keys, suffixes=("_a", "_b"))
    if len(m) != len(a) or len(m) != len(b):
        return None
    return m


def _filters(params_json: str) -> tuple:
    params = json.loads(params_json)
    return tuple(params.get(k) for k in ("temperature", "top_k", "top_p"))


def _baselines(gens: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The baseline's settings in the run, by label, in run order."""
    base = gens[gens.decoder == BASELINE]
    return {label: g for label, g in base.groupby("decoder_label", sort=False)}


def _baseline_for(g: pd.DataFrame, baselines: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The baseline setting a decoder setting is compared with: the one with the same filters
    (temperature, top-k, top-p: greedy against greedy), else the first; empty if there is none."""
    if not baselines:
        return g.iloc[:0]
    want = _filters(g.params_json.iloc[0])
    same = [b for b in baselines.values() if _filters(b.params_json.iloc[0]) == want]
    return same[0] if same else next(iter(baselines.values()))


def summarise(run: RunData, label_by_run: bool = False) -> pd.DataFrame:
    """One row per decoder label: headline figures with 95% bootstrap CIs."""
    gens = run.gens
    rows = []
    windows = _windows_by_label(run.info)
    idle_w = run.info.get("idle_power_w")
    baselines = _baselines(gens)
    if len(baselines) > 1:
        run.notes.append(f"several {BASELINE} settings: each decoder is compared with the {BASELINE} setting of "
                         f"its own temperature, top-k and top-p (else the first one)")
    for label, g in gens.groupby("decoder_label", sort=False):
        base = _baseline_for(g, baselines)
        tps = ratio_of_sums_ci(g.new_tokens.to_numpy(), g.time_s.to_numpy())
        speedup = energy_ratio = NAN
        if len(base):
            pair = _paired(g, base)
            if pair is not None:
                speedup = ratio_of_ratios_ci(pair.new_tokens_a, pair.time_s_a, pair.new_tokens_b, pair.time_s_b,
                                             paired=True)
            else:
                speedup = ratio_of_ratios_ci(g.new_tokens, g.time_s, base.new_tokens, base.time_s)
        has_energy = g.gpu_energy_j.notna().all() and len(g) > 0
        jpt = ratio_of_sums_ci(g.gpu_energy_j.to_numpy(), g.new_tokens.to_numpy()) if has_energy else NAN
        if has_energy and len(base) and base.gpu_energy_j.notna().all():
            energy_ratio = ratio_of_ratios_ci(g.gpu_energy_j, g.new_tokens, base.gpu_energy_j, base.new_tokens)
        measured = windows.get(label)
        row: dict[str, Any] = {
            "run": run.name,
            "label": label,
            "series": f"{run.name} / {label}" if label_by_run else label,
            "decoder": g.decoder.iloc[0],
            "params": json.loads(g.params_json.iloc[0]),
            "generations": len(g),
            "new_tokens": int(g.new_tokens.sum()),
            "energy_estimated": bool(g.energy_estimated.fillna(False).any()),
            "measured_j_per_token": measured[0] / measured[1] if measured and measured[1] else float("nan"),
            # What decoding added to the card's idle draw (idle power measured before the run).
            "measured_j_per_token_above_idle": ((measured[0] - idle_w * measured[2]) / measured[1]
                                                if measured and measured[1] and idle_w else float("nan")),
        }
        for key, est in {
            "tokens_per_s": tps,
            "speedup": speedup,
            "ttft_ms": mean_ci(1e3 * g.ttft_s.to_numpy()),
            "tpot_ms": mean_ci(1e3 * g.tpot_s.to_numpy(dtype=float)),
            "j_per_token": jpt,
            "energy_ratio": energy_ratio,
            "accepted": mean_ci(g.mean_accepted.to_numpy()),
            "tokens_per_iteration": ratio_of_sums_ci(g.new_tokens.to_numpy(), g.iterations.to_numpy()),
            "ppl": mean_ci(g.output_ppl.to_numpy()),
            "pass_at_1": pass_rate(g.passed),  # prompts.scorer's verdicts (Wilson interval); NaN without one
        }.items():
            row[key], row[f"{key}_low"], row[f"{key}_high"] = est.value, est.low, est.high
            row[f"{key}_est"] = est
        rows.append(row)
    return pd.DataFrame(rows)


def diagnose(run: RunData) -> list[str]:
    """What a reader should know is missing from a run (never a reason to crash)."""
    notes = []
    if run.gens.empty:
        notes.append(f"run {run.name!r} holds no generations (was it interrupted before the first one finished?)")
        return notes
    if run.info.get("status") != "complete":
        notes.append(f"run {run.name!r} is incomplete (status {run.info.get('status')!r}); "
                     f"complete it with harness profile --resume")
    if run.gens.gpu_energy_j.isna().all():
        notes.append(f"run {run.name!r} has no energy measurements (run harness profile with --energy on a GPU)")
    if run.gens.decoder_label.nunique() == 1:
        notes.append(f"run {run.name!r} has a single decoder setting: nothing to compare it with")
    if not (run.gens.decoder == BASELINE).any():
        notes.append(f"run {run.name!r} has no {BASELINE} baseline: speedups and energy ratios are not available")
    if any(w.get("short_window") for w in run.info.get("energy_windows", [])):
        notes.append(f"run {run.name!r} has energy windows under 1 s: NVML's ~0.1 s counter makes them coarse")
    return notes


def _setup(run: RunData) -> dict[str, Any]:
    info, env = run.info, run.info.get("environment", {})
    prof = info.get("profile", {})
    gpus = env.get("gpus") or []
    return {
        "name": run.name,
        "path": str(run.path),
        "target": prof.get("models", {}).get("target"),
        "draft": prof.get("models", {}).get("draft"),
        "dtype": info.get("model_info", {}).get("dtype"),
        "device": info.get("model_info", {}).get("device"),
        "gpu": ", ".join(f"{g.get('name')} (driver {g.get('driver', '?')}, limit {g.get('power_limit_w', '?')} W)"
                         for g in gpus) or "none",
        "cpu": env.get("cpu"),
        "packages": ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items() if v),
        "git": env.get("git_commit"),
        "started": info.get("started"),
        "ended": info.get("ended"),
        "generation": prof.get("generation", {}),
        "idle_power_w": info.get("idle_power_w"),
        "prompts": int(run.gens.prompt_id.nunique()) if len(run.gens) else 0,
    }


def render_report(run_dirs: list[str | Path], out: str | Path, title: str = "Decoding benchmark report") -> Path:
    """Write one self-contained HTML report for ``run_dirs``; return its path.

    Raises:
        FileNotFoundError, trace.CorruptRunError: as ``load_run``.
        OutputPathError: ``out`` cannot be written (checked before the work).
    """
    out = check_output_file(out)
    paths = [Path(p) for p in run_dirs]
    names = [p.name for p in paths]
    if len(set(names)) != len(names):  # same folder names in different places
        names = [str(p) for p in paths]
    runs = [load_run(p, n) for p, n in zip(paths, names, strict=True)]
    multi = len(runs) > 1
    notes = [n for r in runs for n in diagnose(r)]
    summaries = [summarise(r, multi) for r in runs if not r.gens.empty]
    for r in runs:
        notes.extend(r.notes)
    summary = pd.concat(summaries, ignore_index=True) if summaries else pd.DataFrame()
    figs: dict[str, str | None] = {}
    if not summary.empty:
        def with_series(df: pd.DataFrame, run: RunData) -> pd.DataFrame:
            return df.assign(series=[f"{run.name} / {x}" if multi else x for x in df.decoder_label])

        gens = pd.concat([with_series(r.gens, r) for r in runs if not r.gens.empty], ignore_index=True)
        steps_parts = [with_series(r.steps, r) for r in runs if not r.steps.empty]
        steps = pd.concat(steps_parts, ignore_index=True) if steps_parts else pd.DataFrame()
        figs = {
            "Latency per token": figures.latency_distribution(gens),
            "Energy per token": figures.energy_per_token(summary),
            "Acceptance by draft position": figures.acceptance_by_position(gens),
            "Speed vs quality": figures.speed_vs_quality(summary),
            "Tokens per iteration": figures.tokens_per_iteration(steps),
            "Where the time goes": figures.time_breakdown(gens),
        }
        missing = {"Energy per token": "no energy measurements in these runs",
                   "Acceptance by draft position": "no assisted decoder in these runs",
                   "Speed vs quality": "no perplexity figures",
                   "Tokens per iteration": "no step records",
                   "Where the time goes": "no phase timings (runs made before they were recorded)"}
        figs = {k: (v if v is not None else {"missing": missing.get(k, "no data")}) for k, v in figs.items()}
    env = jinja2.Environment(loader=jinja2.PackageLoader("harness", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    page = env.get_template("report.html.j2").render(
        title=title,
        generated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        setups=[_setup(r) for r in runs],
        rows=summary.to_dict("records") if not summary.empty else [],
        notes=notes,
        figures=figs,
        multi=multi,
        scored=bool(not summary.empty and summary.pass_at_1.notna().any()),
        fmt=_fmt,
        esc=html.escape,
    )
    return write_output_file(out, page.encode())


def _fmt(est: Estimate | float, spec: str = ".3g", suffix: str = "") -> str:
    if isinstance(est, Estimate):
        if not np.isfinite(est.value):
            return "–"
        ci = f" [{est.low:{spec}}, {est.high:{spec}}]" if np.isfinite(est.low) else ""
        return f"{est.value:{spec}}{suffix}{ci}"
    return f"{est:{spec}}{suffix}" if np.isfinite(est) else "–"
