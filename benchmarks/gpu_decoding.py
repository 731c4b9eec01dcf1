"""Speed and energy of the decoders on one GPU, against transformers' own loops.

    python benchmarks/gpu_decoding.py [--sections pace,anchor,pair,energy] [--pairs smollm2,qwen]
        [--prompts 8] [--anchor-prompts 3] [--new-tokens 128] [--rounds 2] [--repeats 3] [--no-energy] [--out PATH]

Everything is measured side by side in one process on one GPU, and reported as
ratios (the machine is shared and noisy):

- ``pace`` (default): every decoder at its default execution settings
  (``sampling``, ``specdecode`` gamma 4, ``mtad`` at the MTAD reference
  settings, ``prompt_lookup``) on each pair (SmolLM2-135M + the distilled
  draft; Qwen2.5-Coder-1.5B + 0.5B, which needs ``scripts/setup.sh --qwen``),
  greedy and T=1 top-k 10 top-p 0.9, on chat prompts and on HumanEval problems:
  tokens/s, ms/token, tokens per target call, J/token (one Zeus window per
  sweep), the time by phase (draft / verify / accept / other), the warm-up
  (compile and capture) and each decoder's floor (its target and draft
  forwards at (weights + KV) bytes / the copy bandwidth measured in this
  process); HF ``generate`` and HF assisted generation as the anchors. Every
  decoder's sweeps run ``--rounds`` times (2 by default), the order reversed every
  other round, so that drift and the first place fall on every decoder alike; the
  table sums the rounds and gives the lowest and highest round's ratio beside it.
- ``anchor``: ``sampling`` (greedy) against HF ``generate`` (greedy) on a
  Llama-2-7B-shaped bf16 model with random weights, batch 1, 128-token prompt;
  ms/token of each, per whole call (prefill included) and per decode step
  ((T(n) - T(1)) / (n - 1)), and as multiples of the roofline (weight bytes /
  the measured copy bandwidth).
- ``pair``: ``specdecode`` against HF assisted generation on the SmolLM2 pair,
  greedy and at temperature 1, same prompts, same gamma.
- ``energy``: ``mtad`` against ``specdecode`` on the SmolLM2 pair at the MTAD
  reference settings, decoders alternated for ``--energy-rounds`` rounds.

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
from decoders.eagle import EagleHead
from decoders.timing import PHASES
from harness.energy import EnergyMeter
from harness.models import load_model, load_models
from harness.profile_spec import PromptsSpec
from harness.prompts import tokenize_prompts
from harness.sysinfo import environment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import copy_bandwidth  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PAIR = ("builtin:smollm2-135m-instruct", "builtin:smollm2-135m-draft")
PAIRS = {"smollm2": PAIR, "qwen": ("builtin:qwen2.5-coder-1.5b-instruct", "builtin:qwen2.5-coder-0.5b-instruct")}
SETTINGS = {"greedy": {"temperature": 0.0}, "t1": {"temperature": 1.0, "top_k": 10, "top_p": 0.9}}
METHODS = {"sampling": {}, "specdecode": {"gamma": 4}, "mtad": {"gamma": 4, "beam_width": 4, "accept_thres": 0.5},
           "prompt_lookup": {}, "eagle": {"gamma": 4}}
#: EAGLE heads by pair (a pair without one skips ``eagle``).
HEADS = {"smollm2": "builtin:smollm2-135m-eagle"}
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
    roofline_ms = 1e3 * weight_bytes / copy_bandwidth()
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


def model_bytes(model) -> int:
    """Bytes a decode step reads: every parameter once (a tied head is the embedding;
    an EAGLE head reads one row of the target's embeddings, not the table)."""
    skip = set()
    if isinstance(model, EagleHead):
        skip = {id(p) for p in model.model.embed_tokens.parameters()}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)


def kv_bytes_per_position(model) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * next(model.parameters()).element_size()


def pace_prompts(pair, args) -> dict[str, list[torch.Tensor]]:
    """Chat prompts (the project's chat set) and code prompts (HumanEval's first problems)."""
    sets = {"chat": PromptsSpec(file="prompts/chat.jsonl", field="prompt", id_field="id", chat_template=True,
                                limit=args.prompts),
            "code": PromptsSpec(source="humaneval", chat_template=True, limit=args.prompts)}
    return {kind: [p.input_ids.cuda() for p in tokenize_prompts(spec, str(ROOT / "profiles"), pair.tokenizer)]
            for kind, spec in sets.items()}


