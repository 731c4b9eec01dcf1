"""Speed and energy of the decoders on one GPU, against transformers' own loops.

    python benchmarks/gpu_decoding.py [--sections anchor,pair,energy] [--new-tokens 128]
        [--prompts 8] [--repeats 3] [--pair-rounds 1] [--energy-rounds 2] [--out PATH]

Everything is measured side by side in one process on one GPU, and reported as
ratios (the machine is shared and noisy):

- ``anchor``: ``sampling`` (greedy) against HF ``generate`` (greedy) on a
  Llama-2-7B-shaped bf16 model with random weights, batch 1, 128-token prompt;
  ms/token of each, per whole call (prefill included) and per decode step
  ((T(n) - T(1)) / (n - 1)), and as multiples of the HBM roofline
  (weight bytes / 3.35 TB/s). Our fast path is timed with CUDA graphs alone and
  with ``torch.compile`` before capture; our plain path (eager forwards over a
  dynamic cache) is timed too.
- ``pair``: ``specdecode`` against HF assisted generation
  (``generate(assistant_model=...)``, constant ``num_assistant_tokens`` = gamma,
  no confidence cut-off) on the real pair (SmolLM2-135M-Instruct + the distilled
  draft, bf16), greedy and at temperature 1, same prompts, same gamma.
- ``energy``: ``mtad`` against ``specdecode`` on the real pair at the MTAD
  reference settings (T=1, top-k 10, top-p 0.9, gamma 4, beam 4, tau 0.5):
  tokens/s and J/token from Zeus windows, one window per decoder sweep over all
  prompts (several seconds each), decoders alternated for ``--rounds`` rounds;
  the monitoring overhead is the windows' host time over the sweeps' wall time.

Writes ``benchmarks/results/gpu-decoding-<gpu>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from decoders import get_decoder, static
from harness.energy import EnergyMeter
from harness.models import load_models
from harness.profile_spec import PromptsSpec
from harness.prompts import tokenize_prompts
from harness.sysinfo import environment

ROOT = Path(__file__).resolve().parent.parent
HBM_BYTES_PER_S = 3.35e12  # H100 SXM datasheet; the roofline the issue quotes
PAIR = ("builtin:smollm2-135m-instruct", "builtin:smollm2-135m-draft")
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def timed(fn, repeats: int) -> list[float]:
    """Wall seconds of ``fn()`` (device work included), ``repeats`` times."""
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def ours(name, target, draft, compile_model=False, cuda_graphs=True, **params):
    dec = get_decoder(name, target=target, draft=draft, cuda_graphs=cuda_graphs, **params)
    dec.compile_model = compile_model
    return dec


def bench_anchor(args) -> dict:
    """sampling vs HF generate on the 7B shape, both greedy."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(LlamaConfig(**LLAMA2_7B)).eval()
    finally:
        torch.set_default_dtype(default)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    roofline_ms = 1e3 * weight_bytes / HBM_BYTES_PER_S
    prompt = torch.randint(0, LLAMA2_7B["vocab_size"], (1, 128), device="cuda")
    n = args.new_tokens
    greedy = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
    results: dict = {"weight_bytes": weight_bytes, "roofline_ms_per_token": roofline_ms,
                     "prompt_tokens": 128, "new_tokens": n}
    def hf(new_tokens=n):
        return model.generate(prompt, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=0)

    def measure(key, generate, repeats):
        """ms/token of a whole call (prefill included) and per decode step:
        (T(n) - T(1)) / (n - 1), which removes the prefill and first token."""
        whole = statistics.median(timed(generate, repeats))
        first = statistics.median(timed(lambda: generate(1), repeats))
        results[f"{key}_ms_per_token"] = 1e3 * whole / n
        results[f"{key}_decode_ms_per_token"] = 1e3 * (whole - first) / (n - 1)

    with torch.inference_mode():
        hf_tokens = hf()[0, 128:].tolist()
        measure("hf_generate", hf, args.repeats)
        variants = {"sampling_fast": ours("sampling", model, None, **greedy),
                    "sampling_fast_compiled": ours("sampling", model, None, compile_model=True, **greedy),
                    "sampling_plain": ours("sampling", model, None, cuda_graphs=False, **greedy)}
        for key, dec in variants.items():
            t0 = time.perf_counter()
            out = dec.generate(prompt, n)  # warm-up: captures (and compiles) the decode step
            dec.generate(prompt, 1)  # and the prefill-only path
            results[f"{key}_first_call_s"] = time.perf_counter() - t0
            measure(key, lambda new_tokens=n, dec=dec: dec.generate(prompt, new_tokens),
                    1 if key.endswith("plain") else args.repeats)
            results[f"{key}_same_tokens_as_hf"] = _agreeing_prefix(out.tokens.tolist(), hf_tokens) / n
    for key in [k for k in results if k.endswith("_ms_per_token") and k != "roofline_ms_per_token"]:
        results[key.replace("_ms_per_token", "_x_roofline")] = results[key] / roofline_ms
    for key in ("sampling_fast", "sampling_fast_compiled"):
        for kind in ("", "_decode"):
            results[f"speedup_{key}{kind}_vs_hf_generate"] = (results[f"hf_generate{kind}_ms_per_token"]
                                                              / results[f"{key}{kind}_ms_per_token"])
    static.release_all(model)
    model = None  # free the 13.5 GB before the pair loads
    gc.collect()
    torch.cuda.empty_cache()
    return results


