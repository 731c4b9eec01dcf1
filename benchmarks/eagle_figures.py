"""eagle against sampling and specdecode on one target, side by side in one process.

    python benchmarks/eagle_figures.py [--device cpu] [--prompts-file prompts/chat.jsonl]
        [--prompts 12] [--new-tokens 64] [--head builtin:smollm2-135m-eagle]
        [--draft builtin:smollm2-135m-draft]

For greedy decoding and for T=1 with top-k 10, top-p 0.9, gamma 4: each prompt
is decoded by the three decoders one after another (the same seed), so the
machine's drift hits all three alike. Reports tokens/s, the speed ratio to
sampling (ratio of summed times, 95% bootstrap interval over prompts), tokens
per target call, and the cost of one draft step against one target step from
the decoders' own phase timers (eagle's head step; specdecode's draft-model step).
Writes benchmarks/results/eagle-<device>.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch

from decoders import get_decoder
from harness.models import load_model, load_models
from harness.profile_spec import PromptsSpec
from harness.prompts import tokenize_prompts
from harness.stats import ratio_of_sums_ci
from harness.sysinfo import cpu_name, package_versions

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"greedy": {"temperature": 0.0}, "t1": {"temperature": 1.0, "top_k": 10, "top_p": 0.9}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--draft", default="builtin:smollm2-135m-draft")
    ap.add_argument("--head", default="builtin:smollm2-135m-eagle")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts-file", default="prompts/chat.jsonl")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    pair = load_models(args.target, args.draft, device=args.device)
    head = load_model(args.head, device=args.device, base=pair.target)
    spec = PromptsSpec(file=args.prompts_file, field="prompt", id_field="id", chat_template=True, limit=args.prompts)
    prompts = [p.input_ids.to(pair.device) for p in tokenize_prompts(spec, str(ROOT / "profiles"), pair.tokenizer)]
    eos = pair.tokenizer.eos_token_id
    result = {"command": "python benchmarks/eagle_figures.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "device": cpu_name() if args.device == "cpu" else torch.cuda.get_device_name(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "packages": package_versions(), "settings": {}}
    for setting, filters in SETTINGS.items():
        decoders = {"sampling": get_decoder("sampling", target=pair.target, **filters),
                    "specdecode": get_decoder("specdecode", target=pair.target, draft=pair.draft, gamma=4, **filters),
                    "eagle": get_decoder("eagle", target=pair.target, draft=head, gamma=4, **filters)}
        for dec in decoders.values():  # warm-up, outside the numbers
            dec.generate(prompts[0], 8, torch.Generator().manual_seed(0), eos)
        rows = {name: [] for name in decoders}
        for i, prompt in enumerate(prompts):
            for name, dec in decoders.items():
                out = dec.generate(prompt, args.new_tokens, torch.Generator().manual_seed(i), eos)
                rows[name].append({"tokens": len(out.tokens), "seconds": sum(out.phase_times_s.values()),
                                   "calls": out.target_forwards, "draft_calls": out.draft_forwards,
                                   **{f"{k}_s": v for k, v in out.phase_times_s.items()}})
        summary = {}
        base = rows["sampling"]
        base_step = sum(r["verify_s"] for r in base) / sum(r["calls"] for r in base)
        for name, rs in rows.items():
            tokens, seconds = sum(r["tokens"] for r in rs), sum(r["seconds"] for r in rs)
            # Per-prompt time per token, as a ratio of sums against sampling's (paired by prompt).
            ratio = ratio_of_sums_ci(np.array([r["seconds"] / r["tokens"] for r in base]),
                                     np.array([r["seconds"] / r["tokens"] for r in rs]))
            drafts = sum(r["draft_calls"] for r in rs)
            summary[name] = {
                "tokens_per_s": tokens / seconds, "speedup_vs_sampling": ratio.value,
                "speedup_ci": [ratio.low, ratio.high], "tokens_per_call": tokens / sum(r["calls"] for r in rs),
                "draft_step_over_target_step": (sum(r["draft_s"] for r in rs) / drafts / base_step) if drafts else None,
            }
            print(f"{setting:6s} {name:10s} {summary[name]['tokens_per_s']:6.1f} tok/s  "
                  f"{ratio.value:.2f}x [{ratio.low:.2f}, {ratio.high:.2f}]  "
                  f"{summary[name]['tokens_per_call']:.2f} tok/call  draft step "
                  f"{summary[name]['draft_step_over_target_step'] or 0:.3f}x a target step", flush=True)
        result["settings"][setting] = summary
    name = "cpu" if args.device == "cpu" else "gpu"
    out = ROOT / "benchmarks" / "results" / f"eagle-{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
