"""Data-parallel sweeps: one process per GPU (or CPU process) under torchrun.

``torchrun --nproc-per-node N -m harness profile PROFILE -o DIR`` starts N
ranks; each takes every N-th (decoder, prompt, repeat) cell in a fixed order,
so the split is deterministic and a re-run gives each rank the same share.
torch.distributed (gloo on CPU, nccl on GPUs) is used only for barriers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.barrier()

    def owns(self, cell_index: int) -> bool:
        """Whether this rank runs cell ``cell_index`` (round robin over ranks)."""
        return cell_index % self.world_size == self.rank

    def device(self, requested: str) -> str:
        """Each rank's device: its own GPU under data parallelism, else what was asked."""
        if self.distributed and requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested


def init_ranks() -> Ranks:
    """Read torchrun's environment; join the process group when there are several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        # Ranks wait for each other at barriers while others load models or finish sweeps.
        dist.init_process_group(backend=backend, timeout=timedelta(hours=6))
    return Ranks(rank, world, local)


def shutdown(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()
