"""What the T > 0 filter costs inside a captured graph: PyTorch operations against the kernels.

    python benchmarks/filter_cost.py [--vocab 151936,49152] [--rows 1,5] [--out PATH]

For each vocabulary size and row count, the median time of a CUDA-graph replay of
``probs.filtered_probs_torch`` and of ``filter_kernel.filtered_probs`` on the same
float32 logits (temperature 1, top-k 10, top-p 0.9: the defaults), side by side in
one process, and the largest difference between their probabilities.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv_configs import graph_us  # noqa: E402

from decoders import filter_kernel, probs  # noqa: E402


def replay_us(fn) -> float:
    """Median microseconds of one replay of a graph holding ``fn()``."""
    return graph_us(lambda i: fn(), 1, repeats=200)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", default="151936,49152")
    ap.add_argument("--rows", default="1,5")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result = {"gpu": torch.cuda.get_device_name(), "top_k": args.top_k, "top_p": args.top_p, "rows": []}
    torch.manual_seed(0)
    for vocab in map(int, args.vocab.split(",")):
        for rows in map(int, args.rows.split(",")):
            logits = (torch.randn(rows, vocab, device="cuda") * 3).bfloat16().float()
            filters = (1.0, args.top_k, args.top_p)
            torch_us = replay_us(functools.partial(probs.filtered_probs_torch, logits, *filters))
            kernel_us = replay_us(functools.partial(filter_kernel.filtered_probs, logits, *filters))
            diff = (probs.filtered_probs_torch(logits, *filters)
                    - filter_kernel.filtered_probs(logits, *filters)).abs().max().item()
            row = {"vocab": vocab, "rows": rows, "torch_us": torch_us, "kernel_us": kernel_us, "max_abs_diff": diff}
            result["rows"].append(row)
            print(f"vocab {vocab:6d} rows {rows:2d}: PyTorch {torch_us:6.1f} us, kernels {kernel_us:6.1f} us "
                  f"({torch_us / kernel_us:.1f}x), max |diff| {diff:.2e}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
