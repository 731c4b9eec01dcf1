"""``run.json``: the one record of a run, written by ``harness profile`` and the lm-eval adapter.

Keys (every writer sets all of them; readers may rely on them):

- ``run_id`` (str), ``source`` (``"profile"`` or ``"lm_eval"``), ``status``
  (``"running"`` until the end, then ``"complete"``), ``started`` / ``ended``
  (ISO times; ``ended`` null while running), ``resumed`` (times of resumes);
- ``fingerprint`` (the profile's, null for lm-eval), ``profile`` (the resolved
  profile as plain data: models, generation, decoders), ``command`` (argv);
- ``energy`` (bool: Zeus windows were measured), ``energy_windows`` (one
  entry per sweep: see ``RunRecord.add_window``);
- ``environment`` (``harness.sysinfo.environment``), ``model_info`` (dtype,
  device, device map, parameter counts);
- ``world_size``, and ``rank`` in the per-rank files ``rank-N.json``.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness import trace
from harness.energy import EnergyWindow, share_by_time
from harness.models import LoadedModels
from harness.sysinfo import environment


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def model_info(models: LoadedModels) -> dict[str, Any]:
    return {"dtype": str(models.dtype).removeprefix("torch."), "device": str(models.device),
            "device_map": getattr(models.target, "hf_device_map", None),
            "target_params": models.target.num_parameters(),
            "draft_params": models.draft.num_parameters() if models.draft is not None else None}


class RunRecord:
    """``run.json`` (or a rank's ``rank-N.json``): written at the start, after every sweep, and at the end."""

    def __init__(self, run_dir: Path, data: dict[str, Any], name: str = trace.RUN_JSON) -> None:
        self.path = run_dir / name
        self.data = data
        self.save()

    @classmethod
    def start(cls, run_dir: Path, *, run_id: str, source: str, profile: dict[str, Any], fingerprint: str | None,
              energy: bool, models: LoadedModels, world_size: int = 1, rank: int = 0,
              previous: dict[str, Any] | None = None) -> RunRecord:
        """A new record (or the continuation of ``previous`` when resuming) in its status ``running``."""
        prev = previous or {}
        data = {
            "run_id": prev.get("run_id") or run_id,
            "source": source,
            "status": "running",
            "started": prev.get("started") or now(),
            "resumed": [*prev.get("resumed", []), now()] if previous else [],
            "ended": None,
            "fingerprint": fingerprint,
            "profile": profile,
            "command": list(sys.argv),
            "energy": energy,
            "energy_windows": prev.get("energy_windows", []),
            "environment": environment(models.devices),
            "model_info": model_info(models),
            "world_size": world_size,
        }
        name = trace.RUN_JSON
        if rank:
            data["rank"], name = rank, f"rank-{rank}.json"
        return cls(run_dir, data, name)

    def save(self) -> None:
        trace.atomic_write_json(self.path, self.data)

    def finish(self) -> None:
        self.data.update(status="complete", ended=now())
        self.save()

    def add_window(self, sweep: str, label: str, window: EnergyWindow, times_s: list[float],
                   tokens: int) -> list[float]:
        """Record ``window`` (saved at once) and return its joules shared out over the
        sweep's generations by their times ``times_s``."""
        self.data.setdefault("energy_windows", []).append(
            {
                "sweep": sweep,
                "decoder_label": label,
                "time_s": window.time_s,
                "gpu_energy_j": {str(k): v for k, v in window.gpu_energy_j.items()},
                "total_energy_j": window.total_j,
                "mean_power_w": window.mean_power_w,
                "generation_time_s": sum(times_s),
                "new_tokens": tokens,
                "energy_per_token_j": window.total_j / tokens if tokens else None,
                "monitor_overhead_s": window.overhead_s,
                "monitor_overhead_fraction": window.overhead_s / window.time_s if window.time_s > 0 else None,
                # NVML's counter moves about every 0.1 s: a window under a second is coarse.
                "short_window": window.time_s < 1.0,
            }
        )
        self.save()
        return share_by_time(window, times_s)
