"""Registers, spills and shared memory of every decode kernel, compiled for a GPU without one.

Why: a kernel whose threads need more than the 255 registers a thread may hold keeps
the rest in local memory (a spill: loads and stores through L1 on every use), and its
register count caps how many of its programs an SM holds, so how many bytes are in
flight. Both shape a latency-bound decode step, and neither needs a GPU to know:
Triton compiles for a named architecture and its bundled ``cuobjdump`` reads the
binary's resource use. This compiles each kernel of ``decoders.decode_kernels`` with
the launch parameters the decode step uses for the model shapes of the two pairs
(the products' ``gemv_config`` for 1 and 5 rows and, on the tensor-core kernel, the K split
of a GPU of ``--sms`` multiprocessors; the attention of 1 and 5 new tokens)
and prints, per kernel and shape: registers a thread, spill bytes a thread (the
binary's stack), shared memory a program, and programs an SM holds by its registers.

The numbers are those of the Triton installed here (``triton.__version__`` is in the
result); another Triton can allocate differently. No GPU is needed.

    python benchmarks/kernel_resources.py [--arch 90] [--models smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b] [--out FILE]
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Compiled, not interpreted, whatever the caller's environment (the CPU tests set the
# interpreter, which decode_kernels reads when its kernels are defined).
os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from markdown_result import print_table, write_result  # noqa: E402
from step_cost import CACHE  # noqa: E402
from step_cost import SHAPES as STEP_COST_MODELS  # noqa: E402
from transformers import Qwen2ForCausalLM  # noqa: E402

from decoders import decode_kernels as K  # noqa: E402
from decoders import fused  # noqa: E402

# The pairs' models (benchmarks/step_cost.py has their shapes and more).
MODELS = ("smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b")
REGISTERS_PER_SM = 65536  # every architecture from sm_70 to sm_90


def layer_shape(name: str) -> tuple[int, int, int, int, int, bool]:
    """Hidden size, intermediate size, heads, KV heads, head size and whether q/k/v carry a
    bias, of step_cost's model ``name`` (Qwen2's projections carry one, Llama's none)."""
    cls, _, config = STEP_COST_MODELS[name]
    heads = config["num_attention_heads"]
    return (config["hidden_size"], config["intermediate_size"], heads, config["num_key_value_heads"],
            config["hidden_size"] // heads, cls is Qwen2ForCausalLM)


def _arg_type(name: str) -> str:
    """Triton's type string of a kernel argument, from its name (the decode kernels' conventions)."""
    if name.endswith("_ptr"):
        if name.startswith("part_"):
            return "*fp32"
        return {"positions_ptr": "*i64", "signal_ptr": "*i32", "lock_ptr": "*i32"}.get(name, "*bf16")
    return "fp32" if name in ("eps", "scale") else "i32"


def resources(kernel, constants: dict, warps: int, stages: int | None, arch: int) -> dict:
    """Compile ``kernel`` for ``sm_{arch}`` with ``constants`` and read its resource use
    (``stages`` None: Triton's default, as a launch that names none gets)."""
    params = inspect.signature(kernel.fn).parameters
    signature = {p: "constexpr" if p in constants else _arg_type(p) for p in params}
    options = {"num_warps": warps} if stages is None else {"num_warps": warps, "num_stages": stages}
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", arch, 32),
                              options=options)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    usage = dict(field.split(":") for line in out.splitlines() if "REG:" in line for field in line.split())
    registers = int(usage["REG"])
    return {"registers": registers, "spill_bytes": int(usage["STACK"]), "shared_bytes": compiled.metadata.shared,
            "programs_per_sm_by_registers": REGISTERS_PER_SM // (-(-registers * 32 // 256) * 256 * warps)}


def launches(name: str, rows: int, sms: int, pdl: bool) -> list[tuple[str, object, dict, int, int | None]]:
    """(what, kernel, constants, warps, stages) of one decode step's launches of ``rows`` rows
    on a GPU of ``sms`` multiprocessors, from the functions the step's launches call."""
    hidden, inter, heads, kv_heads, head_dim, bias = layer_shape(name)
    out = []
    for what, n, k, gated, norm, has_bias, residual in (
            ("q/k/v", (heads + 2 * kv_heads) * head_dim, hidden, False, True, bias, False),
            ("output", hidden, heads * head_dim, False, False, False, True),
            ("gate/up", inter, hidden, True, True, False, False),
            ("down", hidden, inter, False, False, False, True)):
        config = K.gemv_config(n, k, rows, gated, norm)
        block_n, block_k, warps, stages = config
        flags = dict(NORM=norm, BIAS=has_bias, RESIDUAL=residual, GATED=gated, BLOCK_N=block_n, BLOCK_K=block_k)
        if K.takes_row_kernel(rows, n, k, gated):
            constants = dict(flags, BLOCK_M=K.row_block_m(rows), PDL=pdl, WEIGHTS_FIRST=K.weights_first(n, k, gated))
            out.append((what, K._gemv_rows_kernel, constants, warps, stages))
        else:  # the tiles of the launch (a split named so that no device is asked), split for ``sms``
            block_m, tiles, _ = K.tensor_core_launch(rows, n, k, (*config, 1), device=None)
            split = K.split_for(tiles[0] * tiles[1], triton.cdiv(k, block_k), sms)
            out.append((what, K._gemv_dot_kernel, dict(flags, BLOCK_M=block_m, SPLIT_K=split), warps, stages))
    # The chunk kernel signals the L2 prefetcher where the step runs one (sm_90 has the prefetch).
    signal = K.L2_PREFETCH and fused.PREFETCH_L2_SHARE > 0
    chunk, merge = K.attention_launch(rows, heads, kv_heads, head_dim, CACHE, pdl, signal=signal)
    for what, kernel, constants in (("attention chunks", K._attention_chunk_kernel, chunk),
                                    ("attention merge", K._attention_combine_kernel, merge)):
        constants = dict(constants)
        out.append((what, kernel, constants, constants.pop("num_warps"), None))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    ap.add_argument("--models", default=",".join(MODELS), help="models of benchmarks/step_cost.py")
    ap.add_argument("--sms", type=int, default=132, help="the GPU's multiprocessors (H100 SXM and H200: 132)")
    ap.add_argument("--rows", default="1,5", help="tokens a step (1: sampling and drafting; 5: a verification)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        for n in (int(r) for r in args.rows.split(",")):
            # programmatic dependent launch from Hopper on, as decode_kernels._pdl decides on a device
            for what, kernel, constants, warps, stages in launches(name, n, args.sms, args.arch >= 90):
                usage = resources(kernel, constants, warps, stages, args.arch)
                rows.append({"model": name, "rows": n, "launch": what, "kernel": kernel.fn.__name__, "warps": warps,
                             "split_k": constants.get("SPLIT_K"), **usage, "arch": f"sm_{args.arch}",
                             "triton": triton.__version__})
                print(f"{name:14s} {n} {what:17s} {usage['registers']:3d} registers, "
                      f"{usage['spill_bytes']:5d} B spilled", flush=True)
    print_table(["model", "rows", "launch", "warps", "registers", "spilled B/thread", "shared B", "programs/SM"],
                [[r["model"], r["rows"], r["launch"], r["warps"], r["registers"], r["spill_bytes"], r["shared_bytes"],
                  r["programs_per_sm_by_registers"]] for r in rows])
    write_result(args.out, rows)


if __name__ == "__main__":
    main()
