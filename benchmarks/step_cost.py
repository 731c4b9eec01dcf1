"""What one decode forward costs on this GPU, by execution path, against its floor.

    python benchmarks/step_cost.py [--models smollm2-135m,qwen2.5-1.5b] [--paths hf,fused,fused-compiled]
        [--shapes 1,5] [--repeats 200] [--out PATH]

Random-weight bf16 models with the real models' shapes (speed does not depend
on the weights' values), batch 1, a cache of 1,024 positions with 256 filled.
For every model, path and step shape (tokens fed = logits kept: 1 for a decode
step, gamma + 1 for a verification), the median time of a CUDA-graph replay,
the number of kernels one eager forward launches (torch.profiler), and the
floor: the bytes a step must read (weights plus the KV cache it attends over)
divided by the device-to-device copy bandwidth measured in the same process.
Paths: ``hf`` (the model's own forward over transformers' StaticCache),
``fused`` (``decoders.fused``), ``fused-compiled`` (the same under
``torch.compile``; its compile time is reported). Also times the sampling
filter (T=1, top-k 10, top-p 0.9) over each vocabulary. Writes JSON and prints
a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from decoders import probs as P
from decoders import static

SHAPES = {
    "smollm2-135m": (LlamaForCausalLM, LlamaConfig, dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0)),
    # The distilled SmolLM2 draft (harness/assets/smollm2_draft): nine of the target's layers, its own head.
    "smollm2-135m-draft": (LlamaForCausalLM, LlamaConfig, dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=9, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=False, rope_theta=100000.0)),
    "qwen2.5-0.5b": (Qwen2ForCausalLM, Qwen2Config, dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen2.5-1.5b": (Qwen2ForCausalLM, Qwen2Config, dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0)),
    "llama2-7b": (LlamaForCausalLM, LlamaConfig, dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32)),
}
CACHE, FILLED = 1024, 256


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy (read + write) of 1 GiB, best of 10."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * a.numel() / best


def build(name: str) -> torch.nn.Module:
    cls, config_cls, kwargs = SHAPES[name]
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return cls(config_cls(max_position_embeddings=4096, **kwargs)).eval()
    finally:
        torch.set_default_dtype(default)


def replay_ms(cache: static.StaticCachedModel, n: int, repeats: int) -> float:
    """Median ms of one graph replay of an ``n``-token forward at position FILLED."""
    tokens = torch.randint(0, 1000, (1, n), device="cuda")
    times = []
    for i in range(repeats + 3):  # the first call captures
        cache.crop(FILLED)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        cache(tokens, keep=n)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernels_per_forward(cache: static.StaticCachedModel, n: int) -> int:
    tokens = torch.randint(0, 1000, (1, n), device="cuda")
    cache.crop(FILLED)
    cache._start.fill_(FILLED)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        cache._forward((tokens,), n)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def filter_ms(vocab: int, rows: int, repeats: int) -> dict:
    logits = torch.randn(rows, vocab, device="cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    out = {}
    for key, (k, p) in {"top_k_top_p": (10, 0.9), "top_p_only": (0, 0.9), "greedy": (0, 1.0)}.items():
        temperature = 0.0 if key == "greedy" else 1.0
        fn = lambda t=temperature, k=k, p=p: P.sample(P.filtered_probs(logits, t, k, p), gen)  # noqa: E731
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        out[f"{key}_ms"] = 1e3 * (time.perf_counter() - t0) / repeats
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b,llama2-7b")
    ap.add_argument("--paths", default="hf,fused,fused-compiled")
    ap.add_argument("--shapes", default="1,5")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    bandwidth = copy_bandwidth()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth_Bps": bandwidth,
              "cache_positions": CACHE, "filled_positions": FILLED, "models": {}}
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    with torch.inference_mode():
        for name in args.models.split(","):
            model = build(name)
            config = model.config
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            head_dim = config.hidden_size // config.num_attention_heads
            kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * FILLED * 2
            floor_ms = 1e3 * (weight_bytes + kv_bytes) / bandwidth
            entry = {"weight_bytes": weight_bytes, "kv_bytes": kv_bytes, "floor_ms": floor_ms, "paths": {},
                     "filter": filter_ms(config.vocab_size, 5, args.repeats)}
            for path in args.paths.split(","):
                t0 = time.perf_counter()
                cache = static.StaticCachedModel(model, 1, CACHE, graphs=True, compile=path.endswith("compiled"),
                                                 fused=path.startswith("fused"))
                cache(torch.randint(0, 1000, (1, FILLED), device="cuda"), keep=1)
                row = {}
                for n in map(int, args.shapes.split(",")):
                    t1 = time.perf_counter()
                    ms = replay_ms(cache, n, args.repeats)
                    row[f"n{n}"] = {"ms": ms, "x_floor": ms / floor_ms, "warmup_s": time.perf_counter() - t1,
                                    "kernels": kernels_per_forward(cache, n) if not path.endswith("compiled") else None}
                    print(f"{name:14s} {path:15s} n={n}: {ms:.3f} ms ({ms / floor_ms:.2f}x floor {floor_ms:.3f}), "
                          f"kernels {row[f'n{n}']['kernels']}, warm-up {row[f'n{n}']['warmup_s']:.1f} s", flush=True)
                row["setup_s"] = time.perf_counter() - t0
                entry["paths"][path] = row
                del cache
                static.release_all()
            print(f"{name:14s} filter (5 rows): {entry['filter']}", flush=True)
            result["models"][name] = entry
            del model
            torch.cuda.empty_cache()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
