"""What the small benchmarks share: a Markdown table on stdout, and the result file
with the command that made it and the machine it ran on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from harness.sysinfo import environment


def print_table(header: list[str], lines: list[list[object]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for line in lines:
        print("| " + " | ".join(str(cell) for cell in line) + " |")


def write_result(path: Path | None, rows: list[dict], device: str = "cpu") -> None:
    """``rows`` under ``path`` (nothing without one), with this process's command line and environment
    (the GPU's too, for a ``device`` on one)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": "python " + " ".join(sys.argv), "environment": environment([torch.device(device)]),
              "rows": rows}
    path.write_text(json.dumps(record, indent=1))