def bench_pace(args, name: str, bandwidth: float, meter, result: dict, save) -> None:
    """Every decoder at its defaults on one pair, greedy and T=1, chat and code prompts, side by side.

    Per (setting, decoder): tokens/s, ms/token, tokens per target call, J/token
    (one Zeus window per sweep over all prompts), the time by phase, the
    warm-up (first call: compile and capture) and the method's floor: its
    target and draft forwards at (weights + KV) / the copy bandwidth measured
    in this process, per generated token. HF ``generate`` and HF assisted
    generation (the 0.5B/draft as assistant, gamma 4, no confidence cut) are
    timed on the first ``--anchor-prompts`` prompts of each kind. Fills ``result``
    and calls ``save()`` after every row.
    """
    pair = load_models(*PAIRS[name], dtype="bfloat16", device="cuda")
    wants_head = name in HEADS and "eagle" in args.methods.split(",")
    head = load_model(HEADS[name], dtype="bfloat16", device="cuda", base=pair.target) if wants_head else None
    prompts = pace_prompts(pair, args)
    eos, n = pair.tokenizer.eos_token_id, args.new_tokens
    t_bytes, t_kv = model_bytes(pair.target), kv_bytes_per_position(pair.target)
    drafts_of = {"specdecode": pair.draft, "mtad": pair.draft, "eagle": head}
    result.update(pair=PAIRS[name], new_tokens=n, prompts={k: len(v) for k, v in prompts.items()},
                  target_bytes=t_bytes, draft_bytes=model_bytes(pair.draft),
                  eagle_head_bytes=model_bytes(head) if head is not None else None, bandwidth_Bps=bandwidth, rows=[])
    cfg = pair.draft.generation_config
    cfg.num_assistant_tokens, cfg.num_assistant_tokens_schedule, cfg.assistant_confidence_threshold = \
        4, "constant", 0.0
    swept = []  # (setting, method, decoder, draft bytes, draft KV bytes a position, warm-up s)
    for setting, filt in SETTINGS.items():
        for method, params in METHODS.items():
            if method not in args.methods.split(","):
                continue
            if method == "mtad" and setting == "greedy":
                continue  # the joint test needs a distribution; greedy beams are one beam
            draft = drafts_of.get(method)
            if method in drafts_of and draft is None:
                continue  # no EAGLE head for this pair
            d_bytes, d_kv = (model_bytes(draft), kv_bytes_per_position(draft)) if draft is not None else (0, 0)
            dec = get_decoder(method, target=pair.target, draft=draft, **params, **filt)
            t0 = time.perf_counter()
            with torch.inference_mode():
                # The longest prompt: its cache length is the largest the sweeps need.
                dec.generate(max((p for b in prompts.values() for p in b), key=lambda p: p.shape[1]), n,
                             torch.Generator().manual_seed(0), eos)
            torch.cuda.synchronize()
            swept.append((setting, method, dec, d_bytes, d_kv, time.perf_counter() - t0))
    for round_ in range(args.rounds):
        # Round 0 in the order above, round 1 in reverse, and so on: drift over the run and the
        # first sweep's place fall on every decoder alike, not on sampling, which comes first
        # (harness.runner.sweep_plan does the same for profiles).
        for setting, method, dec, d_bytes, d_kv, warmup_s in (swept if round_ % 2 == 0 else swept[::-1]):
            for kind, batch in prompts.items():
                row = _pace_sweep(dec, batch, n, eos, meter, f"{name}-{setting}-{method}-{kind}-round{round_}")
                calls, drafts, length = row.pop("target_calls"), row.pop("draft_calls"), row.pop("mean_length")
                floor_s = (calls * (t_bytes + t_kv * length) + drafts * (d_bytes + d_kv * length)) / bandwidth
                row.update(pair=name, setting=setting, decoder=method, prompts=kind, round=round_, warmup_s=warmup_s,
                           floor_ms_per_token=1e3 * floor_s / row["tokens"],
                           x_floor=row["ms_per_token"] / (1e3 * floor_s / row["tokens"]))
                result["rows"].append(row)
                save()
                print(_pace_line(row), flush=True)
    for setting, filt in SETTINGS.items():  # the anchors once, after all rounds: HF's loops run eagerly
        for kind, batch in prompts.items():
            for anchor, kwargs in (("hf_generate", {}), ("hf_assisted", {"assistant_model": pair.draft})):
                row = _hf_sweep(pair.target, batch[: args.anchor_prompts], n, eos, filt, kwargs)
                row.update(pair=name, setting=setting, decoder=anchor, prompts=kind)
                result["rows"].append(row)
                save()
                print(_pace_line(row), flush=True)
    del pair
    static.release_all()
    gc.collect()
    torch.cuda.empty_cache()


