"""A terminal summary of a run: one line per decoder setting."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from harness import trace


def decoder_summary(gens: pd.DataFrame) -> pd.DataFrame:
    """Per decoder label: means of the headline figures, plus speedup over sampling."""
    agg = gens.groupby("decoder_label", sort=False).agg(
        decoder=("decoder", "first"),
        generations=("new_tokens", "size"),
        new_tokens=("new_tokens", "sum"),
        time_s=("time_s", "sum"),
        ttft_s=("ttft_s", "mean"),
        tpot_s=("tpot_s", "mean"),
        tokens_per_iteration=("tokens_per_iteration", "mean"),
        mean_accepted=("mean_accepted", "mean"),
        output_ppl=("output_ppl", "mean"),
        gpu_energy_j=("gpu_energy_j", lambda s: s.sum(min_count=1)),
        pass_at_1=("passed", lambda s: s.dropna().astype(float).mean()),  # prompts.scorer's share passed
    )
    agg["tokens_per_s"] = agg.new_tokens / agg.time_s
    agg["energy_per_token_j"] = agg.gpu_energy_j / agg.new_tokens
    base = agg[agg.decoder == "sampling"]
    agg["speedup"] = agg.tokens_per_s / base.tokens_per_s.iloc[0] if len(base) else float("nan")
    return agg


def print_summary(run_dir: Path, console: Console) -> None:
    gens = trace.read_table(run_dir)
    if gens.empty:
        console.print(f"{run_dir}: no generations recorded")
        return
    s = decoder_summary(gens)
    table = Table(title=f"{run_dir}  ({len(gens)} generations)")
    scored = s.pass_at_1.notna().any()
    for col in ["decoder", "tok/s", "speedup", "TTFT ms", "TPOT ms", "tok/iter", "accepted", "ppl", "J/token",
                *(["pass@1"] if scored else [])]:
        table.add_column(col, justify="right" if col != "decoder" else "left")
    for label, r in s.iterrows():
        table.add_row(
            str(label), f"{r.tokens_per_s:.1f}", f"{r.speedup:.2f}x", f"{1e3 * r.ttft_s:.1f}",
            f"{1e3 * r.tpot_s:.1f}" if pd.notna(r.tpot_s) else "-", f"{r.tokens_per_iteration:.2f}",
            f"{r.mean_accepted:.2f}", f"{r.output_ppl:.3f}",
            f"{r.energy_per_token_j:.4f}" if pd.notna(r.energy_per_token_j) else "-",
            *([f"{r.pass_at_1:.3f}" if pd.notna(r.pass_at_1) else "-"] if scored else []),
        )
    console.print(table)
    console.print(f"traces: {run_dir}/{trace.GENERATIONS}, {run_dir}/{trace.STEPS}, {run_dir}/{trace.RUN_JSON}")
