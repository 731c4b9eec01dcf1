"""Data-parallel ``harness profile`` under torchrun (gloo on the CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from tests.test_profile import ROOT, SMOKE

KEYS = ["decoder_label", "prompt_id", "repeat"]
pytestmark = pytest.mark.slow


def torchrun(nproc: int, run_dir: Path, *extra: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(29500 + os.getpid() % 1000 + nproc), "-m", "harness", "profile", str(SMOKE), "-o", str(run_dir),
           "--no-progress", "--no-report", "--resume", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def tokens_by_key(run_dir: Path) -> dict:
    gens = pd.read_parquet(run_dir / "generations.parquet")
    assert not gens.duplicated(KEYS).any(), "a cell was run twice"
    return {(r.decoder_label, r.prompt_id, r.repeat): list(r.output_tokens) for r in gens.itertuples()}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dp") / "one"
    proc = torchrun(1, run_dir, "--set", "generation.max_new_tokens=48")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return tokens_by_key(run_dir)


def test_two_ranks_split_the_cells_exactly(single_run, tmp_path):
    run_dir = tmp_path / "two"
    proc = torchrun(2, run_dir, "--set", "generation.max_new_tokens=48")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert tokens_by_key(run_dir) == single_run  # same keys, none lost or doubled, same tokens
    parts = sorted(p.name for p in (run_dir / "generations.parquet").glob("*.parquet"))
    assert any("-r0-" in p for p in parts) and any("-r1-" in p for p in parts)
    steps = pd.read_parquet(run_dir / "steps.parquet")
    assert len(steps) == pd.read_parquet(run_dir / "generations.parquet").iterations.sum()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["world_size"] == 2 and info["status"] == "complete"


def _rows_in(part: Path) -> int:
    """Rows of a part file the worker may be replacing as we look: read through one open
    handle, which keeps the version it opened (reading by path twice can mix two versions)."""
    try:
        with open(part, "rb") as handle:
            return pq.read_metadata(handle).num_rows
    except FileNotFoundError:
        return 0


def _worker_pid(parent: int, rank: int) -> int | None:
    """PID of the torchrun worker with RANK=rank below ``parent``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK" in b"".join(env) and ppid != 1:
            if _descends_from(int(proc.name), parent):
                return int(proc.name)
    return None


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def test_killed_rank_is_completed_by_rerunning_the_same_command(single_run, tmp_path):
    run_dir = tmp_path / "killed"
    proc = torchrun(2, run_dir, "--set", "generation.max_new_tokens=48", start_new_session=True)
    deadline = time.time() + 300
    victim = None
    while time.time() < deadline and proc.poll() is None:
        parts = list((run_dir / "generations.parquet").glob("part-01-*-r1-*.parquet"))
        if parts and _rows_in(parts[0]) >= 1:
            victim = _worker_pid(proc.pid, 1)
            break
        time.sleep(0.05)
    assert victim is not None, "rank 1 never reached its second sweep"
    os.kill(victim, signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    partial = tokens_by_key(run_dir)
    assert 0 < len(partial) < len(single_run)
    again = torchrun(2, run_dir, "--set", "generation.max_new_tokens=48")
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert tokens_by_key(run_dir) == single_run
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"


def test_lm_eval_data_parallel_splits_requests(tmp_path):
    """torchrun -m lm_eval --model mtad: each request is decoded once, by one rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
         str(29700 + os.getpid() % 1000), "-m", "lm_eval", "--model", "mtad", "--model_args",
         "pretrained=builtin:tiny-random,draft=builtin:tiny-random-draft", "--tasks", "harness_capitals",
         "--include_path", str(ROOT / "tasks"), "--limit", "4", "--output_path", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["n-samples"]["harness_capitals"]["effective"] == 4
    gens = pd.read_parquet(next((out / "decoding-traces").iterdir()) / "generations.parquet")
    assert sorted(gens.prompt_id) == [f"harness_capitals/{i}" for i in range(4)]
    assert {s.rsplit("-", 1)[1] for s in gens.sweep} == {"r0", "r1"}
