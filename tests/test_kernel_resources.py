"""benchmarks/kernel_resources.py reads what the decode kernels need of an SM, without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.test_profile import ROOT


def test_resources_of_one_models_step_are_read_from_the_compiled_binaries(tmp_path):
    out = tmp_path / "resources.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--models", "smollm2-135m",
                    "--rows", "1", "--out", str(out)], check=True, env=env, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert [r["launch"] for r in rows] == ["q/k/v", "output", "gate/up", "down", "attention chunks",
                                           "attention merge"]
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["spill_bytes"] >= 0 and r["arch"] == "sm_90"
        # programs an SM holds: as many as its 65,536 registers allow (allocated per warp in 256s)
        per_program = -(-r["registers"] * 32 // 256) * 256 * r["warps"]
        fit = r["programs_per_sm_by_registers"]
        assert fit * per_program <= 65536 < (fit + 1) * per_program
