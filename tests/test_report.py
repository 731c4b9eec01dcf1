"""Reports and the regression gate, on real smoke runs (CPU)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness import trace
from harness.compare import CompareInputError, compare_runs
from harness.report import render_report
from tests.test_profile import ROOT, smoke_run  # noqa: F401  (shared module fixture)

BASELINE = ROOT / "reports" / "baselines" / "smoke"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def edit_run(src: Path, dst: Path, **scale: float) -> Path:
    """Copy a run, multiplying columns by factors (e.g. time_s=1.3 for a 30% slowdown)."""
    shutil.copytree(src, dst)
    for part in (dst / trace.GENERATIONS).glob("*.parquet"):
        table = pq.read_table(part).to_pandas()
        for col, factor in scale.items():
            table[col] = table[col] * factor
        if "time_s" in scale:
            table["tokens_per_s"] = table.new_tokens / table.time_s
        pq.write_table(pa.Table.from_pandas(table, schema=trace.GENERATION_SCHEMA, preserve_index=False), part)
    return dst


def test_ci_gate_smoke_run_matches_committed_baseline(smoke_run):  # noqa: F811
    """CI's gate: deterministic figures of a fresh smoke run equal the committed baseline's."""
    proc = cli("compare", str(BASELINE), str(smoke_run[0]), "--checks", "deterministic")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No regression" in proc.stdout and "0 of 8 generations produced different tokens" in proc.stdout


def test_gate_flags_an_injected_30_percent_slowdown(smoke_run, tmp_path):  # noqa: F811
    slow = edit_run(smoke_run[0], tmp_path / "slow", time_s=1.3)
    proc = cli("compare", str(smoke_run[0]), str(slow), "--max-slowdown", "0.05")
    assert proc.returncode == 1, proc.stdout
    assert proc.stdout.count("❌ regressed") == 3 and "1.300" in proc.stdout


def test_gate_passes_the_same_run_and_a_within_tolerance_slowdown(smoke_run, tmp_path):  # noqa: F811
    assert cli("compare", str(smoke_run[0]), str(smoke_run[0])).returncode == 0
    slightly = edit_run(smoke_run[0], tmp_path / "slightly", time_s=1.03)
    assert compare_runs(smoke_run[0], slightly, max_slowdown=0.05).regressed is False


def test_gate_flags_changed_tokens(smoke_run, tmp_path):  # noqa: F811
    changed = tmp_path / "changed"
    shutil.copytree(smoke_run[0], changed)
    part = next((changed / trace.GENERATIONS).glob("part-01-*.parquet"))
    table = pq.read_table(part).to_pandas()
    table.at[0, "output_tokens"] = list(table.at[0, "output_tokens"][:-1]) + [7]
    pq.write_table(pa.Table.from_pandas(table, schema=trace.GENERATION_SCHEMA, preserve_index=False), part)
    result = compare_runs(smoke_run[0], changed, checks="deterministic")
    assert result.regressed
    assert [f.label for f in result.findings if f.status == "changed"] == ["specdecode"]


def test_gate_rejects_bad_input(smoke_run, tmp_path):  # noqa: F811
    assert cli("compare", str(smoke_run[0]), str(tmp_path / "nope")).returncode == 2
    other = tmp_path / "other"
    shutil.copytree(smoke_run[0], other)
    info = json.loads((other / "run.json").read_text())
    info["profile"]["generation"]["max_new_tokens"] = 99
    (other / "run.json").write_text(json.dumps(info))
    with pytest.raises(CompareInputError, match="max_new_tokens differs"):
        compare_runs(smoke_run[0], other)
    proc = cli("compare", str(smoke_run[0]), str(other))
    assert proc.returncode == 2 and "not comparable" in proc.stderr


def test_report_from_smoke_run_has_every_section(smoke_run, tmp_path):  # noqa: F811
    out = tmp_path / "report.html"
    proc = cli("report", str(smoke_run[0]), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    for text in ["Setup", "Summary", "speedup vs sampling", "Latency per token", "Acceptance by draft position",
                 "Speed vs quality", "Tokens per iteration", "Where the time goes", "has no energy measurements"]:
        assert text in page, text
    assert page.count("<img src=\"data:image/png;base64,") == 5  # energy figure is replaced by a note
    assert "http://" not in page and "https://" not in page  # self-contained


def test_report_degrades_gracefully(smoke_run, tmp_path):  # noqa: F811
    # A run of one decoder.
    single = tmp_path / "single"
    shutil.copytree(smoke_run[0], single)
    for part in (single / trace.GENERATIONS).glob("part-0[12]-*"):
        part.unlink()
    page = render_report([single], tmp_path / "single.html").read_text()
    assert "single decoder setting" in page
    # An empty run (killed before its first generation).
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "run.json").write_text(json.dumps({"status": "running", "profile": {}}))
    page = render_report([empty], tmp_path / "empty.html").read_text()
    assert "holds no generations" in page and "No generations to summarise" in page
    # Two runs side by side are labelled by run.
    page = render_report([smoke_run[0], single], tmp_path / "two.html").read_text()
    assert page.count('<td class="left">run</td>') == 3  # smoke run: three decoder rows
    assert page.count('<td class="left">single</td>') == 1


def test_report_rejects_a_folder_that_is_not_a_run(tmp_path):
    proc = cli("report", str(tmp_path), "-o", str(tmp_path / "r.html"))
    assert proc.returncode == 2 and "not a run directory" in proc.stderr


def test_summary_speedup_is_paired_ratio(smoke_run):  # noqa: F811
    from harness.report import load_run, summarise

    s = summarise(load_run(smoke_run[0])).set_index("label")
    gens = pd.read_parquet(smoke_run[0] / "generations.parquet")
    tps = gens.groupby("decoder_label").apply(lambda g: g.new_tokens.sum() / g.time_s.sum())
    assert s.loc["specdecode", "speedup"] == pytest.approx(tps["specdecode"] / tps["sampling"])
    assert s.loc["sampling", "speedup"] == pytest.approx(1.0)
    assert s.loc["mtad", "speedup_low"] <= s.loc["mtad", "speedup"] <= s.loc["mtad", "speedup_high"]
