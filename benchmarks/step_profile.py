"""Where one decode step's GPU time goes, kernel by kernel, and what a few layer variants cost.

    python benchmarks/step_profile.py [--models qwen2.5-1.5b,smollm2-135m] [--variants default,...]
        [--out PATH]

For each random-weight model shape of ``benchmarks/step_cost.py`` (batch 1, a
cache of 1,024 positions with 256 filled, one token fed) and each variant of
the fused decode forward: the median time of a CUDA-graph replay, and from
torch.profiler over 20 eager forwards of the same compiled code, every kernel's
mean time per step, grouped by name, so the table says which kernels of a layer
dominate and how far each is from its bytes. Variants are tried side by side in
one process (the default first):

- ``default``: what the decoders run (``decoders.decode_kernels``: six Triton
  kernels a layer, each launched to overlap the one before: programmatic
  dependent launch).
- ``no-pdl``: the same kernels launched one after another.
- ``weights-after-wait``: the row kernel waits for the kernel before it, then reads its
  first weight tile; ``weights-first-2e22``, ``-2e23``, ``-2e24``, ``-all``: it reads the
  tile first for matrices of at most 2**22, 2**23, 2**24 weights, or every matrix
  (``decode_kernels.WEIGHTS_FIRST_MAX``; ``default`` is the module's bound).
- ``no-prefetch``, ``prefetch-15``, ``-25``, ``-40``, ``-60``: the same kernels with none,
  or that percentage of L2, of each layer's weights read after its attention prefetched
  into L2 beside the step (``fused.PREFETCH_L2_SHARE``; ``default`` is the module's share).
- ``row-kernel``: every product of the step on the CUDA-core row kernel, whatever its
  rows (``decode_kernels.ROW_KERNEL_ROWS`` raised to ``--tokens``).
- ``tensor-core``: every product of a step of 2+ rows on the tensor-core kernel (the
  rule before ``decode_kernels.takes_row_kernel`` kept small matrices of up to
  ``SMALL_MATRIX_ROWS`` rows on the row kernel).
- ``small-matrix-rows``: every matrix of at most ``decode_kernels.SMALL_MATRIX`` weights
  on the row kernel at the step's rows (``SMALL_MATRIX_ROWS`` raised to ``--tokens``), the
  larger ones on the tensor-core kernel; at 3 tokens or fewer the same as ``default``.
- ``attention-warps-8``: the attention's chunk kernel in 8 warps (``decode_kernels.ATTENTION_WARPS``).
- ``compiled-layer``: the layer under ``torch.compile`` in three regions with
  coordinate-descent tuning (``fused.compiled_layer``, the form before the kernels).
- ``one-region``: the whole layer as one compiled function (the form before
  ``fused.compiled_layer`` split it into three regions).
- ``no-cdt``: the compiled layer without coordinate-descent tuning.
- ``sdpa``: attention through ``F.scaled_dot_product_attention`` (one kernel)
  instead of matmul, softmax, matmul.
- ``stack``: all layers in one compiled function (fusions across layers).
- ``autotune``: the layer under ``mode="max-autotune-no-cudagraphs"``.

``--loop`` also times the ``sampling`` decoder's whole loop on the same model
(greedy and T=1 with top-k 10, top-p 0.9; a 256-token prompt): ms per token,
beside the step's replay, so what the decoder adds to its forward (the sampling
draw, buffer copies, the host) is measured in the same process; ``--loop-variants``
times it under each variant named (any of ``LOOP_VARIANTS``: ``default``, ``attention-warps-8``,
the weights-first and the prefetch ones), and ``--energy`` adds its joules per token (Zeus, one window over about three
seconds of generations per variant and setting).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import CACHE, FILLED, build, copy_bandwidth, replay_ms  # noqa: E402

from decoders import decode_kernels, fused, get_decoder, static  # noqa: E402

VARIANTS = ("default", "no-pdl", "compiled-layer", "one-region", "no-cdt", "sdpa", "stack", "autotune")
# The decode kernels with each layer's attention prefetching this share of L2 with the
# weights read next (fused.PREFETCH_L2_SHARE; 0: none).
PREFETCH_VARIANTS = {"no-prefetch": 0.0, "prefetch-15": 0.15, "prefetch-25": 0.25, "prefetch-40": 0.4,
                     "prefetch-60": 0.6}
# The row kernel's first weight tile before its wait for matrices of at most this many
# weights (decode_kernels.WEIGHTS_FIRST_MAX; 0: never, the kernel waits first).
WEIGHTS_FIRST_VARIANTS = {"weights-after-wait": 0, "weights-first-2e22": 2**22, "weights-first-2e23": 2**23,
                          "weights-first-2e24": 2**24, "weights-first-all": 2**62}
KERNEL_VARIANTS = ("default", "no-pdl", "row-kernel", "tensor-core", "small-matrix-rows", "attention-warps-8",
                   *PREFETCH_VARIANTS, *WEIGHTS_FIRST_VARIANTS)
# Variants the sampling loop can run under (--loop-variants).
LOOP_VARIANTS = ("default", "attention-warps-8", *PREFETCH_VARIANTS, *WEIGHTS_FIRST_VARIANTS)


def sdpa_attention(x, cos, sin, mask, keys, values, positions, ln1, qkv_w, qkv_b, o_w, o_b, ln2, *,
                   heads: int, kv_heads: int, eps: float):
    """``fused.attention_block`` with its three attention kernels replaced by one SDPA call."""
    rows, n, _ = x.shape
    head_dim = keys.shape[-1]
    q, k, v = F.linear(fused._rms_norm(x, ln1, eps), qkv_w, qkv_b).split(
        [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = fused._rotate(q.view(rows, n, heads, head_dim).transpose(1, 2), cos, sin)
    keys.index_copy_(2, positions, fused._rotate(k.view(rows, n, kv_heads, head_dim).transpose(1, 2), cos, sin))
    values.index_copy_(2, positions, v.view(rows, n, kv_heads, head_dim).transpose(1, 2))
    # mask holds the n rows of the additive mask once per query head of a group: the first n are the mask.
    attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:n].to(q.dtype),
                                          enable_gqa=heads > kv_heads)
    x = x + F.linear(attn.transpose(1, 2).reshape(rows, n, heads * head_dim), o_w, o_b)
    return x, fused._rms_norm(x, ln2, eps)


# The decode kernels' module settings as the decoders run them, read before any variant
# changes them.
DEFAULT_SETTINGS = dict(prefetch=fused.PREFETCH_L2_SHARE, weights_first=decode_kernels.WEIGHTS_FIRST_MAX,
                        pdl=decode_kernels.PDL, rows=decode_kernels.ROW_KERNEL_ROWS,
                        small_rows=decode_kernels.SMALL_MATRIX_ROWS, attention_warps=decode_kernels.ATTENTION_WARPS)


def set_kernel_settings(variant: str, tokens: int) -> None:
    """Set the decode kernels' module settings ``variant`` names, every other one as the
    decoders run them (all of them for ``default``); ``tokens``: the step's rows, which
    ``row-kernel`` puts on the CUDA-core row kernel (``small-matrix-rows``: its small matrices)."""
    d = DEFAULT_SETTINGS
    fused.PREFETCH_L2_SHARE = PREFETCH_VARIANTS.get(variant, d["prefetch"])
    decode_kernels.WEIGHTS_FIRST_MAX = WEIGHTS_FIRST_VARIANTS.get(variant, d["weights_first"])
    decode_kernels.PDL = d["pdl"] and variant != "no-pdl"
    decode_kernels.ROW_KERNEL_ROWS = max(tokens, d["rows"]) if variant == "row-kernel" else d["rows"]
    # tensor-core: no small matrix of 2+ rows kept on the row kernel; small-matrix-rows: all of them
    small_rows = {"tensor-core": d["rows"], "small-matrix-rows": max(tokens, d["small_rows"])}
    decode_kernels.SMALL_MATRIX_ROWS = small_rows.get(variant, d["small_rows"])
    decode_kernels.ATTENTION_WARPS = 8 if variant == "attention-warps-8" else d["attention_warps"]


def set_variant(name: str) -> None:
    """Point ``fused.compiled_layer()`` at the variant's layer (``stack`` wraps the engine instead).

    ``decoder_layer`` compiled as one function (eager regions, traced through) is the
    one-region form; ``sdpa`` and ``autotune`` are one region too.
    """
    fused._compiled_layer = None
    torch._dynamo.reset()
    if name == "sdpa":
        layer = functools.partial(fused.decoder_layer, regions=(sdpa_attention, fused.mlp_in, fused.mlp_out))
        fused._compiled_layer = torch.compile(layer, fullgraph=True)
    elif name == "one-region":
        fused._compiled_layer = torch.compile(fused.decoder_layer, fullgraph=True)
    elif name == "autotune":
        fused._compiled_layer = torch.compile(fused.decoder_layer, fullgraph=True,
                                              mode="max-autotune-no-cudagraphs")


class _Stacked:
    """An engine whose whole forward (every layer) is one compiled function."""

    def __init__(self, engine: fused.FusedForward) -> None:
        self.engine = engine
        self._compiled = torch.compile(self._eager, fullgraph=False)

    def _eager(self, tokens, positions, mask, keep, features=None, hidden=False):
        return self.engine(tokens, positions, mask, keep, False, features=features, hidden=hidden)

    def __call__(self, tokens, positions, mask, keep, compiled=False, features=None, hidden=False):
        return self._compiled(tokens, positions, mask, keep, features=features, hidden=hidden)

    def takes_kernels(self, rows: int, compiled: bool) -> bool:
        return False  # its layers are compiled: they read the mask


def kernel_table(cache: static.StaticCachedModel, n: int, steps: int = 20) -> list[dict]:
    """Mean microseconds per step of every kernel name, over ``steps`` eager compiled ``n``-token forwards."""
    tokens = torch.randint(0, 1000, (1, n), device="cuda")
    forward = cache._compiled_forward or cache._forward
    cache._start.fill_(FILLED)
    forward((tokens,), n)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            forward((tokens,), n)
        torch.cuda.synchronize()
    total = collections.defaultdict(float)
    count = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.name] += e.device_time if hasattr(e, "device_time") else e.cuda_time
            count[e.name] += 1
    rows = [{"kernel": k[:90], "us_per_step": total[k] / steps, "calls_per_step": count[k] / steps,
             "us_per_call": total[k] / count[k]} for k in total]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def loop_ms_per_token(model: torch.nn.Module, filters: dict, tokens: int = 128,
                      meter=None) -> tuple[float, float | None]:
    """Wall ms per token of ``sampling``'s loop: generations of ``tokens + 8`` and 8
    tokens after the same prompt, differenced (the prompt's forward cancels); and with
    an energy ``meter``, joules per generated token over one window of generations of
    ``tokens + 8`` lasting about three seconds (prompt forwards included, alike for
    every variant)."""
    dec = get_decoder("sampling", target=model, **filters)
    device = next(model.parameters()).device
    prompt = torch.randint(0, 1000, (1, FILLED), device=device)
    dec.generate(prompt, tokens + 8, torch.Generator().manual_seed(0))  # captures every shape
    times = {}
    for n in (8, tokens + 8):
        runs = []
        for seed in range(3):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = dec.generate(prompt, n, torch.Generator().manual_seed(seed))
            torch.cuda.synchronize(device)
            assert len(out.tokens) == n, "the loop stopped early"
            runs.append(time.perf_counter() - t0)
        times[n] = min(runs)
    ms = 1e3 * (times[tokens + 8] - times[8]) / tokens
    if meter is None:
        return ms, None
    generations = max(3, round(3.0 / times[tokens + 8]))
    meter.begin("loop")
    for seed in range(generations):
        dec.generate(prompt, tokens + 8, torch.Generator().manual_seed(seed))
    window = meter.end("loop")
    return ms, window.total_j / (generations * (tokens + 8))


def repeat_key(table: dict, key: str) -> str:
    """``key``, or ``key#2``, ``key#3``... where a variant named again (an A/B alternation:
    ``--variants a,b,a,b``) would overwrite an earlier measurement."""
    n = 1
    while (f"{key}#{n}" if n > 1 else key) in table:
        n += 1
    return f"{key}#{n}" if n > 1 else key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="qwen2.5-1.5b,smollm2-135m")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--table-variants", default="default", help="variants whose kernel table is printed")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=1, help="tokens per step (gamma + 1 for a verification)")
    ap.add_argument("--kernel-rows", type=int, default=None,
                    help="steps of up to this many rows take the decode kernels (default: fused.KERNEL_ROWS)")
    ap.add_argument("--loop", action="store_true", help="also time the sampling decoder's loop per token")
    ap.add_argument("--loop-variants", default="default",
                    help=f"with --loop: the loop under each of these ({', '.join(LOOP_VARIANTS)})")
    ap.add_argument("--energy", action="store_true", help="with --loop: joules per token too (needs zeus)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    for what, given, known in (("--variants", args.variants, VARIANTS + KERNEL_VARIANTS),
                               ("--loop-variants", args.loop_variants, LOOP_VARIANTS)):
        unknown = set(given.split(",")) - set(known)
        if unknown:  # an unknown name would run some other variant under its label
            ap.error(f"{what}: unknown {', '.join(sorted(unknown))} (known: {', '.join(dict.fromkeys(known))})")
    meter = None
    if args.energy:
        from harness.energy import EnergyMeter

        meter = EnergyMeter([torch.cuda.current_device()])
    if args.kernel_rows is not None:
        fused.KERNEL_ROWS = args.kernel_rows
    bandwidth = copy_bandwidth()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth_Bps": bandwidth,
              "tokens": args.tokens, "models": {}}
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    if meter is not None:
        result["idle_power_w"] = meter.idle_power_w()
        print(f"idle power {result['idle_power_w']:.0f} W", flush=True)
    table_variants = set(args.table_variants.split(","))
    with torch.inference_mode():
        for name in args.models.split(","):
            model = build(name)
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            floor_ms = 1e3 * weight_bytes / bandwidth
            entry = result["models"][name] = {"weight_floor_ms": floor_ms, "variants": {}}
            for variant in args.variants.split(","):
                t0 = time.perf_counter()
                try:
                    set_variant(variant)
                    set_kernel_settings(variant, args.tokens)
                    cache = static.StaticCachedModel(model, 1, CACHE, graphs=True, compile=variant != "stack")
                    cache.engine.kernels = cache.engine.kernels and variant in KERNEL_VARIANTS
                    if variant == "stack":
                        cache.engine = _Stacked(cache.engine)
                        cache.compiled = True
                    patch = inductor_config.patch(coordinate_descent_tuning=variant != "no-cdt")
                    with patch:
                        cache(torch.randint(0, 1000, (1, FILLED), device="cuda"), keep=1)
                        ms = replay_ms(cache, args.tokens, args.repeats)
                        setup_s = time.perf_counter() - t0
                        row = {"ms": ms, "x_weight_floor": ms / floor_ms, "setup_s": setup_s}
                        print(f"{name:14s} {variant:9s} {ms:.3f} ms ({ms / floor_ms:.2f}x weight floor "
                              f"{floor_ms:.3f}), set-up {setup_s:.0f} s", flush=True)
                        if variant in table_variants:
                            table = kernel_table(cache, args.tokens)
                            row["kernels"] = table
                            summed = sum(r["us_per_step"] for r in table)
                            print(f"  kernels: {sum(r['calls_per_step'] for r in table):.0f} per step, "
                                  f"{summed / 1e3:.3f} ms summed (graph replay {ms:.3f} ms)")
                            for r in table[:24]:
                                print(f"  {r['us_per_step']:8.1f} us/step {r['calls_per_step']:5.1f}x "
                                      f"{r['us_per_call']:6.2f} us  {r['kernel']}")
                    entry["variants"][repeat_key(entry["variants"], variant)] = row
                except Exception as exc:  # a variant that does not compile must not cost the others
                    error = f"{type(exc).__name__}: {str(exc)[:300]}"
                    print(f"{name:14s} {variant:9s} failed: {error}", flush=True)
                    traceback.print_exc()
                    entry["variants"][repeat_key(entry["variants"], variant)] = {"error": error}
                finally:
                    static.release_all()
                    fused._compiled_layer = None
                    set_kernel_settings("default", args.tokens)
                if args.out:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(result, indent=1))
            if args.loop:
                for variant in args.loop_variants.split(","):
                    set_kernel_settings(variant, args.tokens)
                    suffix = "" if variant == "default" else f"_{variant}"
                    for setting, filters in (("greedy", {"temperature": 0.0}),
                                             ("t1", {"temperature": 1.0, "top_k": 10, "top_p": 0.9})):
                        ms, joules = loop_ms_per_token(model, filters, meter=meter)
                        entry[repeat_key(entry, f"sampling_loop_{setting}{suffix}_ms_per_token")] = ms
                        energy = ""
                        if joules is not None:
                            entry[repeat_key(entry, f"sampling_loop_{setting}{suffix}_j_per_token")] = joules
                            energy = f", {joules:.3f} J/token"
                        print(f"{name:14s} sampling loop, {variant}, {setting}: {ms:.3f} ms/token{energy}",
                              flush=True)
                    static.release_all()
                set_kernel_settings("default", args.tokens)
                if args.out:
                    args.out.write_text(json.dumps(result, indent=1))
            del model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
