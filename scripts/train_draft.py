"""Distil a small draft model from SmolLM2-135M-Instruct (run on a GPU).

Recipe (seeded, reproducible on the same hardware and software):
1. Prompts: INSTRUCTIONS x TOPICS rendered with the target's chat template; a
   held-out set of topics is never trained on and judges the draft.
2. Data: the target samples replies at temperature 1 (no top-k/top-p) with
   ``generate``; only generated positions up to and including the end of
   sequence are trained on and measured (the prompt and the padding after EOS
   are trivially predictable and would flatter the draft).
3. Draft: ``--layers`` Llama layers of the target's width, initialised from
   target layers ``--init-layers``; embeddings, final norm and the tied head are
   the target's own, frozen, and not stored with the draft.
4. Loss: KL(target || draft) over the vocabulary at generated positions; AdamW,
   one-cycle schedule, bf16 autocast.
5. Judge on held-out prompts: greedy agreement and alpha = sum(min(p, q)) at
   generated positions, then speculative decoding (gamma 4, T=1) with the
   project's decoder: mean accepted tokens per target call.

Writes ``config.json``, ``layers-NN.safetensors`` (bf16, one per layer) and ``train.json``
to ``--out``: the folder ``harness/assets/smollm2_draft`` holds its output.

    python scripts/train_draft.py --gguf path/to/SmolLM2-135M-Instruct.Q4_1.gguf --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

INSTRUCTIONS = [
    "Write a short paragraph about {t}.", "Explain {t} to a ten-year-old.", "List three facts about {t}.",
    "Write a haiku about {t}.", "What are the pros and cons of {t}?", "Describe {t} in two sentences.",
    "Give me a tip related to {t}.", "Tell a very short story involving {t}.", "Why is {t} important?",
    "Write a tweet about {t}.", "Summarise what people should know about {t}.", "How would you teach {t}?",
    "Write a short poem about {t}.", "What is a common misconception about {t}?", "Compare {t} with something similar.",
    "Write an email to a friend about {t}.", "Give three questions someone might ask about {t}.",
    "Explain the history of {t} briefly.", "Write a product description related to {t}.",
    "What would a beginner need to know about {t}?", "Write a dialogue between two people about {t}.",
    "Describe a day spent on {t}.", "Give step-by-step advice about {t}.", "What is the future of {t}?",
]
TOPICS = [
    "the ocean", "volcanoes", "bicycles", "coffee", "honeybees", "the moon", "chess", "rainforests", "bread baking",
    "electric cars", "libraries", "jazz music", "recycling", "mountains", "photosynthesis", "the internet",
    "friendship", "sleep", "gardening", "the Roman Empire", "penguins", "solar power", "museums", "running",
    "origami", "trains", "winter", "cheese", "robots", "rivers", "deserts", "kites", "tea", "dinosaurs",
    "smartphones", "yoga", "the printing press", "bridges", "clouds", "octopuses", "board games", "pizza",
    "lighthouses", "vaccines", "mathematics", "painting", "airplanes", "forests", "birdwatching", "cooking pasta",
    "the stock market", "climate change", "castles", "public transport", "the human heart", "comets", "knitting",
    "wolves", "video games", "ancient Egypt", "earthquakes", "podcasts", "camping", "chocolate", "elephants",
    "the Olympics", "typewriters", "coral reefs", "time management", "space telescopes", "soup", "snowflakes",
    "birthday parties", "hiking boots", "marathons", "rainbows", "ants", "sailing", "microscopes", "the alphabet",
    "budgeting", "meditation", "wind turbines", "pottery", "recycling paper", "maps", "candles", "owls",
    "spreadsheets", "farming", "glaciers", "fireworks", "the Internet of Things", "violins", "umbrellas",
    "tornadoes", "languages", "hot air balloons", "sunflowers", "public speaking",
]
HELD_OUT_TOPICS = [
    "submarines", "the Great Wall of China", "mushrooms", "skateboarding", "honey", "black holes", "puzzles",
    "waterfalls", "dentists", "lemons", "the Arctic", "newspapers",
]


def chat_prompts(tok, topics, rng, per_topic):
    prompts = []
    for topic in topics:
        for instruction in rng.sample(INSTRUCTIONS, per_topic):
            messages = [{"role": "user", "content": instruction.format(t=topic)}]
            prompts.append(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return prompts


@torch.inference_mode()
def sample_replies(target, tok, prompts, new_tokens, batch, seed):
    """Target replies at T=1; returns (ids [N, L], loss mask [N, L]) right-padded."""
    tok.padding_side = "left"
    if tok.pad_token is None:  # the GGUF tokenizer has none; padding is masked out anyway
        tok.pad_token = tok.eos_token
    rows, masks = [], []
    g = torch.Generator(device="cuda").manual_seed(seed)
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i: i + batch], return_tensors="pt", padding=True, add_special_tokens=False).to("cuda")
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g, device="cuda")))
        out = target.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
        gen = out[:, enc.input_ids.shape[1]:]
        for j in range(out.shape[0]):
            prompt = enc.input_ids[j][enc.attention_mask[j].bool()]
            reply = gen[j]
            eos = (reply == tok.eos_token_id).nonzero()
            n = int(eos[0]) + 1 if len(eos) else reply.shape[0]
            seq = torch.cat([prompt, reply[:n]])
            mask = torch.zeros_like(seq, dtype=torch.bool)
            mask[prompt.shape[0]:] = True  # positions whose token is generated
            rows.append(seq.cpu())
            masks.append(mask.cpu())
    return rows, masks


def pad(seqs, value):
    width = max(s.shape[0] for s in seqs)
    return torch.stack([F.pad(s, (0, width - s.shape[0]), value=value) for s in seqs])


def build_draft(target, layers, init_layers):
    cfg = LlamaConfig(**{**target.config.to_dict(), "num_hidden_layers": layers})
    cfg.quantization_config = None
    draft = LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.float32)
    sd = target.state_dict()
    draft.model.embed_tokens.weight.data.copy_(sd["model.embed_tokens.weight"])
    draft.model.norm.weight.data.copy_(sd["model.norm.weight"])
    for i, src in enumerate(init_layers):
        prefix = f"model.layers.{src}."
        draft.model.layers[i].load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    draft.tie_weights()
    for p in [draft.model.embed_tokens.weight, draft.model.norm.weight]:
        p.requires_grad_(False)
    return draft


def kl_loss(t_logits, d_logits, mask):
    t_logp = F.log_softmax(t_logits.float(), -1)
    d_logp = F.log_softmax(d_logits.float(), -1)
    kl = (t_logp.exp() * (t_logp - d_logp)).sum(-1)
    return (kl * mask).sum() / mask.sum()


@torch.inference_mode()
def judge(target, draft, seqs, masks, batch=32):
    """Greedy agreement and alpha = sum(min(p, q)) at generated positions (predicting them)."""
    agree = alpha = count = 0.0
    for i in range(0, len(seqs), batch):
        ids = pad(seqs[i: i + batch], 0).cuda()
        m = pad(masks[i: i + batch], False).cuda()[:, 1:]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            tl = target(ids).logits[:, :-1].float()
            dl = draft(ids).logits[:, :-1].float()
        p, q = tl.softmax(-1), dl.softmax(-1)
        agree += ((tl.argmax(-1) == dl.argmax(-1)) & m).sum().item()
        alpha += (torch.minimum(p, q).sum(-1) * m).sum().item()
        count += m.sum().item()
    return agree / count, alpha / count


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--init-layers", default="0,1,29")
    ap.add_argument("--per-topic", type=int, default=24, help="instructions sampled per training topic")
    ap.add_argument("--samples", type=int, default=2, help="replies sampled per training prompt")
    ap.add_argument("--new-tokens", type=int, default=160)
    ap.add_argument("--gen-batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget-s", type=float, default=480, help="stop training this long after the start")
    args = ap.parse_args()
    t_start = time.time()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    gguf = Path(args.gguf)
    target = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16).cuda().eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    train_prompts = chat_prompts(tok, TOPICS, rng, args.per_topic) * args.samples
    held_prompts = chat_prompts(tok, HELD_OUT_TOPICS, rng, 4)
    t0 = time.time()
    seqs, masks = sample_replies(target, tok, train_prompts, args.new_tokens, args.gen_batch, args.seed)
    held_seqs, held_masks = sample_replies(target, tok, held_prompts, args.new_tokens, args.gen_batch, args.seed + 1)
    gen_s = time.time() - t0
    n_tokens = int(sum(m.sum() for m in masks))
    print(f"data: {len(seqs)} sequences, {n_tokens} generated tokens in {gen_s:.0f} s", flush=True)

    init_layers = [int(x) for x in args.init_layers.split(",")]
    draft = build_draft(target, args.layers, init_layers)
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    order = list(range(len(seqs)))
    t0 = time.time()
    step = 0
    while step < args.steps and time.time() - t_start < args.time_budget_s:
        rng.shuffle(order)
        for i in range(0, len(order) - args.batch + 1, args.batch):
            idx = order[i: i + args.batch]
            ids = pad([seqs[j] for j in idx], 0).cuda()[:, :256]
            m = pad([masks[j] for j in idx], False).cuda()[:, :256][:, 1:].float()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                tl = target(ids).logits[:, :-1]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                dl = draft(ids).logits[:, :-1]
            loss = kl_loss(tl, dl, m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 250 == 0:
                print(f"step {step} kl {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
            if step >= args.steps or time.time() - t_start > args.time_budget_s:
                break
    train_s = time.time() - t0
    draft.eval()
    agree, alpha = judge(target, draft, held_seqs, held_masks)
    agree_tr, alpha_tr = judge(target, draft, seqs[:96], masks[:96])
    print(f"held-out: greedy agreement {agree:.3f}, alpha {alpha:.3f}; train: {agree_tr:.3f}, {alpha_tr:.3f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in draft.state_dict().items()}
    for i in range(args.layers):  # one file per layer keeps every file small
        prefix = f"model.layers.{i}."
        save_file({k: v for k, v in state.items() if k.startswith(prefix)}, out / f"layers-{i:02d}.safetensors")
    cfg = draft.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    report = {
        "recipe": vars(args), "train_sequences": len(seqs), "train_generated_tokens": n_tokens,
        "held_out_sequences": len(held_seqs), "steps": step, "data_generation_s": gen_s, "train_s": train_s,
        "held_out_greedy_agreement": agree, "held_out_alpha": alpha,
        "train_greedy_agreement": agree_tr, "train_alpha": alpha_tr,
        "expected_accepted_per_call_gamma4": sum(alpha ** k for k in range(1, 5)),
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
    }
    (out / "train.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    if not math.isfinite(loss.item()):
        raise SystemExit("training diverged")


if __name__ == "__main__":
    main()