def _agreeing_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def load_pair_and_prompts(args):
    pair = load_models(*PAIR, dtype="bfloat16", device="cuda")
    spec = PromptsSpec(file="prompts/chat.jsonl", field="prompt", id_field="id", chat_template=True,
                       limit=args.prompts)
    prompts = [p.input_ids.cuda() for p in tokenize_prompts(spec, str(ROOT / "profiles"), pair.tokenizer)]
    return pair, prompts


def sweep(generate, prompts) -> tuple[float, int]:
    """(seconds, new tokens) of ``generate(prompt, seed)`` over all prompts."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = sum(generate(p, i) for i, p in enumerate(prompts))
    torch.cuda.synchronize()
    return time.perf_counter() - t0, tokens


def bench_pair(args, pair, prompts) -> dict:
    """specdecode vs HF assisted generation, greedy and at T=1, gamma 4."""
    gamma, n, eos = 4, args.new_tokens, pair.tokenizer.eos_token_id
    cfg = pair.draft.generation_config
    cfg.num_assistant_tokens, cfg.num_assistant_tokens_schedule, cfg.assistant_confidence_threshold = \
        gamma, "constant", 0.0
    results: dict = {"gamma": gamma, "new_tokens": n, "prompts": len(prompts)}
    for mode, filt in {"greedy": {"temperature": 0.0, "top_k": 0, "top_p": 1.0},
                       "t1": {"temperature": 1.0, "top_k": 0, "top_p": 1.0}}.items():
        sample = filt["temperature"] > 0
        hf_kwargs = dict(assistant_model=pair.draft, max_new_tokens=n, eos_token_id=eos,
                         pad_token_id=eos, do_sample=sample)
        if sample:
            hf_kwargs.update(temperature=1.0, top_k=0, top_p=1.0)

        def hf(prompt, seed, kw=hf_kwargs):
            torch.manual_seed(seed)
            return pair.target.generate(prompt, **kw).shape[1] - prompt.shape[1]

        decs = {"specdecode_fast": ours("specdecode", pair.target, pair.draft, gamma=gamma, **filt),
                "specdecode_plain": ours("specdecode", pair.target, pair.draft, gamma=gamma, cuda_graphs=False,
                                         **filt)}
        stats = {}

        def run(dec, prompt, seed, stats=stats, key=None):
            out = dec.generate(prompt, n, torch.Generator().manual_seed(seed), eos)
            stats.setdefault(key, []).extend(out.steps)
            return len(out.tokens)

        with torch.inference_mode():
            hf(prompts[0], 0)  # warm-up
            for dec in decs.values():
                run(dec, prompts[0], 0, key="warmup")
            times: dict[str, list] = {}
            for _ in range(args.pair_rounds):  # alternate, so drift hits all alike
                times.setdefault("hf_assisted", []).append(sweep(hf, prompts))
                for key, dec in decs.items():
                    times.setdefault(key, []).append(
                        sweep(lambda p, i, dec=dec, key=key: run(dec, p, i, key=key), prompts))
        for key, runs in times.items():
            secs, toks = sum(t for t, _ in runs), sum(k for _, k in runs)
            results[f"{mode}_{key}_tokens_per_s"] = toks / secs
        for key in decs:
            steps = stats[key]
            results[f"{mode}_{key}_mean_accepted"] = sum(s.accepted for s in steps) / len(steps)
        results[f"{mode}_speedup_vs_hf_assisted"] = (results[f"{mode}_specdecode_fast_tokens_per_s"]
                                                     / results[f"{mode}_hf_assisted_tokens_per_s"])
    return results


def bench_energy(args, pair, prompts) -> dict:
    """mtad vs specdecode at the MTAD reference settings: tokens/s and J/token."""
    meter = EnergyMeter([torch.cuda.current_device()])
    filt = {"temperature": 1.0, "top_k": 10, "top_p": 0.9}
    decs = {"specdecode": ours("specdecode", pair.target, pair.draft, gamma=4, **filt),
            "mtad": ours("mtad", pair.target, pair.draft, gamma=4, beam_width=4, accept_thres=0.5, **filt)}
    eos, n = pair.tokenizer.eos_token_id, args.new_tokens
    totals = {k: {"s": 0.0, "tokens": 0, "j": 0.0, "overhead_s": 0.0, "accepted": 0, "steps": 0} for k in decs}
    with torch.inference_mode():
        for dec in decs.values():
            dec.generate(prompts[0], n, torch.Generator().manual_seed(0), eos)  # warm-up, captures graphs
        for r in range(args.energy_rounds):
            for key, dec in decs.items():
                tot = totals[key]

                def run(prompt, i, dec=dec, tot=tot, r=r):
                    out = dec.generate(prompt, n, torch.Generator().manual_seed(1000 * r + i), eos)
                    tot["accepted"] += sum(s.accepted for s in out.steps)
                    tot["steps"] += len(out.steps)
                    return len(out.tokens)

                meter.begin(f"{key}-{r}")
                secs, toks = sweep(run, prompts)
                window = meter.end(f"{key}-{r}")
                tot["s"] += window.time_s
                tot["tokens"] += toks
                tot["j"] += window.total_j
                tot["overhead_s"] += window.overhead_s
    results: dict = {"settings": {**filt, "gamma": 4, "beam_width": 4, "accept_thres": 0.5},
                     "rounds": args.energy_rounds, "new_tokens": n, "prompts": len(prompts)}
    for key, tot in totals.items():
        results[f"{key}_tokens_per_s"] = tot["tokens"] / tot["s"]
        results[f"{key}_j_per_token"] = tot["j"] / tot["tokens"]
        results[f"{key}_mean_power_w"] = tot["j"] / tot["s"]
        results[f"{key}_mean_accepted"] = tot["accepted"] / tot["steps"]
        results[f"{key}_window_s"] = tot["s"] / args.energy_rounds
        results[f"{key}_monitor_overhead"] = tot["overhead_s"] / tot["s"]
    results["mtad_speedup_vs_specdecode"] = results["mtad_tokens_per_s"] / results["specdecode_tokens_per_s"]
    results["mtad_energy_ratio_vs_specdecode"] = results["specdecode_j_per_token"] / results["mtad_j_per_token"]
    return results


def table(result: dict) -> str:
    """The README's table."""
    a, p, e = result.get("anchor"), result.get("pair"), result.get("energy")
    rows = ["| comparison | ours | reference | ratio |", "|---|---|---|---|"]
    if a:
        for kind, what in (("", "per token, whole call"), ("_decode", "per decode step")):
            hf = a[f"hf_generate{kind}_ms_per_token"]
            for key, how in (("sampling_fast", "graphs"), ("sampling_fast_compiled", "compile + graphs")):
                rows.append(f"| 7B shape, greedy, ms {what} (roofline {a['roofline_ms_per_token']:.2f}) | "
                            f"sampling, {how}: {a[f'{key}{kind}_ms_per_token']:.2f} "
                            f"({a[f'{key}{kind}_x_roofline']:.2f}x roofline) | HF generate {hf:.2f} "
                            f"({a[f'hf_generate{kind}_x_roofline']:.2f}x) | "
                            f"{a[f'speedup_{key}{kind}_vs_hf_generate']:.2f}x faster |")
    if p:
        for mode in ("greedy", "t1"):
            rows.append(f"| real pair {mode}, gamma 4, tokens/s | specdecode "
                        f"{p[f'{mode}_specdecode_fast_tokens_per_s']:.0f} | HF assisted "
                        f"{p[f'{mode}_hf_assisted_tokens_per_s']:.0f} | {p[f'{mode}_speedup_vs_hf_assisted']:.2f}x |")
    if e:
        rows.append(f"| real pair MTAD settings, tokens/s | mtad {e['mtad_tokens_per_s']:.0f} | specdecode "
                    f"{e['specdecode_tokens_per_s']:.0f} | {e['mtad_speedup_vs_specdecode']:.2f}x |")
        rows.append(f"| real pair MTAD settings, J/token | mtad {e['mtad_j_per_token']:.4f} | specdecode "
                    f"{e['specdecode_j_per_token']:.4f} | {e['mtad_energy_ratio_vs_specdecode']:.2f}x less |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="anchor,pair,energy")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per anchor variant (median)")
    ap.add_argument("--pair-rounds", type=int, default=1, help="alternating rounds of the pair section's sweeps")
    ap.add_argument("--energy-rounds", type=int, default=2, help="alternating rounds of the energy windows")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    sections = set(args.sections.split(","))
    result: dict = {"command": "python benchmarks/gpu_decoding.py " + " ".join(sys.argv[1:]),
                    "environment": environment([torch.device("cuda")])}
    if "anchor" in sections:
        result["anchor"] = bench_anchor(args)
        print(json.dumps(result["anchor"], indent=2), flush=True)
    if sections & {"pair", "energy"}:
        pair, prompts = load_pair_and_prompts(args)
        if "pair" in sections:
            result["pair"] = bench_pair(args, pair, prompts)
            print(json.dumps(result["pair"], indent=2), flush=True)
        if "energy" in sections:
            result["energy"] = bench_energy(args, pair, prompts)
            print(json.dumps(result["energy"], indent=2), flush=True)
    result["table"] = table(result)
    gpu = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"gpu-decoding-{gpu}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(result["table"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
