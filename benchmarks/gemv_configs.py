"""How fast ``decode_kernels.gemv`` reads each real layer weight, by launch configuration.

    python benchmarks/gemv_configs.py [--models qwen2.5-1.5b,smollm2-135m] [--rows 1,5] [--out PATH]

For every matrix of a decode layer (q/k/v with the norm before it, the output
projection with its residual, gate/up with the norm and SiLU gating, down with
its residual) of each model shape in ``benchmarks/step_cost.py``, the time of
one launch per configuration of the row kernel (block N, block K, warps), next
to ``F.linear`` (cuBLAS) on the same weight, as TB/s of weight read against the
device-to-device copy bandwidth measured in the same process. Each timing
replays a CUDA graph of launches over as many copies of the weight as exceed
the L2 cache twice over, so every launch reads from memory, as in a real step.
``gemv_config`` (the default) is timed too, so the table says what it leaves.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import SHAPES, copy_bandwidth  # noqa: E402

from decoders import decode_kernels as K  # noqa: E402


def matrices(name: str) -> dict[str, dict]:
    """The four matrix launches of a layer and the output head: weight shape and fused steps."""
    c = SHAPES[name][2]
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    head_dim = hidden // c["num_attention_heads"]
    qkv = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * head_dim
    return {
        "qkv": dict(n=qkv, k=hidden, norm=True, bias=name.startswith("qwen")),
        "o": dict(n=hidden, k=hidden, residual=True),
        "gate_up": dict(n=2 * inter, k=hidden, norm=True, gated=True),
        "down": dict(n=hidden, k=inter, residual=True),
        "head": dict(n=c["vocab_size"], k=hidden),
    }


def graph_us(fn, copies: int, repeats: int = 20) -> float:
    """Median microseconds per call of ``fn(i)`` over ``copies`` calls captured in one graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):
            fn(i)  # compiles, and warms every copy
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / copies)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="qwen2.5-1.5b,qwen2.5-0.5b,smollm2-135m")
    ap.add_argument("--rows", default="1,5")
    ap.add_argument("--block-n", default="1,2,4,8,16")
    ap.add_argument("--block-k", default="256,512,1024,2048")
    ap.add_argument("--warps", default="1,2,8", help="tried on the best block shape (4 warps first)")
    ap.add_argument("--stages", default="1", help="pipeline stages tried with every block shape")
    ap.add_argument("--splits", default="",
                    help="K splits tried on the best configuration of a tensor-core launch, "
                         "besides the split _split_k picks")
    ap.add_argument("--row-kernel-rows", type=int, default=None,
                    help="launches of up to this many rows take the CUDA-core row kernel whatever the "
                         "matrix (default: decode_kernels.takes_row_kernel decides), so that its "
                         "configurations are swept for them; 'default' is then the row kernel's rule "
                         "even where the decoders would take the tensor-core kernel")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.row_kernel_rows is not None:
        K.ROW_KERNEL_ROWS = args.row_kernel_rows
    bandwidth = copy_bandwidth()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, L2 {l2 / 2**20:.0f} MiB", flush=True)
    result = {"gpu": torch.cuda.get_device_name(), "copy_bandwidth_Bps": bandwidth,
              "row_kernel_rows": K.ROW_KERNEL_ROWS, "shapes": []}
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    first = list(itertools.product(ints(args.block_n), ints(args.block_k)))
    torch.manual_seed(0)
    with torch.inference_mode():
        for name in args.models.split(","):
            for role, spec in matrices(name).items():
                for row in sweep(spec, ints(args.rows), first, ints(args.warps), l2, ints(args.stages),
                                 ints(args.splits) if args.splits else []):
                    row.update(model=name, role=role, floor_us=1e6 * row["bytes"] / bandwidth)
                    tbs = lambda us, r=row: r["bytes"] / us / 1e6  # noqa: E731
                    print(f"{name:13s} {role:7s} {row['n']:6d}x{row['k']:<5d} rows {row['rows']:2d}: floor "
                          f"{row['floor_us']:6.1f} us, cuBLAS {row['cublas_us']:6.1f} ({tbs(row['cublas_us']):.2f} "
                          f"TB/s), default {row['default']} {row['default_us']:6.1f} ({tbs(row['default_us']):.2f}), "
                          f"best {row['best']} {row['best_us']:6.1f} ({tbs(row['best_us']):.2f})", flush=True)
                    result["shapes"].append(row)
                if args.out:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(result, indent=1))


def sweep(spec: dict, rows_list: list[int], shapes: list[tuple[int, int]], warps: list[int], l2: int,
          stages: list[int], splits: list[int]) -> list[dict]:
    """One matrix: cuBLAS, the default configuration, every block shape and stage count at
    4 warps, then other warp counts on the best, then (2+ rows) other K splits on the best,
    for each row count."""
    n, k = spec["n"], spec["k"]
    nbytes = n * k * 2
    copies = max(4, -(-4 * l2 // nbytes))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5 for _ in range(copies)]
    out_n = n // 2 if spec.get("gated") else n
    ln = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if spec.get("bias") else None
    rows_out = []
    for rows in rows_list:
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        res = torch.randn(rows, out_n, device="cuda", dtype=torch.bfloat16)

        def run(config, x=x, res=res):
            return lambda i: K.gemv(x, weights[i], bias, norm=ln if spec.get("norm") else None, eps=1e-6,
                                    residual=res if spec.get("residual") else None,
                                    gated=spec.get("gated", False), config=config)

        timed = {}

        def attempt(config, run=run, timed=timed):
            try:
                timed[config] = graph_us(run(config), copies)
            except Exception as exc:  # a configuration the GPU cannot run
                print(f"  {config}: {type(exc).__name__}: {str(exc)[:120]}")

        for bn, bk in shapes:
            if bk // 2 < k:
                for st in stages:
                    attempt((bn, bk, 4, st))
        bn, bk, _, st = min(timed, key=timed.get)
        for w in warps:
            attempt((bn, bk, w, st))
        best = min(timed, key=timed.get)
        tensor_cores = not K.takes_row_kernel(rows, out_n, k, spec.get("gated", False))
        if tensor_cores:
            for sp in splits:
                if sp <= -(-k // best[1]):
                    attempt((*best[:4], sp))
            best = min(timed, key=timed.get)
        default = K.gemv_config(out_n, k, rows, spec.get("gated", False), spec.get("norm", False))
        if tensor_cores:  # the split the default takes, on this GPU
            default = (*default, K.tensor_core_launch(rows, out_n, k, default, x.device)[2])
        rows_out.append({"n": n, "k": k, "rows": rows, "bytes": nbytes,
                         "cublas_us": graph_us(lambda i, x=x: F.linear(x, weights[i], bias), copies),
                         "default": default,
                         "default_us": graph_us(run(None), copies), "best": best, "best_us": timed[best],
                         "configs": {",".join(map(str, c)): t for c, t in timed.items()}})
    return rows_out

if __name__ == "__main__":
    main()