def _pace_sweep(dec, prompts, n, eos, meter, window) -> dict:
    tokens = calls = drafts = length = 0
    phases = dict.fromkeys(PHASES, 0.0)
    torch.cuda.synchronize()
    if meter:
        meter.begin(window)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            out = dec.generate(prompt, n, torch.Generator().manual_seed(i), eos)
            tokens += len(out.tokens)
            calls += out.target_forwards
            drafts += out.draft_forwards
            length += out.target_forwards * (prompt.shape[1] + len(out.tokens) / 2)
            for k, v in out.phase_times_s.items():
                phases[k] += v
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    joules = meter.end(window).total_j if meter else None
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "ms_per_token": 1e3 * seconds / tokens, "tokens_per_call": tokens / calls,
            "j_per_token": joules / tokens if joules is not None else None,
            **{f"{k}_ms_per_token": 1e3 * v / tokens for k, v in phases.items()},
            # A draft step against a target step (the cost ratio c of the speedup formula).
            "draft_ms_per_call": 1e3 * phases["draft"] / drafts if drafts else None,
            "verify_ms_per_call": 1e3 * phases["verify"] / calls,
            "target_calls": calls, "draft_calls": drafts, "mean_length": length / max(calls, 1)}


def _hf_sweep(model, prompts, n, eos, filt, kwargs) -> dict:
    sample = filt["temperature"] > 0
    kw = dict(max_new_tokens=n, eos_token_id=eos, pad_token_id=eos, do_sample=sample, **kwargs)
    if sample:
        kw.update(temperature=1.0, top_k=filt["top_k"], top_p=filt["top_p"])
    else:
        kw.update(temperature=None, top_k=None, top_p=None)
    with torch.inference_mode():
        model.generate(prompts[0], **{**kw, "max_new_tokens": 8})  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = 0
        for i, p in enumerate(prompts):
            torch.manual_seed(i)
            tokens += model.generate(p, **kw).shape[1] - p.shape[1]
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "ms_per_token": 1e3 * seconds / tokens}


def _pace_line(row: dict) -> str:
    extra = ""
    if "x_floor" in row:
        extra = (f" {row['tokens_per_call']:.2f} tok/call, {row['x_floor']:.2f}x floor, warm-up {row['warmup_s']:.0f} s"
                 + (f", {row['j_per_token']:.3f} J/tok" if row.get("j_per_token") is not None else "")
                 + " | " + " ".join(f"{k} {row[f'{k}_ms_per_token']:.2f}" for k in PHASES))
    where = f" round {row['round']}" if row.get("round") is not None else ""
    return (f"{row['pair']:8s} {row['setting']:6s} {row['prompts']:4s} {row['decoder']:14s}{where} "
            f"{row['tokens_per_s']:7.1f} tok/s {row['ms_per_token']:6.2f} ms/tok{extra}")


