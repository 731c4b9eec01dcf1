"""What a run ran on: package versions, git commit, CPU, GPU, driver, power limit."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

PACKAGES = ["torch", "transformers", "accelerate", "zeus", "lm_eval", "pyarrow", "pandas", "decoding-harness"]


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The project's commit (with ``-dirty`` for local changes), or None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info(index: int) -> dict[str, Any]:
    """Name, driver and power limit of CUDA device ``index`` (NVML when available)."""
    info: dict[str, Any] = {"index": index, "name": torch.cuda.get_device_name(index)}
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        info["power_limit_w"] = pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000.0
        info["memory_total_gib"] = pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30
    except Exception as err:  # NVML is optional here: the names above still identify the GPU
        info["nvml_error"] = str(err)
    return info


def environment(devices: list[torch.device]) -> dict[str, Any]:
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    return {
        "packages": package_versions(),
        "git_commit": git_commit(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": torch.get_num_threads(),
        "cuda_version": torch.version.cuda,
        "gpus": [gpu_info(i) for i in cuda],
    }
