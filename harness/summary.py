"""A terminal summary of a run: one line per decoder setting.

Its figures are ``harness.report.summarise``'s, the same the HTML report shows.
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from harness import trace
from harness.report import load_run, summarise


def _fmt(value: float, spec: str, suffix: str = "") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"


def print_summary(run_dir: Path, console: Console) -> None:
    run = load_run(run_dir)
    if run.gens.empty:
        console.print(f"{run_dir}: no generations recorded")
        return
    s = summarise(run)
    table = Table(title=f"{run_dir}  ({len(run.gens)} generations)")
    columns = {"decoder": ("label", None), "tok/s": ("tokens_per_s", ".1f"), "speedup": ("speedup", ".2f"),
               "TTFT ms": ("ttft_ms", ".1f"), "TPOT ms": ("tpot_ms", ".1f"),
               "tok/iter": ("tokens_per_iteration", ".2f"), "accepted": ("accepted", ".2f"),
               "ppl": ("ppl", ".3f"), "J/token": ("j_per_token", ".4f")}
    if s.pass_at_1.notna().any():  # a prompts.scorer judged the generations
        columns["pass@1"] = ("pass_at_1", ".3f")
    for col in columns:
        table.add_column(col, justify="right" if col != "decoder" else "left")
    for _, r in s.iterrows():
        table.add_row(*(str(r[key]) if spec is None else _fmt(r[key], spec, "x" if key == "speedup" else "")
                        for key, spec in columns.values()))
    console.print(table)
    for note in run.notes:
        console.print(f"note: {note}")
    console.print(f"traces: {run_dir}/{trace.GENERATIONS}, {run_dir}/{trace.STEPS}, {run_dir}/{trace.RUN_JSON}")
