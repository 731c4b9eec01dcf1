"""Does specdecode's output look like sampling's under the target? A paired check.

    python benchmarks/specdecode_nll_check.py [--seeds 4] [--new-tokens 24] [--prompts N]

For every prompt of profiles/prompts/claims.jsonl, each decoder generates
``--seeds`` continuations (MTAD's reference filters: T=1, top-k 10, top-p 0.9;
specdecode with gamma 4 and the built-in draft); the statistic is the mean
negative log-likelihood per token under the unfiltered target, averaged over
the seeds of a prompt. Exact speculative sampling has the same output law as
sampling, so the paired per-prompt differences must centre on 0: the script
reports their mean with its standard error and a two-sided Wilcoxon
signed-rank p-value. Short continuations and several seeds per prompt give
many more independent draws per CPU-minute than the 128-token profile study.
Writes benchmarks/results/specdecode-nll-check-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from scipy.stats import wilcoxon

from decoders import get_decoder
from harness.models import load_models
from harness.profile_spec import PromptsSpec
from harness.prompts import tokenize_prompts
from harness.quality import output_perplexity

ROOT = Path(__file__).resolve().parent.parent
FILTERS = {"temperature": 1.0, "top_k": 10, "top_p": 0.9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--draft", default="builtin:smollm2-135m-draft")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=None, help="first N prompts (default: all)")
    args = ap.parse_args()
    m = load_models(args.target, args.draft, device=args.device)
    spec = PromptsSpec(file="prompts/claims.jsonl", field="prompt", id_field="id", chat_template=True,
                       limit=args.prompts)
    prompts = tokenize_prompts(spec, str(ROOT / "profiles"), m.tokenizer)
    decoders = {"sampling": get_decoder("sampling", target=m.target, **FILTERS),
                "specdecode": get_decoder("specdecode", target=m.target, draft=m.draft, gamma=4, **FILTERS)}
    per_prompt: dict[str, list[float]] = {name: [] for name in decoders}
    t0 = time.time()
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            ids = prompt.input_ids.to(m.device)
            for k, (name, dec) in enumerate(decoders.items()):
                values = []
                for s in range(args.seeds):  # disjoint seeds per decoder: independent draws
                    gen = torch.Generator().manual_seed(10_000 * i + 1_000 * k + s)
                    out = dec.generate(ids, args.new_tokens, gen, m.tokenizer.eos_token_id)
                    # log of the profiles' output perplexity: the mean NLL per token
                    values.append(math.log(output_perplexity(m.target, ids, out.tokens)))
                per_prompt[name].append(statistics.mean(values))
            print(f"{i + 1}/{len(prompts)} prompts ({time.time() - t0:.0f} s)", flush=True)
    diffs = [a - b for a, b in zip(per_prompt["specdecode"], per_prompt["sampling"], strict=True)]
    result = {
        "target": args.target, "draft": args.draft, "device": args.device, "filters": FILTERS,
        "prompts": len(prompts), "seeds": args.seeds, "new_tokens": args.new_tokens,
        "mean_nll": {name: statistics.mean(v) for name, v in per_prompt.items()},
        "specdecode_minus_sampling": statistics.mean(diffs),
        "standard_error": statistics.stdev(diffs) / math.sqrt(len(diffs)),
        "wilcoxon_p": float(wilcoxon(per_prompt["specdecode"], per_prompt["sampling"]).pvalue),
        "per_prompt": per_prompt,
        "command": "python benchmarks/specdecode_nll_check.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
    }
    out = ROOT / "benchmarks" / "results" / f"specdecode-nll-check-{args.device}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_prompt"}, indent=2))


if __name__ == "__main__":
    main()
