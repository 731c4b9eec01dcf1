"""The regression gate and the report refuse runs they cannot vouch for.

Every case starts from a copy of the committed smoke baseline (a complete run of
24 generations), so no model runs here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import trace

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "reports" / "baselines" / "smoke"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a refused command (and no traceback)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    return lines[0]


def copy_run(dst: Path) -> Path:
    shutil.copytree(BASELINE, dst)
    return dst


def edit_json(run: Path, **changes) -> None:
    info = json.loads((run / trace.RUN_JSON).read_text())
    info.update(changes)
    (run / trace.RUN_JSON).write_text(json.dumps(info))


def part(run: Path, table: str, index: int) -> Path:
    return next((run / table).glob(f"part-{index:02d}-*.parquet"))


def keep_first_rows(run: Path, n: int) -> None:
    """Keep the first ``n`` generations of the first sweep and drop the later sweeps, as a kill would."""
    import pyarrow.parquet as pq

    for table in (trace.GENERATIONS, trace.STEPS):
        for i in (1, 2):
            part(run, table, i).unlink()
    gens = pq.read_table(part(run, trace.GENERATIONS, 0)).slice(0, n)
    pq.write_table(gens, part(run, trace.GENERATIONS, 0))


def test_compare_refuses_a_killed_current_run_unless_partial_runs_are_allowed(tmp_path):
    killed = copy_run(tmp_path / "killed")
    keep_first_rows(killed, 2)
    edit_json(killed, status="running", ended=None)
    proc = cli("compare", str(BASELINE), str(killed), "--checks", "deterministic")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = error_line(proc)
    assert "incomplete" in line and "'running'" in line and "--resume" in line and "--allow-partial" in line
    assert "22 of 24" in line

    allowed = cli("compare", str(BASELINE), str(killed), "--checks", "deterministic", "--allow-partial")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "Compared 2 of 24 baseline generations" in allowed.stdout
    assert "Partial run allowed" in allowed.stdout


def test_compare_refuses_a_current_run_missing_a_decoder(tmp_path):
    current = copy_run(tmp_path / "no-mtad")
    part(current, trace.GENERATIONS, 2).unlink()
    part(current, trace.STEPS, 2).unlink()
    proc = cli("compare", str(BASELINE), str(current), "--checks", "deterministic")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = error_line(proc)
    assert "mtad" in line and "8 of 24" in line and "--allow-partial" in line

    allowed = cli("compare", str(BASELINE), str(current), "--checks", "deterministic", "--allow-partial")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "Compared 16 of 24 baseline generations (2 of 3 decoder labels)" in allowed.stdout


def test_compare_refuses_an_incomplete_baseline(tmp_path):
    base = copy_run(tmp_path / "base")
    edit_json(base, status="running")
    proc = cli("compare", str(base), str(BASELINE), "--checks", "deterministic")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "baseline run" in error_line(proc)


def test_compare_of_complete_runs_says_everything_was_compared():
    proc = cli("compare", str(BASELINE), str(BASELINE), "--checks", "deterministic")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Compared 24 of 24 baseline generations (3 of 3 decoder labels)" in proc.stdout


def _truncate_generations(run: Path) -> Path:
    p = part(run, trace.GENERATIONS, 1)
    os.truncate(p, 100)
    return p


def _truncate_steps(run: Path) -> Path:
    p = part(run, trace.STEPS, 2)
    os.truncate(p, 100)
    return p


def _run_json_invalid(run: Path) -> Path:
    (run / trace.RUN_JSON).write_text('{"status": "complete", "profile": {\n')
    return run / trace.RUN_JSON


def _run_json_list(run: Path) -> Path:
    (run / trace.RUN_JSON).write_text("[]\n")
    return run / trace.RUN_JSON


CORRUPTIONS = {
    "truncated generations part": (_truncate_generations, "--resume"),
    "truncated steps part": (_truncate_steps, "--resume"),
    "run.json not JSON": (_run_json_invalid, "not valid JSON"),
    "run.json not an object": (_run_json_list, "JSON object"),
}


@pytest.mark.parametrize("command", ["compare", "report"])
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupt_run_is_bad_input_naming_the_file(tmp_path, command, case):
    corrupt, advice = CORRUPTIONS[case]
    run = copy_run(tmp_path / "run")
    bad_file = corrupt(run)
    if command == "compare":
        proc = cli("compare", str(BASELINE), str(run))
    else:
        proc = cli("report", str(run), "-o", str(tmp_path / "r.html"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = error_line(proc)
    assert str(bad_file) in line and advice in line
    if "part" in case:
        assert "delete it" in line


def read_only_dir(tmp_path: Path) -> Path:
    """A folder nobody can create files in (root ignores permission bits, but not procfs)."""
    if os.geteuid() == 0:
        return Path("/proc")
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


def bad_outputs(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "existing-folder"
    folder.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    return {"read-only": read_only_dir(tmp_path) / "out.html", "folder": folder,
            "under a file": a_file / "out.html"}


@pytest.mark.parametrize("command", ["compare", "report"])
def test_output_to_an_unwritable_path_is_one_clear_line(tmp_path, command):
    for kind, out in bad_outputs(tmp_path).items():
        if command == "compare":
            proc = cli("compare", str(BASELINE), str(BASELINE), "--checks", "deterministic", "-o", str(out))
        else:
            proc = cli("report", str(BASELINE), "-o", str(out))
        assert proc.returncode == 2, (kind, proc.stdout + proc.stderr)
        line = error_line(proc)
        assert str(out) in line and "-o" in line, (kind, line)
        assert not proc.stdout, (kind, "nothing is printed before the output path is refused")