def combined_rounds(rows: list[dict]) -> list[dict]:
    """Each (pair, setting, prompts, decoder)'s sweeps over its rounds as one row, in the order
    they first ran: tokens, seconds, energy, target calls, phases and floor summed (so rates are
    totals over totals), ``rounds`` how many, and ``round_ratios`` its tokens/s against
    sampling's in the same round (the spread a ratio has between rounds)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["pair"], r["setting"], r["prompts"], r["decoder"]), []).append(r)
    sampling = {(r["pair"], r["setting"], r["prompts"], r.get("round")): r for r in rows if r["decoder"] == "sampling"}
    out = []
    for group in groups.values():
        tokens, seconds = sum(g["tokens"] for g in group), sum(g["seconds"] for g in group)
        row = {**group[0], "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
               "ms_per_token": 1e3 * seconds / tokens, "rounds": len(group)}
        for key in ("round", "draft_ms_per_call", "verify_ms_per_call"):  # one round's, not the total's
            row.pop(key, None)
        if "x_floor" in group[0]:
            floor_ms = sum(g["floor_ms_per_token"] * g["tokens"] for g in group) / tokens
            joules = [g.get("j_per_token") for g in group]
            j_per_token = (None if None in joules  # a sweep without a window: no total
                           else sum(j * g["tokens"] for j, g in zip(joules, group, strict=True)) / tokens)
            row.update(tokens_per_call=tokens / sum(g["tokens"] / g["tokens_per_call"] for g in group),
                       floor_ms_per_token=floor_ms, x_floor=row["ms_per_token"] / floor_ms,
                       j_per_token=j_per_token,
                       **{f"{k}_ms_per_token": sum(g[f"{k}_ms_per_token"] * g["tokens"] for g in group) / tokens
                          for k in PHASES})
        same_round = [(g, sampling.get((g["pair"], g["setting"], g["prompts"], g.get("round")))) for g in group]
        row["round_ratios"] = [g["tokens_per_s"] / s["tokens_per_s"] for g, s in same_round if s is not None]
        out.append(row)
    return out


def pace_table(pace: dict) -> str:
    """Markdown: tokens/s and the ratio to sampling of the same pair, setting and prompts, over all
    rounds (with the lowest and highest round's ratio, and the rounds, where there are several;
    the HF anchors run once, after the rounds)."""
    lines = ["| pair | setting | prompts | decoder | tok/s | vs sampling | tokens/call | x floor | J/token | "
             "draft / verify / accept / other ms per token |", "|---|---|---|---|---|---|---|---|---|---|"]
    for result in pace.values():
        rows = combined_rounds(result["rows"])
        base = {(r["setting"], r["prompts"]): r for r in rows if r["decoder"] == "sampling"}
        for r in rows:
            b = base[(r["setting"], r["prompts"])]
            ratio = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x"
            if len(r["round_ratios"]) > 1:  # and the rounds, which differ where a run was cut short
                ratio += f" ({min(r['round_ratios']):.2f}-{max(r['round_ratios']):.2f}, {r['rounds']} rounds)"
            phases = " / ".join(f"{r[f'{k}_ms_per_token']:.2f}" for k in PHASES) if "x_floor" in r else ""
            jpt = f"{r['j_per_token']:.3f}" if r.get("j_per_token") is not None else ""
            nan = float("nan")
            lines.append(f"| {r['pair']} | {r['setting']} | {r['prompts']} | {r['decoder']} | "
                         f"{r['tokens_per_s']:.0f} | {ratio} | "
                         f"{r.get('tokens_per_call', nan):.2f} | {r.get('x_floor', nan):.2f} | {jpt} | {phases} |")
    return "\n".join(lines)


def table(result: dict) -> str:
    """The anchor, pair and energy sections' results as one Markdown table (pace has its own)."""
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
    ap.add_argument("--sections", default="pace,anchor", help="any of pace, anchor, pair, energy")
    ap.add_argument("--pairs", default="smollm2,qwen", help="pace section: which pairs")
    ap.add_argument("--methods", default=",".join(METHODS), help="pace section: which decoders")
    ap.add_argument("--anchor-prompts", type=int, default=3, help="pace section: prompts per kind for HF's loops")
    ap.add_argument("--no-energy", action="store_true", help="pace section: no Zeus windows")
    ap.add_argument("--rounds", type=int, default=2,
                    help="pace section: rounds of every decoder's sweeps, the order reversed every other round")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per anchor variant (median)")
    ap.add_argument("--pair-rounds", type=int, default=1, help="alternating rounds of the pair section's sweeps")
    ap.add_argument("--energy-rounds", type=int, default=2, help="alternating rounds of the energy windows")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        ap.error(f"--methods: unknown {', '.join(sorted(unknown))} (known: {', '.join(METHODS)})")
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    sections = set(args.sections.split(","))
    result: dict = {"command": "python benchmarks/gpu_decoding.py " + " ".join(sys.argv[1:]),
                    "environment": environment([torch.device("cuda")])}
    gpu = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"gpu-decoding-{gpu}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        """Write what is measured so far: a run cut short (a lent GPU's budget) keeps its rows."""
        out.write_text(json.dumps(result, indent=2) + "\n")

    if "pace" in sections:
        bandwidth = copy_bandwidth()
        meter = None if args.no_energy else EnergyMeter([torch.cuda.current_device()])
        result["idle_power_w"] = meter.idle_power_w() if meter else None
        result["pace"] = {}
        for name in args.pairs.split(","):
            bench_pace(args, name, bandwidth, meter, result["pace"].setdefault(name, {}), save)
        print(pace_table(result["pace"]), flush=True)
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
    result["table"] = (pace_table(result["pace"]) + "\n\n" if "pace" in result else "") + table(result)
    save()
    print(result["table"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
