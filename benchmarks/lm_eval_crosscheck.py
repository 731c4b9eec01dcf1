"""Does plain ``lm_eval ... energy=True`` measure what ``harness profile`` measures?

    python benchmarks/lm_eval_crosscheck.py LM_EVAL_RESULTS.json LM_EVAL_TRACE_DIR PROFILE_RUN_DIR [--out PATH]

Takes one configuration run both ways on the same problems (``benchmarks/gpu_session.sh
OUT lm-eval-target`` makes them: greedy sampling on Qwen2.5-Coder-1.5B, HumanEval's
first 40 problems) and puts side by side: pass@1 (lm-eval's own metric against the
profile's scorer), the energy windows' J/token and tokens/s, per-token decode time,
and how many problems got the same tokens. A problem whose first token took more than
ten times the median is reported apart: that is compilation or graph capture inside
a measured window, which the comparison must not hide.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from harness import trace


def _window(run_dir: Path) -> dict:
    [window] = json.loads((run_dir / "run.json").read_text())["energy_windows"]
    return window


def summarize(results: Path, lm_trace: Path, profile_run: Path) -> dict:
    lm_rows = trace.read_table(lm_trace).set_index("prompt_index").sort_index()
    pr_rows = trace.read_table(profile_run).set_index("prompt_index").sort_index()
    [task] = json.loads(results.read_text())["results"].values()
    out = {"problems": len(pr_rows), "sides": {}}
    for side, rows, run_dir in (("lm_eval", lm_rows, lm_trace), ("harness_profile", pr_rows, profile_run)):
        window = _window(run_dir)
        cold = rows.ttft_s > 10 * rows.ttft_s.median()
        warm = rows[~cold]
        out["sides"][side] = {
            "pass_at_1": task["pass_at_1,none"] if side == "lm_eval" else float(rows.passed.mean()),
            "window_s": window["time_s"], "window_tokens": window["new_tokens"],
            "tokens_per_s": window["new_tokens"] / window["generation_time_s"],
            "j_per_token": window["energy_per_token_j"], "mean_power_w": window["mean_power_w"],
            "median_tpot_ms": 1e3 * float(rows.tpot_s.median()),
            "cold_problems": {int(i): round(float(t), 2) for i, t in rows.ttft_s[cold].items()},
            "tokens_per_s_without_cold": float(warm.new_tokens.sum() / warm.time_s.sum()),
        }
    same = sum(np.array_equal(a[: min(len(a), len(b))], b[: min(len(a), len(b))])
               for a, b in zip(lm_rows.output_tokens, pr_rows.output_tokens, strict=True))
    out["same_tokens_over_common_length"] = int(same)
    out["same_length"] = int((lm_rows.new_tokens == pr_rows.new_tokens).sum())
    sides = out["sides"]
    out["ratios_lm_eval_over_profile"] = {
        key: sides["lm_eval"][key] / sides["harness_profile"][key]
        for key in ("j_per_token", "tokens_per_s", "median_tpot_ms", "tokens_per_s_without_cold")}
    out["per_problem_tpot_ratio_median"] = statistics.median(
        (lm_rows.tpot_s / pr_rows.tpot_s).tolist())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("lm_eval_trace", type=Path)
    ap.add_argument("profile_run", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    summary = summarize(args.results, args.lm_eval_trace, args.profile_run)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
