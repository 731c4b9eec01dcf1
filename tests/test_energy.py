"""Energy accounting, with the GPU faked at Zeus's device seam (``get_gpus``).

The fake reproduces what was measured on the H100: the total-energy counter
advances in 0.1 s jumps. Real Zeus code (ZeusMonitor windows) runs on top.
"""

from __future__ import annotations

import json
import math
import time

import pandas as pd
import pytest
import torch

from harness.energy import EnergyMeter, EnergyUnavailableError, share_by_time
from harness.profile_spec import load_profile
from harness.runner import run_profile
from tests.test_profile import SMOKE

POWER_W = 300.0
TICK_S = 0.1


class FakeNvidiaGPUs:
    """Stands in for zeus.device.gpu.NVIDIAGPUs: one Hopper GPU drawing POWER_W."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __len__(self) -> int:
        return 1

    def supports_get_total_energy_consumption(self, index: int) -> bool:
        return True

    def get_total_energy_consumption(self, index: int) -> float:
        elapsed = math.floor((time.monotonic() - self.t0) / TICK_S) * TICK_S
        return 1000.0 * POWER_W * elapsed  # millijoules, as NVML reports


@pytest.fixture
def fake_gpu(monkeypatch):
    import zeus.monitor.energy as zeus_energy

    monkeypatch.setattr(zeus_energy, "get_gpus", lambda *a, **k: FakeNvidiaGPUs())


def test_window_reads_the_counter(fake_gpu):
    meter = EnergyMeter([0], sync=False)  # the fake GPU has nothing to synchronise
    meter.begin("w")
    time.sleep(0.5)
    w = meter.end("w")
    assert w.time_s == pytest.approx(0.5, abs=0.05)
    # The counter moves in 0.1 s jumps: the window reads 0.4-0.6 s worth.
    assert POWER_W * 0.4 - 1e-6 <= w.total_j <= POWER_W * 0.6 + 1e-6
    assert w.overhead_s < 0.05


def test_share_by_time_splits_the_window():
    from harness.energy import EnergyWindow

    w = EnergyWindow("w", time_s=2.0, gpu_energy_j={0: 100.0, 1: 60.0}, overhead_s=0.0)
    assert share_by_time(w, [0.5, 1.0]) == [40.0, 80.0]


def test_profile_with_energy_fills_estimated_columns(fake_gpu, tmp_path):
    profile = load_profile(SMOKE, ["generation.max_new_tokens=48", "generation.repeats=1"])
    run_dir = run_profile(profile, tmp_path / "run", meter=EnergyMeter([0], sync=False),
                          show_progress=False)
    gens = pd.read_parquet(run_dir / "generations.parquet")
    info = json.loads((run_dir / "run.json").read_text())
    assert gens.energy_estimated.all() and (gens.gpu_energy_j >= 0).all()
    assert len(info["energy_windows"]) == 3
    for w in info["energy_windows"]:
        rows = gens[gens.sweep == w["sweep"]]
        # Per-generation estimates are the window's energy shared by time.
        expected = w["total_energy_j"] * rows.time_s.sum() / w["time_s"]
        assert rows.gpu_energy_j.sum() == pytest.approx(expected, rel=1e-9)
        assert rows.gpu_energy_j.sum() <= w["total_energy_j"] + 1e-9
        assert (rows.energy_per_token_j == rows.gpu_energy_j / rows.new_tokens).all()
        assert w["new_tokens"] == rows.new_tokens.sum()
        assert w["monitor_overhead_fraction"] is not None


def test_windows_hold_decoding_only(fake_gpu, tmp_path, monkeypatch):
    """Perplexity forwards and row writes happen after the window: with each
    perplexity made to cost 0.2 s, no window grows by it."""
    import harness.runner as runner

    real = runner.output_perplexity

    def slow_perplexity(*args, **kwargs):
        time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "output_perplexity", slow_perplexity)
    profile = load_profile(SMOKE, ["generation.max_new_tokens=16", "generation.repeats=1"])
    run_dir = run_profile(profile, tmp_path / "run", meter=EnergyMeter([0], sync=False), show_progress=False)
    gens = pd.read_parquet(run_dir / "generations.parquet")
    info = json.loads((run_dir / "run.json").read_text())
    for w in info["energy_windows"]:
        rows = gens[gens.sweep == w["sweep"]]
        assert len(rows) == 4
        # 4 x 0.2 s of perplexity would show; the window is the generations plus loop overhead.
        assert w["time_s"] < rows.time_s.sum() + 0.1, w
    # Idle power, measured before the run over IDLE_WINDOW_S: the fake draws POWER_W,
    # read through a counter that moves every TICK_S.
    from harness.energy import IDLE_WINDOW_S

    assert info["idle_power_w"] == pytest.approx(POWER_W, abs=POWER_W * TICK_S / IDLE_WINDOW_S + 1e-6)


def test_generations_decoded_before_a_crash_are_recovered(fake_gpu, tmp_path, monkeypatch):
    """A crash after a sweep's window (here in the perplexity forward) leaves the
    journal; the resume writes its generations without decoding them again, with
    their share of the energy the window measured."""
    import harness.runner as runner

    overrides = ["generation.max_new_tokens=12", "generation.repeats=1"]
    profile = load_profile(SMOKE, overrides)
    reference = pd.read_parquet(run_profile(profile, tmp_path / "ref", show_progress=False) / "generations.parquet")
    real = runner.output_perplexity
    calls = []

    def failing_perplexity(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # the second generation of the second sweep
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "output_perplexity", failing_perplexity)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_profile(profile, tmp_path / "run", show_progress=False, meter=EnergyMeter([0], sync=False))
    journals = list((tmp_path / "run" / "journal").glob("*.jsonl"))
    assert len(journals) == 1 and len(journals[0].read_text().splitlines()) == 5  # 4 generations + their energy
    monkeypatch.setattr(runner, "output_perplexity", real)
    generated = []
    real_generate = runner.timed_generate
    monkeypatch.setattr(runner, "timed_generate", lambda *a, **k: generated.append(1) or real_generate(*a, **k))
    run_dir = run_profile(profile, tmp_path / "run", resume=True, show_progress=False,
                          meter=EnergyMeter([0], sync=False))
    assert len(generated) == 4  # only the third sweep's four cells; the second's came from the journal
    assert not (run_dir / "journal").exists()
    gens = pd.read_parquet(run_dir / "generations.parquet")
    # The crashed sweep's first row was written before the crash; its other three are recovered.
    assert len(gens) == 12 and gens.sweep.str.endswith("-recovered").sum() == 3
    key = ["decoder_label", "prompt_id", "repeat"]
    merged = gens.merge(reference, on=key, suffixes=("", "_ref"))
    assert len(merged) == 12
    assert (merged.output_tokens.map(list) == merged.output_tokens_ref.map(list)).all()
    assert merged.output_ppl.notna().all()
    # The crashed sweep's window was recorded once, and every row holds its share of a window.
    info = json.loads((run_dir / "run.json").read_text())
    by_label = {}
    for w in info["energy_windows"]:
        by_label.setdefault(w["decoder_label"], []).append(w)
    assert sorted(len(ws) for ws in by_label.values()) == [1, 1, 1]
    assert gens.gpu_energy_j.notna().all()
    for label, ws in by_label.items():
        rows = gens[gens.decoder_label == label]
        assert ws[0]["new_tokens"] == rows.new_tokens.sum()
        assert rows.gpu_energy_j.sum() == pytest.approx(ws[0]["total_energy_j"] * rows.time_s.sum() / ws[0]["time_s"])


def test_no_gpu_is_a_clear_error(monkeypatch):
    import zeus.monitor.energy as zeus_energy
    from zeus.device.gpu.common import ZeusGPUInitError

    def no_gpus(*a, **k):
        raise ZeusGPUInitError("NVML and AMDSMI unavailable.")

    monkeypatch.setattr(zeus_energy, "get_gpus", no_gpus)
    with pytest.raises(EnergyUnavailableError, match="NVML energy counters"):
        EnergyMeter([0])
    with pytest.raises(EnergyUnavailableError, match="uses no CUDA device"):
        EnergyMeter([])


@pytest.mark.gpu
def test_real_gpu_energy_over_a_sweep(tmp_path):
    """On an NVIDIA GPU: real joules, plausible power, a monitoring cost of a few milliseconds per window."""
    import pynvml

    profile = load_profile(SMOKE, ["models.device=cuda", "generation.max_new_tokens=128",
                                   "generation.repeats=4", "generation.warmup=2"])
    run_dir = run_profile(profile, tmp_path / "run", energy=True, show_progress=False)
    info = json.loads((run_dir / "run.json").read_text())
    pynvml.nvmlInit()
    limit_w = pynvml.nvmlDeviceGetPowerManagementLimit(pynvml.nvmlDeviceGetHandleByIndex(0)) / 1000
    for w in info["energy_windows"]:
        assert w["total_energy_j"] > 0
        assert 20 < w["mean_power_w"] < limit_w
        # Opening and closing a window is a fixed cost (NVML reads and a synchronisation at its
        # edges), so as a share of the window it depends on how fast the sweep decodes: on the fast
        # path this smoke sweep lasts a fraction of a second and the share read 2.6-3.5% on an H100.
        # What must hold is the cost itself, small against any sweep worth measuring.
        assert w["monitor_overhead_s"] < 0.05
    gens = pd.read_parquet(run_dir / "generations.parquet")
    assert (gens.gpu_energy_j > 0).all() and gens.energy_estimated.all()
    assert torch.cuda.is_available()


def test_journal_survives_a_torn_last_line(tmp_path):
    """A crash mid-write leaves half a line; it is skipped and the next entry is not lost."""
    from harness.trace import Journal

    journal = Journal(tmp_path, "00-x")
    journal.append({"a": 1})
    journal._file.close()  # the process died here; then a write it never finished:
    with journal.path.open("a") as f:
        f.write('{"a": 2, "tok')
    resumed = Journal(tmp_path, "00-x")
    resumed.append({"a": 3})
    assert resumed.entries() == [{"a": 1}, {"a": 3}]
