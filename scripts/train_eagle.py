"""Train an EAGLE draft head for a target model (run on a GPU).

Recipe (seeded: the same command on the same hardware and software gives the same head):

1. Prompts and data: those of scripts/train_draft.py, built by its functions:
   instruction templates x topics, task families, and user turns the target
   writes itself (the chat template cut where a user turn begins, sampled),
   none of them a prompt of the project's profiles (profiles/prompts/*.jsonl).
   For every prompt the target's greedy reply and one sampled at temperature 1,
   up to ``--new-tokens``. Held-out topics judge the head at the end.
2. Head: one Llama decoder layer of the target's width (``decoders.eagle``), fed
   ``fc(cat(embedding of x_{t+1}, target feature f_t))``, randomly initialised
   (seeded); the embeddings are the target's (frozen); the output head scores
   the ``--head-tokens`` most frequent generated tokens with the target's own
   rows (frozen; 0 keeps the whole vocabulary). The layer, its final norm and
   ``fc`` train.
3. Training-time test (EAGLE-3): every batch unrolls ``--depth`` drafting steps
   at every position at once (``harness.eagle_head.unrolled_states``), step d
   reading the head's own predicted features of step d - 1, so the head learns
   to draft from its own outputs as it does at inference. Loss at generated
   positions, summed over steps with weight ``0.8 ** (d - 1)``: cross-entropy of
   the head's distribution over its tokens against the target's (forward KL up
   to a constant) plus ``--feature-weight`` x smooth-L1 between the predicted
   and the true next feature (EAGLE-1's regression). AdamW, linear warm-up then
   cosine decay, bf16 autocast, a fixed number of steps. Every tenth of the run
   the held-out expected accepted length is measured and the best weights kept.
4. Judged after the round trip through ``harness.eagle_head`` (bfloat16) on the
   held-out prompts with the project's ``eagle`` decoder (gamma 4): tokens per
   target call at temperature 0 and at T=1, top-k 10, top-p 0.9.

Writes config.json, eagle.json, head.safetensors and train.json to ``--out``.

    python scripts/train_eagle.py --out harness/assets/smollm2_eagle
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_draft import (  # noqa: E402  (the data recipe is the distilled draft's)
    HELD_OUT_TOPICS,
    TOPICS,
    batches,
    chat,
    collate,
    decoded_steps,
    generate,
    normalise,
    profile_prompts,
    self_written_prompts,
    task_prompts,
    template_prompts,
)

from decoders import get_decoder  # noqa: E402
from decoders.eagle import EagleHead  # noqa: E402
from harness.composed_draft import SubsetHead  # noqa: E402
from harness.eagle_head import load_eagle_head, save_eagle_head, training_loss  # noqa: E402
from harness.models import load_model, load_tokenizer  # noqa: E402


def collate_bucketed(rows, idx, max_len, device, multiple=32):
    """``collate``, with the width padded to a multiple of ``multiple``: on the H200 the
    first batch of every new width cost about 0.4 s (kernel selection per shape), so
    a run visiting ~250 widths spent its first epoch at 0.4-0.9 s a step instead of 0.08."""
    ids, positions = collate(rows, idx, max_len, device)
    width = ids.shape[1]
    padded = -(-width // multiple) * multiple
    if padded == width:
        return ids, positions
    ids = torch.nn.functional.pad(ids, (0, padded - width))
    return ids, positions // width * padded + positions % width


@torch.inference_mode()
def held_out_alpha(target, head, rows, depth, subset, batch=32):
    """Per drafting step, mean sum(min(p, q)) on held-out replies (the acceptance rate at that depth)."""
    totals = [0.0] * depth
    count = 0
    for start in range(0, len(rows), batch):
        ids, positions = collate_bucketed(rows, range(start, min(start + batch, len(rows))), 10_000, target.device)
        with torch.autocast(target.device.type, dtype=torch.bfloat16):
            _, alphas = training_loss(target, head, ids, positions, depth, 0.0, subset)
        n = positions.numel()
        totals = [t + a * n for t, a in zip(totals, alphas.tolist(), strict=True)]
        count += n
    alphas = [t / max(count, 1) for t in totals]
    # Expected accepted drafts of a chain of ``depth``: sum over k of prod_{j<=k} alpha_j.
    expected, run = 0.0, 1.0
    for a in alphas:
        run *= a
        expected += run
    return {"alpha_by_step": alphas, "expected_accepted": expected}


def tokens_per_call(target, head, tok, prompts, new_tokens=128, **filters):
    """Mean tokens committed per target call by the project's ``eagle`` decoder (gamma 4)."""
    steps = decoded_steps(get_decoder("eagle", target=target, draft=head, gamma=4, **filters), tok, prompts, new_tokens)
    return sum(s.committed for s in steps) / len(steps)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", default=None, help="folder to keep the generated data in (reused when present)")
    ap.add_argument("--head-tokens", type=int, default=8192, help="tokens the head scores (0: all)")
    ap.add_argument("--self-written", type=int, default=8192, help="user turns to ask the target for")
    ap.add_argument("--new-tokens", type=int, default=160)
    ap.add_argument("--gen-batch", type=int, default=2048)
    ap.add_argument("--held-out", type=int, default=128, help="held-out prompts that judge the head")
    ap.add_argument("--max-prompts", type=int, default=0, help="train on at most this many prompts (0: all)")
    ap.add_argument("--depth", type=int, default=4, help="drafting steps unrolled in training")
    ap.add_argument("--feature-weight", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=320)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--max-train-s", type=float, default=0,
                    help="stop training after this many seconds (0: no limit); train.json records the steps run")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=float, default=0.05, help="share of the steps spent warming up")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.steps < 1 or args.depth < 1:
        ap.error("--steps and --depth must be at least 1")
    t_start = time.time()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    target = load_model(args.target, dtype="bfloat16", device=args.device)
    for p in target.parameters():
        p.requires_grad_(False)
    tok = load_tokenizer(args.target)
    if tok.pad_token is None:  # the GGUF tokenizer has none; padding is masked out
        tok.pad_token = tok.eos_token

    work = Path(args.work) if args.work else None
    data_file = work / "data.pt" if work else None
    if data_file and data_file.exists():
        data = torch.load(data_file)
        print(f"data: reused {data_file}", flush=True)
    else:
        t0 = time.time()
        excluded = profile_prompts()
        held_prompts = rng.sample(template_prompts(HELD_OUT_TOPICS, rng), args.held_out)
        prompts = [p for p in template_prompts(TOPICS, rng) + task_prompts() if normalise(p) not in excluded]
        written = self_written_prompts(target, tok, args.self_written, args.gen_batch, args.seed, math.inf,
                                       excluded | {normalise(p) for p in prompts + held_prompts})
        prompts += written
        rng.shuffle(prompts)
        if args.max_prompts:
            prompts = prompts[: args.max_prompts]
        print(f"prompts: {len(prompts)} ({len(written)} written by the target, {time.time() - t0:.0f} s)", flush=True)
        common = dict(new_tokens=args.new_tokens, batch=args.gen_batch, deadline=math.inf)
        texts, held = [chat(tok, p) for p in prompts], [chat(tok, p) for p in held_prompts]
        data = {"held_prompts": held_prompts, "prompts": len(prompts),
                "held_sampled": generate(target, tok, held, greedy=False, seed=2, **common), "train": []}
        for greedy in (True, False):
            data["train"] += generate(target, tok, texts, greedy=greedy, seed=3, **common)
        data["generation_s"] = time.time() - t0
        if data_file:
            work.mkdir(parents=True, exist_ok=True)
            torch.save(data, data_file)
    rows = data["train"]
    n_tokens = sum(ids.shape[0] - n for ids, n, _ in rows)
    print(f"data: {len(rows)} replies to {data['prompts']} prompts, {n_tokens} generated tokens "
          f"in {data['generation_s']:.0f} s", flush=True)

    head = EagleHead.for_target(target, seed=args.seed)
    head.target_name = args.target
    subset, coverage = None, 1.0
    if args.head_tokens:
        counts = torch.zeros(target.config.vocab_size, dtype=torch.long)
        for ids, n, _ in rows:
            counts += torch.bincount(ids[n:].long(), minlength=counts.numel())
        n_head = min(args.head_tokens, counts.numel())
        subset = torch.sort(torch.topk(counts, n_head, sorted=True).indices).values.to(device)
        coverage = float(counts[subset.cpu()].sum() / counts.sum())
        head.lm_head = SubsetHead(target.lm_head.weight.detach()[subset].clone(), subset, target.config.vocab_size)
        print(f"head: {n_head} tokens cover {coverage:.4f} of the generated tokens", flush=True)
    for module in head.own_modules():
        module.float().requires_grad_(True)  # float32 master weights under bf16 autocast
    params = [p for m in head.own_modules() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    steps, warm = args.steps, max(1, int(args.warmup * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    checks = sorted({max(1, steps * k // 10) for k in range(1, 11)})
    best = {"score": {"expected_accepted": -1.0}, "step": 0, "state": None}
    history = []
    held_rows = data["held_sampled"]
    stream = batches(rows, args.batch, rng)
    t0 = time.time()
    steps_run = 0
    for step in range(1, steps + 1):
        if args.max_train_s and time.time() - t0 > args.max_train_s:
            print(f"training time cap reached after {steps_run} steps", flush=True)
            break
        steps_run = step
        head.train()
        ids, positions = collate_bucketed(rows, next(stream), args.max_len, device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = training_loss(target, head, ids, positions, args.depth, args.feature_weight, subset)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step == 20:
            if device.type == "cuda":
                torch.cuda.synchronize()
            print(f"step 20: {(time.time() - t0) / 20:.3f} s per step", flush=True)
        if step in checks or (args.max_train_s and time.time() - t0 > args.max_train_s):
            head.eval()
            score = held_out_alpha(target, head, held_rows, args.depth, subset)
            history.append({"step": step, "loss": loss.item(), **score})
            print(f"step {step}/{steps} loss {loss.item():.3f}, held-out alpha by step "
                  f"{[round(a, 3) for a in score['alpha_by_step']]}, expected accepted "
                  f"{score['expected_accepted']:.2f} ({time.time() - t0:.0f} s)", flush=True)
            if not math.isfinite(loss.item()):
                raise SystemExit("training diverged")
            if score["expected_accepted"] > best["score"]["expected_accepted"]:
                best = {"score": score, "step": step, "state": [
                    {k: v.detach().clone() for k, v in m.state_dict().items()} for m in head.own_modules()]}
    train_s = time.time() - t0
    for module, state in zip(head.own_modules(), best["state"], strict=True):
        module.load_state_dict(state)

    out = Path(args.out)
    size = save_eagle_head(out, head, args.target, extra={"trained_by": "scripts/train_eagle.py"})
    stored = load_eagle_head(out, target)
    held = data["held_prompts"][:32]
    report = {
        "recipe": vars(args),
        "command": "python scripts/train_eagle.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "prompts": data["prompts"], "train_replies": len(rows), "train_generated_tokens": n_tokens,
        "held_out_prompts": len(data["held_prompts"]), "steps": steps, "steps_run": steps_run,
        "kept_step": best["step"],
        "history": history, "head_token_coverage": coverage, "head_bytes": size,
        "data_generation_s": data["generation_s"], "train_s": train_s,
        "held_out_trained": best["score"],
        "held_out_stored": held_out_alpha(target, stored, held_rows, args.depth, subset),
        "held_out_tokens_per_call_gamma4": {
            "T0": tokens_per_call(target, stored, tok, held, temperature=0.0),
            "T1_topk10_topp0.9": tokens_per_call(target, stored, tok, held, temperature=1.0, top_k=10, top_p=0.9),
        },
        "device": torch.cuda.get_device_name() if device.type == "cuda" else device.type,
        "torch": torch.__version__,
    }
    report["total_s"] = time.time() - t_start
    (out / "train.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
