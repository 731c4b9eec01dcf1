"""GPU energy through Zeus, measured over whole sweeps.

NVML's energy counter on an H100 moves only about every 0.1 s and a Zeus window
costs about 7.6 ms of host time, so a window per generation (let alone per step)
would read zeros or whole jumps. The profiler opens one window per decoder
sweep (seconds long); per-generation energy is that window's energy shared out
by each generation's share of the window's time, and is flagged as estimated.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

IDLE_WINDOW_S = 2.0  # long enough for NVML's ~0.1 s counter to give a steady figure
IDLE_SETTLE_S = 1.0


class EnergyUnavailableError(RuntimeError):
    """``--energy`` was asked for, but this machine cannot measure GPU energy."""


@dataclass(frozen=True)
class EnergyWindow:
    """One measured window.

    Attributes:
        name: window label (the sweep).
        time_s: wall time Zeus measured for the window.
        gpu_energy_j: joules per GPU index.
        overhead_s: host time spent opening and closing the window.
    """

    name: str
    time_s: float
    gpu_energy_j: dict[int, float]
    overhead_s: float

    @property
    def total_j(self) -> float:
        return float(sum(self.gpu_energy_j.values()))

    @property
    def mean_power_w(self) -> float:
        return self.total_j / self.time_s if self.time_s > 0 else 0.0


class EnergyMeter:
    """Whole-sweep energy windows over the GPUs a run uses (a thin Zeus wrapper)."""

    def __init__(self, gpu_indices: list[int], sync: bool | None = None) -> None:
        """Args:
            gpu_indices: CUDA device indices to measure (all GPUs the run uses).
            sync: synchronise CUDA at window edges (default: when CUDA is available).
        """
        if not gpu_indices:
            raise EnergyUnavailableError(
                "--energy measures GPU energy, but this run uses no CUDA device; set models.device to cuda"
            )
        try:
            from zeus.monitor import ZeusMonitor
        except ImportError as err:
            raise EnergyUnavailableError(f"--energy needs the zeus package: pip install zeus ({err})") from err
        try:
            # cpu_indices=[]: RAPL needs root and is not what these comparisons are about.
            self._monitor = ZeusMonitor(gpu_indices=gpu_indices, cpu_indices=[], sync_execution_with="torch")
        except Exception as err:  # zeus raises ValueError or its own errors, depending on the failure
            raise EnergyUnavailableError(
                f"--energy needs NVIDIA GPUs with NVML energy counters (Volta or newer); Zeus could not "
                f"monitor GPU(s) {gpu_indices}: {err}. Run without --energy on this machine."
            ) from err
        if not all(self._monitor.gpus.supports_get_total_energy_consumption(i) for i in gpu_indices):
            raise EnergyUnavailableError("--energy needs GPUs with a total-energy counter (Volta or newer)")
        self.gpu_indices = list(gpu_indices)
        self._sync = torch.cuda.is_available() if sync is None else sync
        self._opened: dict[str, float] = {}

    def begin(self, name: str) -> None:
        t0 = time.perf_counter()
        self._monitor.begin_window(name, sync_execution=self._sync)
        self._opened[name] = time.perf_counter() - t0

    def end(self, name: str) -> EnergyWindow:
        t0 = time.perf_counter()
        m = self._monitor.end_window(name, sync_execution=self._sync)
        overhead = self._opened.pop(name) + time.perf_counter() - t0
        return EnergyWindow(name, float(m.time), {int(k): float(v) for k, v in m.gpu_energy.items()}, overhead)

    def idle_power_w(self, seconds: float = IDLE_WINDOW_S) -> float:
        """Mean power of the GPUs over ``seconds`` of doing nothing (all of them together).

        Measured before a run, so that energy above idle can be read beside the
        measured joules (an H200 draws about 78 W idle).
        """
        time.sleep(IDLE_SETTLE_S)  # let the card come down from the model load
        self.begin("idle")
        time.sleep(seconds)
        return self.end("idle").mean_power_w

    def cancel(self, name: str) -> None:
        """Close a window without a result (the sweep failed)."""
        if self._opened.pop(name, None) is not None:
            self._monitor.end_window(name, sync_execution=False, cancel=True)


def gpu_indices_for(devices: list[torch.device]) -> list[int]:
    """CUDA indices among ``devices`` (duplicates removed, order kept)."""
    out: list[int] = []
    for dev in devices:
        if dev.type == "cuda":
            idx = dev.index if dev.index is not None else torch.cuda.current_device()
            if idx not in out:
                out.append(idx)
    return out


def share_by_time(window: EnergyWindow, times_s: list[float]) -> list[float]:
    """Each generation's estimated joules: the window's energy times its share of the window's time."""
    if window.time_s <= 0:
        return [0.0 for _ in times_s]
    return [window.total_j * t / window.time_s for t in times_s]


@contextmanager
def measured(meter: EnergyMeter | None, name: str) -> Iterator[list[EnergyWindow]]:
    """One energy window around the ``with`` body: the list it yields holds the
    window once the body ends; it stays empty without a meter, and a body that
    raises cancels the window (no partial figure is recorded)."""
    result: list[EnergyWindow] = []
    if meter is None:
        yield result
        return
    meter.begin(name)
    try:
        yield result
    except BaseException:
        meter.cancel(name)
        raise
    result.append(meter.end(name))
