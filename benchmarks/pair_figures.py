"""Figures of a target/draft pair: acceptance, greedy agreement, draft cost.

    python benchmarks/pair_figures.py [--target builtin:smollm2-135m-instruct]
        [--draft builtin:smollm2-135m-draft] [--device cpu] [--prompts-file prompts/chat.jsonl]
        [--prompts 16] [--new-tokens 64]

- specdecode mean accepted tokens per target call at temperature 1 (no top-k/
  top-p), gamma 4, over the prompts of profiles/prompts/chat.jsonl (or another
  prompt file of profiles/);
- greedy agreement: share of positions of the target's greedy reply where the
  draft's argmax equals the target's (teacher-forced, generated positions only);
- draft cost: median time of one cached one-token forward of the draft over that
  of the target, measured alternately in the same loop.
Agreement and tokens per call come with 95% bootstrap intervals over prompts
(positions within one reply are not independent).
Writes benchmarks/results/pair-<device>.json (pair-<device>-<file>.json for
another prompt file) and prints it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from decoders import get_decoder
from decoders.kv import CachedModel
from harness.models import load_models
from harness.profile_spec import PromptsSpec
from harness.prompts import tokenize_prompts
from harness.stats import ratio_of_sums_ci
from harness.sysinfo import cpu_name, package_versions

ROOT = Path(__file__).resolve().parent.parent


def forward_cost(model, prompt_ids, steps=40):
    cache = CachedModel(model)
    cache(prompt_ids, keep=1)
    token = prompt_ids[:, -1:]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        cache(token, keep=1)
        if prompt_ids.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--draft", default="builtin:smollm2-135m-draft")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts-file", default="prompts/chat.jsonl", help="relative to profiles/")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    m = load_models(args.target, args.draft, device=args.device)
    spec = PromptsSpec(file=args.prompts_file, field="prompt", id_field="id", chat_template=True,
                       limit=args.prompts)
    prompts = tokenize_prompts(spec, str(ROOT / "profiles"), m.tokenizer)
    eos = m.tokenizer.eos_token_id
    sd = get_decoder("specdecode", target=m.target, draft=m.draft, gamma=4, temperature=1.0, top_k=0, top_p=1.0)
    per_prompt = []  # (agreeing positions, positions, accepted, committed, target calls)
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            ids = p.input_ids.to(m.device)
            out = sd.generate(ids, args.new_tokens, torch.Generator().manual_seed(i), eos)
            accepted, committed = sum(s.accepted for s in out.steps), sum(s.committed for s in out.steps)
            greedy = get_decoder("sampling", target=m.target, temperature=0.0).generate(ids, args.new_tokens,
                                                                                       eos_token_id=eos)
            seq = torch.cat([ids[0], greedy.tokens.to(m.device)]).view(1, -1)
            n = len(greedy.tokens)
            t_arg = m.target(seq).logits[0, -n - 1:-1].argmax(-1)
            d_arg = m.draft(seq).logits[0, -n - 1:-1].argmax(-1)
            per_prompt.append((int((t_arg == d_arg).sum()), n, accepted, committed, len(out.steps)))
        target_t = draft_t = None
        t_times, d_times = [], []
        for _ in range(3):  # alternate so drift hits both alike
            t_times += forward_cost(m.target, prompts[0].input_ids.to(m.device))
            d_times += forward_cost(m.draft, prompts[0].input_ids.to(m.device))
        target_t, draft_t = statistics.median(t_times), statistics.median(d_times)
    columns = list(zip(*per_prompt, strict=True))

    def ci(num: int, den: int) -> list[float]:
        est = ratio_of_sums_ci(columns[num], columns[den])
        return [est.low, est.high]

    result = {
        "target": args.target, "draft": args.draft, "device": args.device,
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "platform": platform.platform(),
        "packages": package_versions(), "prompts": len(prompts), "new_tokens": args.new_tokens,
        "prompts_file": args.prompts_file,
        "specdecode_T1_gamma4_mean_accepted": sum(columns[2]) / sum(columns[4]),
        "specdecode_T1_gamma4_mean_accepted_ci95": ci(2, 4),
        "specdecode_T1_gamma4_tokens_per_call": sum(columns[3]) / sum(columns[4]),
        "specdecode_T1_gamma4_tokens_per_call_ci95": ci(3, 4),
        "greedy_agreement": sum(columns[0]) / sum(columns[1]),
        "greedy_agreement_ci95": ci(0, 1),
        "target_forward_ms": 1e3 * target_t, "draft_forward_ms": 1e3 * draft_t,
        "draft_cost_ratio": draft_t / target_t,
        "command": "python benchmarks/pair_figures.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
    }
    stem = "" if args.prompts_file == "prompts/chat.jsonl" else "-" + Path(args.prompts_file).stem
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"pair-{args.device}{stem}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
