"""Distil a small draft model from SmolLM2-135M-Instruct (run on a GPU).

Recipe (seeded: the same command on the same hardware and software gives the same draft):

1. Prompts. Instruction templates x topics, task families (code, arithmetic,
   translation, facts, how-to, tips, letters, comparisons, brainstorming,
   definitions, summaries, plans), and user turns the target writes itself:
   the chat template up to the start of a user message, sampled (the "Magpie"
   recipe, Xu et al., 2024), kept when they end with the end-of-turn token.
   No prompt of the project's profiles (profiles/prompts/*.jsonl, which judge
   the pair) is trained on. Held-out topics are never trained on; they judge
   the draft at the end.
2. Data. For every prompt the target's greedy reply and one reply sampled at
   temperature 1 (no top-k/top-p), up to ``--new-tokens``. Only generated
   positions (up to and including the end-of-turn token) are trained on and
   judged: the prompt and the padding are trivially predictable.
3. Draft. ``--layers`` Llama layers of the target's width, layer i initialised
   from target layer ``--init-layers[i]``; the output head scores only the
   ``--head-tokens`` most frequent tokens of the generated data (rows of the
   target's head, frozen) and the embeddings are the target's (frozen). Every
   layer and the final norm train.
4. Loss. Cross-entropy of the draft's distribution over the head tokens against
   the target's (forward KL up to a constant), at generated positions; AdamW,
   linear warm-up then cosine decay, bf16 autocast. Every tenth of the run the
   held-out alpha is measured and the best weights are kept. The number of
   steps is fixed (``--steps``), not sized from a time budget: timing the first
   passes overestimated the step time 2.5x twice (the allocator and kernel
   selection are still warming up for new sequence lengths), which cut runs short.
5. Stored with ``harness.composed_draft`` (4-bit deltas from the initial layers,
   the head's token ids) and judged after that round trip, on held-out prompts:
   greedy agreement on the target's greedy replies, alpha = sum(min(p, q)) on its
   sampled replies, and speculative decoding (gamma 4, T=1) with the project's
   decoder: mean accepted draft tokens per target call.

Writes config.json, compose.json, draft.safetensors and train.json to ``--out``.
The defaults made the shipped draft (``harness/assets/smollm2_draft``; its
train.json holds the figures): 4.6 minutes of generation (6.4M tokens) and 7.3
of training on one H200.

    python scripts/train_draft.py --out harness/assets/smollm2_draft
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from decoders import get_decoder
from harness.composed_draft import SubsetHead, compose_draft, save_composed_draft
from harness.models import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent

INSTRUCTIONS = [
    "Write a short paragraph about {t}.", "Explain {t} to a ten-year-old.", "List three facts about {t}.",
    "Write a haiku about {t}.", "What are the pros and cons of {t}?", "Describe {t} in two sentences.",
    "Give me a tip related to {t}.", "Tell a very short story involving {t}.", "Why is {t} important?",
    "Write a tweet about {t}.", "Summarise what people should know about {t}.", "How would you teach {t}?",
    "Write a short poem about {t}.", "What is a common misconception about {t}?",
    "Compare {t} with something similar.", "Write an email to a friend about {t}.",
    "Give three questions someone might ask about {t}.", "Explain the history of {t} briefly.",
    "Write a product description related to {t}.", "What would a beginner need to know about {t}?",
    "Write a dialogue between two people about {t}.", "Describe a day spent on {t}.",
    "Give step-by-step advice about {t}.", "What is the future of {t}?", "How does {t} work?",
    "Write a limerick about {t}.", "What are five words that describe {t}?", "Tell me a fun fact about {t}.",
    "Write a short speech about {t}.", "What should children learn about {t}?",
    "Make a to-do list for a project about {t}.", "Write a riddle whose answer is {t}.",
    "Explain {t} in one sentence.", "What questions do scientists still have about {t}?",
    "Write the opening line of a novel about {t}.", "Give a simple definition of {t}.",
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
    "tornadoes", "languages", "hot air balloons", "sunflowers", "public speaking", "football", "democracy",
    "the water cycle", "batteries", "cats", "dogs", "honesty", "teamwork", "electricity", "gravity", "magnets",
    "the solar system", "whales", "tigers", "vitamins", "exercise", "homework", "cities", "villages", "trees",
    "the weather", "history", "poetry", "music lessons", "science fairs", "airports", "hospitals", "firefighters",
]
HELD_OUT_TOPICS = [
    "submarines", "the Great Wall of China", "mushrooms", "skateboarding", "honey", "black holes", "puzzles",
    "waterfalls", "dentists", "lemons", "the Arctic", "newspapers",
]
CODE_TASKS = [
    "checks whether a number is even", "returns the largest item of a list", "counts the vowels in a string",
    "computes the factorial of n", "merges two sorted lists", "removes duplicates from a list",
    "converts Celsius to Fahrenheit", "checks whether a word is a palindrome", "sums the digits of a number",
    "finds the average of a list of numbers", "returns the n-th Fibonacci number", "counts words in a sentence",
    "capitalises every word in a sentence", "checks whether a year is a leap year", "finds the smallest number",
]
PHRASES = ["thank you very much", "where is the train station?", "I like to read books", "see you tomorrow",
           "what time is it?", "the weather is nice today", "happy birthday", "I am learning to cook"]
LANGUAGES = ["French", "Spanish", "German", "Italian", "Portuguese"]
COUNTRIES = ["France", "Japan", "Canada", "Brazil", "Kenya", "Norway", "India", "Mexico", "Egypt", "Peru"]


# Task styles beyond "{instruction} about {topic}" (how-to, tips, letters, comparisons,
# brainstorming, definitions, summaries, plans), each filled from its own slot lists.
HOW_TOS = [
    "boil an egg", "change a car tyre", "plant tomatoes", "write a cover letter", "clean a laptop keyboard",
    "start running", "save money for a holiday", "make a paper airplane", "tie a tie", "brew green tea",
    "learn to juggle", "back up my phone", "remove a coffee stain", "prepare for a job interview",
    "care for a cactus", "make pancakes", "stop procrastinating", "set up a fish tank", "choose a laptop",
    "write a good essay introduction", "keep basil alive", "organise my desk", "make a budget spreadsheet",
    "sharpen a kitchen knife", "start a vegetable garden", "improve my handwriting", "paint a room",
    "wash a wool sweater", "make friends in a new city", "calm down before an exam", "build a birdhouse",
    "take better photos with my phone", "memorise a speech", "hang a picture frame", "bake bread at home",
]
ACTIVITIES = [
    "studying for exams", "working from home", "travelling on a budget", "staying focused", "eating healthily",
    "learning to swim", "writing a novel", "saving energy at home", "keeping a journal", "running a meeting",
    "hiking in the mountains", "drawing portraits", "staying motivated", "cooking for a large family",
    "reducing screen time", "taking care of a puppy", "packing a suitcase", "giving feedback", "moving house",
    "starting a small business", "staying warm in winter", "learning guitar", "reading more books",
]
LETTERS = [
    ("polite email", "my manager", "asking for a day off next week"),
    ("short email", "a client", "confirming our meeting on Tuesday"),
    ("friendly message", "a neighbour", "inviting them to a barbecue"),
    ("formal letter", "my landlord", "reporting a broken heater"),
    ("thank-you note", "a friend", "thanking them for a birthday present"),
    ("polite email", "a professor", "asking for an extension on an assignment"),
    ("short email", "my team", "announcing a new project"),
    ("formal letter", "the city council", "asking for more bicycle lanes"),
    ("friendly email", "a former colleague", "catching up after a year"),
    ("polite message", "a shop", "asking about a delayed order"),
    ("short note", "my family", "explaining that I will be home late"),
    ("polite email", "a hotel", "asking to change my booking"),
]
PAIRS = [
    ("cats", "dogs"), ("trains", "planes"), ("books", "films"), ("summer", "winter"), ("city life", "country life"),
    ("Python", "JavaScript"), ("running", "swimming"), ("email", "phone calls"), ("paper maps", "GPS"),
    ("solar power", "wind power"), ("renting", "buying a home"), ("e-books", "printed books"), ("rice", "pasta"),
    ("working alone", "working in a team"), ("the sun", "the moon"), ("piano", "guitar"), ("lakes", "oceans"),
]
OBJECTS = ["a rubber band", "an old newspaper", "a glass jar", "a shoebox", "a spoon", "a wooden pencil",
           "a plastic bottle", "a tennis ball", "a sock", "a coffee mug", "a ladder", "a bed sheet"]
CONCEPTS = ["a metaphor", "a renewable resource", "a mammal", "an adjective", "a chemical reaction",
            "a habit", "a verb", "an ecosystem", "a democracy", "a fraction", "a planet", "an insect",
            "a noun", "a compound word", "a public service", "a musical instrument"]
EVENTS = ["the invention of the telephone", "the fall of the Berlin Wall", "the first flight of the Wright brothers",
          "the building of the pyramids", "the discovery of penicillin", "the voyage of the Titanic",
          "the invention of the printing press", "the first modern Olympic Games", "the story of Romeo and Juliet"]
PLANS = ["a weekend trip to the seaside", "a healthy breakfast for a week", "a study schedule for a month",
         "a children's birthday party", "a fifteen-minute stretching routine", "a one-day visit to a new city",
         "a budget for a student", "a reading list for a teenager", "a simple dinner party menu"]
AUDIENCES = ["a beginner", "a grandparent", "a high school student", "a five-year-old"]
COUNTS = ["two", "three", "four", "five"]


def task_prompts() -> list[str]:
    prompts = [f"How do I {h}?" for h in HOW_TOS] + [f"How can I {h} quickly?" for h in HOW_TOS[::3]]
    prompts += [f"Give me {n} tips for {a}." for a in ACTIVITIES for n in COUNTS]
    prompts += [f"Write a {kind} to {who} {why}." for kind, who, why in LETTERS]
    prompts += [f"Write a {kind} to {who} {why}, in a warm tone." for kind, who, why in LETTERS]
    prompts += [f"Compare {a} and {b}." for a, b in PAIRS] + [f"Which is better, {a} or {b}?" for a, b in PAIRS]
    prompts += [f"List {n} creative uses for {o}." for o in OBJECTS for n in COUNTS]
    prompts += [f"What is {c}? Give {n} examples." for c in CONCEPTS for n in COUNTS[1:]]
    prompts += [f"Summarise {e} in {n} sentences." for e in EVENTS for n in COUNTS]
    prompts += [f"Plan {p}." for p in PLANS] + [f"Suggest {p}." for p in PLANS]
    prompts += [f"Explain {t} to {a}." for t in TOPICS[::4] for a in AUDIENCES]
    return prompts


def profile_prompts() -> set[str]:
    """Normalised texts of every prompt the project's profiles use (never trained on)."""
    texts = set()
    for path in (ROOT / "profiles" / "prompts").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                texts.add(normalise(json.loads(line)["prompt"]))
    return texts


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def template_prompts(topics: list[str], rng: random.Random) -> list[str]:
    prompts = [i.format(t=t) for t in topics for i in INSTRUCTIONS]
    for lang in ("Python", "JavaScript"):
        prompts += [f"Write a {lang} function that {task}." for task in CODE_TASKS]
    prompts += [f"Translate '{p}' into {lang}." for p in PHRASES for lang in LANGUAGES]
    prompts += [f"What is the capital of {c}?" for c in COUNTRIES]
    for _ in range(60):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        prompts.append(rng.choice([f"What is {a} plus {b}?", f"What is {a} times {b}?",
                                   f"If I have {a + b} apples and give away {b}, how many are left?"]))
    return prompts


def chat(tok, user: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)


@torch.inference_mode()
def generate(model, tok, texts, *, new_tokens, batch, greedy, seed, deadline, top_p=1.0):
    """Continuations of ``texts``; returns ``[(ids, n_prompt)]``, each cut after its end-of-turn token."""
    tok.padding_side = "left"
    eos = tok.eos_token_id
    rows = []
    for start in range(0, len(texts), batch):
        if time.time() > deadline:
            print(f"  generation budget reached after {len(rows)} of {len(texts)}", flush=True)
            break
        enc = tok(texts[start: start + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(model.device)
        torch.manual_seed(seed * 1_000_003 + start)
        sampling = {} if greedy else {"temperature": 1.0, "top_k": 0, "top_p": top_p}
        out = model.generate(**enc, do_sample=not greedy, max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=eos, **sampling)
        width = enc.input_ids.shape[1]
        for j in range(out.shape[0]):
            prompt = enc.input_ids[j][enc.attention_mask[j].bool()]
            reply = out[j, width:]
            ends = (reply == eos).nonzero()
            n = int(ends[0]) + 1 if len(ends) else reply.shape[0]
            rows.append((torch.cat([prompt, reply[:n]]).to(torch.int32).cpu(), prompt.shape[0], greedy))
    return rows


def self_written_prompts(model, tok, n, batch, seed, deadline, exclude):
    """User turns the target writes when the chat template stops where one begins."""
    marker = "\x00"
    prefix = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False).split(marker)[0]
    rows = generate(model, tok, [prefix] * n, new_tokens=64, batch=batch, greedy=False, seed=seed,
                    deadline=deadline, top_p=0.95)
    seen, prompts = set(exclude), []
    for ids, n_prompt, _ in rows:
        if int(ids[-1]) != tok.eos_token_id or ids.shape[0] - n_prompt < 4:
            continue  # cut off, or too short to be a request
        text = tok.decode(ids[n_prompt:-1], skip_special_tokens=True).strip()
        if text and normalise(text) not in seen:
            seen.add(normalise(text))
            prompts.append(text)
    return prompts


def batches(rows, batch, rng):
    """Index batches of similar length (less padding), in random order, epoch after epoch."""
    while True:
        order = sorted(range(len(rows)), key=lambda i: (rows[i][0].shape[0], rng.random()))
        chunks = [order[i: i + batch] for i in range(0, len(order) - batch + 1, batch)]
        rng.shuffle(chunks)
        yield from chunks


def collate(rows, idx, max_len, device):
    """Right-padded ids and the flat positions whose NEXT token is generated."""
    seqs = [rows[i][0][:max_len].long() for i in idx]
    width = max(s.shape[0] for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    target = torch.zeros(len(seqs), width, dtype=torch.bool)
    for k, (s, i) in enumerate(zip(seqs, idx, strict=True)):
        ids[k, : s.shape[0]] = s
        target[k, rows[i][1] - 1: s.shape[0] - 1] = True  # position t predicts token t + 1
    return ids.to(device), target.flatten().nonzero().squeeze(1).to(device)


def hidden_at(model, ids, positions):
    """Final hidden states at flat ``positions`` (right padding needs no mask under causal attention)."""
    h = model.model(input_ids=ids, use_cache=False).last_hidden_state
    return h.flatten(0, 1).index_select(0, positions)


def loss_on(teacher, draft, head, ids, positions):
    with torch.no_grad():
        p = F.softmax(teacher.lm_head(hidden_at(teacher, ids, positions)).float(), -1).index_select(-1, head.index)
    log_q = F.log_softmax(head.subset_logits(hidden_at(draft, ids, positions)).float(), -1)
    return -(p * log_q).sum(-1).mean()


def build_draft(target, layers, init_layers, head_tokens):
    cfg = LlamaConfig(**{**target.config.to_dict(), "num_hidden_layers": layers, "tie_word_embeddings": False})
    cfg.quantization_config = None
    draft = LlamaForCausalLM(cfg).to(target.device)
    state = target.state_dict()
    for i, src in enumerate(init_layers):
        prefix = f"model.layers.{src}."
        draft.model.layers[i].load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    draft.model.norm.weight.data.copy_(state["model.norm.weight"])
    draft.model.embed_tokens = target.model.embed_tokens  # shared and frozen
    head_rows = target.get_output_embeddings().weight.detach()[head_tokens].clone()
    draft.lm_head = SubsetHead(head_rows, head_tokens, cfg.vocab_size)
    for p in draft.model.embed_tokens.parameters():
        p.requires_grad_(False)
    draft.lm_head.weight.requires_grad_(False)
    return draft


@torch.inference_mode()
def judge(target, draft, greedy_rows, sampled_rows, batch=32):
    """Greedy agreement on greedy replies and alpha = sum(min(p, q)) on sampled replies."""
    def scan(rows, fn):
        total = count = 0.0
        for start in range(0, len(rows), batch):
            ids, positions = collate(rows, range(start, min(start + batch, len(rows))), 10_000, target.device)
            with torch.autocast(target.device.type, dtype=torch.bfloat16):
                tl = target.lm_head(hidden_at(target, ids, positions)).float()
                dl = draft.lm_head(hidden_at(draft, ids, positions)).float()
            total += float(fn(tl, dl).sum())
            count += positions.numel()
        return total / max(count, 1)

    agree = scan(greedy_rows, lambda t, d: (t.argmax(-1) == d.argmax(-1)).float())
    alpha = scan(sampled_rows, lambda t, d: torch.minimum(t.softmax(-1), d.softmax(-1)).sum(-1))
    return {"greedy_agreement": agree, "alpha": alpha, "expected_accepted_gamma4": sum(alpha**k for k in range(1, 5))}


@torch.inference_mode()
def decoded_steps(dec, tok, prompts, new_tokens):
    """The step records of ``dec`` decoding each of ``prompts`` (chat template; seed = index)."""
    steps = []
    for i, text in enumerate(prompts):
        ids = tok(chat(tok, text), return_tensors="pt", add_special_tokens=False).input_ids.to(dec.target.device)
        steps += dec.generate(ids, new_tokens, torch.Generator().manual_seed(i), tok.eos_token_id).steps
    return steps


def specdecode_acceptance(target, draft, tok, prompts, new_tokens=64):
    """Mean accepted draft tokens per target call, gamma 4, T=1 (the project's decoder)."""
    dec = get_decoder("specdecode", target=target, draft=draft, gamma=4, temperature=1.0, top_k=0, top_p=1.0)
    steps = decoded_steps(dec, tok, prompts, new_tokens)
    return sum(s.accepted for s in steps) / len(steps)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", default=None, help="folder to keep the generated data in (reused when present)")
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--init-layers", default="0,1,2,3,4,5,6,28,29")
    ap.add_argument("--head-tokens", type=int, default=8192)
    ap.add_argument("--self-written", type=int, default=24576, help="user turns to ask the target for")
    ap.add_argument("--new-tokens", type=int, default=160)
    ap.add_argument("--gen-batch", type=int, default=2048)
    ap.add_argument("--gen-budget-s", type=float, default=0,
                    help="start no generation batch after this many seconds (0: no limit)")
    ap.add_argument("--held-out", type=int, default=128, help="held-out prompts that judge the draft")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=320)
    ap.add_argument("--steps", type=int, default=4200, help="optimizer steps (about 0.1 s each on an H200)")
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=float, default=0.05, help="share of the steps spent warming up")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    init_layers = [int(x) for x in args.init_layers.split(",")]
    if len(init_layers) != args.layers:
        ap.error(f"--init-layers names {len(init_layers)} layers for --layers {args.layers}")
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    t_start = time.time()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    target = load_model(args.target, dtype="float32", device=args.device)  # base of the stored deltas
    teacher = copy.deepcopy(target).to(torch.bfloat16)  # generates and teaches
    tok = load_tokenizer(args.target)
    if tok.pad_token is None:  # the GGUF tokenizer has none; padding is masked out
        tok.pad_token = tok.eos_token
    for p in [*target.parameters(), *teacher.parameters()]:
        p.requires_grad_(False)

    work = Path(args.work) if args.work else None
    data_file = work / "data.pt" if work else None
    if data_file and data_file.exists():
        data = torch.load(data_file)
        print(f"data: reused {data_file}", flush=True)
    else:
        t0 = time.time()
        deadline = t0 + args.gen_budget_s if args.gen_budget_s > 0 else math.inf
        excluded = profile_prompts()
        held_prompts = rng.sample(template_prompts(HELD_OUT_TOPICS, rng), args.held_out)
        prompts = [p for p in template_prompts(TOPICS, rng) + task_prompts() if normalise(p) not in excluded]
        written = self_written_prompts(teacher, tok, args.self_written, args.gen_batch, args.seed, deadline,
                                       excluded | {normalise(p) for p in prompts + held_prompts})
        for example in written[:5]:
            print(f"  written by the target: {example!r}", flush=True)
        print(f"prompts: {len(prompts)} from templates, {len(written)} written by the target "
              f"({time.time() - t0:.0f} s)", flush=True)
        prompts += written
        rng.shuffle(prompts)
        texts = [chat(tok, p) for p in prompts]
        held = [chat(tok, p) for p in held_prompts]
        common = dict(new_tokens=args.new_tokens, batch=args.gen_batch)
        far = time.time() + 3600  # the held-out set is small and must be complete
        data = {
            "held_prompts": held_prompts,
            "held_greedy": generate(teacher, tok, held, greedy=True, seed=1, deadline=far, **common),
            "held_sampled": generate(teacher, tok, held, greedy=False, seed=2, deadline=far, **common),
            "train": [],
            "prompts": len(prompts),
        }
        # Greedy and sampled replies batch by batch, so a budget cut keeps both kinds.
        for start in range(0, len(texts), args.gen_batch):
            chunk = texts[start: start + args.gen_batch]
            for greedy in (True, False):
                data["train"] += generate(teacher, tok, chunk, greedy=greedy, seed=3 + start, deadline=deadline,
                                          **common)
            if time.time() > deadline:
                data["prompts"] = start + len(chunk)
                break
        data["generation_s"] = time.time() - t0
        if data_file:
            work.mkdir(parents=True, exist_ok=True)
            torch.save(data, data_file)
    rows = data["train"]
    n_tokens = sum(ids.shape[0] - n for ids, n, _ in rows)
    print(f"data: {len(rows)} replies to {data['prompts']} prompts, {n_tokens} generated tokens "
          f"in {data['generation_s']:.0f} s", flush=True)

    # The head's tokens: the most frequent generated tokens (ties broken by id).
    counts = torch.zeros(target.config.vocab_size, dtype=torch.long)
    for ids, n, _ in rows:
        counts += torch.bincount(ids[n:].long(), minlength=counts.numel())
    n_head = min(args.head_tokens, counts.numel())
    head_tokens = torch.sort(torch.topk(counts, n_head, sorted=True).indices).values
    coverage = float(counts[head_tokens].sum() / counts.sum())
    print(f"head: {n_head} tokens cover {coverage:.4f} of the generated tokens", flush=True)

    draft = build_draft(target, args.layers, init_layers, head_tokens.to(device))
    head = draft.lm_head
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))

    def step_loss(idx):
        ids, positions = collate(rows, idx, args.max_len, device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return loss_on(teacher, draft, head, ids, positions)

    steps = args.steps
    warm = max(1, int(args.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    # Every tenth of the run the held-out alpha is measured and the best weights kept:
    # a draft this size can start to memorise its data within the run.
    checks = sorted({max(1, steps * k // 10) for k in range(1, 11)})
    best = {"score": {"alpha": -1.0}, "step": 0, "state": None}
    history = []
    t0 = time.time()
    stream = batches(rows, args.batch, rng)
    for step in range(1, steps + 1):
        draft.train()
        loss = step_loss(next(stream))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step in checks:
            draft.eval()
            score = judge(teacher, draft, data["held_greedy"], data["held_sampled"])
            history.append({"step": step, "cross_entropy": loss.item(), **score})
            print(f"step {step}/{steps} cross-entropy {loss.item():.3f}, held-out greedy agreement "
                  f"{score['greedy_agreement']:.3f}, alpha {score['alpha']:.3f} ({time.time() - t0:.0f} s)", flush=True)
            if not math.isfinite(loss.item()):
                raise SystemExit("training diverged")
            if score["alpha"] > best["score"]["alpha"]:
                best = {"score": score, "step": step,
                        "state": {k: v.detach().clone() for k, v in draft.state_dict().items()}}
    train_s = time.time() - t0
    draft.load_state_dict(best["state"])
    draft.eval()
    if work:  # the trained weights in full, should storing or judging fail
        torch.save({k: v for k, v in best["state"].items() if "embed_tokens" not in k}, work / "draft-state.pt")

    out = Path(args.out)
    stored = save_composed_draft(out, draft, target, init_layers, head_tokens)
    composed = compose_draft(out, target)
    held_greedy, held_sampled = data["held_greedy"], data["held_sampled"]
    report = {
        "recipe": vars(args),
        "command": "python scripts/train_draft.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "prompts": data["prompts"], "train_replies": len(rows), "train_generated_tokens": n_tokens,
        "held_out_prompts": len(data["held_prompts"]), "steps": steps, "kept_step": best["step"],
        "history": history,
        "data_generation_s": data["generation_s"], "train_s": train_s, "total_s": time.time() - t_start,
        "head_token_coverage": coverage, **stored,
        "held_out_trained": best["score"],  # the kept weights, judged when they were kept
        "held_out_stored": judge(teacher, composed, held_greedy, held_sampled),
        "train_sample_stored": judge(teacher, composed, [r for r in rows if r[2]][:128],
                                     [r for r in rows if not r[2]][:128]),
        "held_out_specdecode_T1_gamma4_mean_accepted": specdecode_acceptance(
            target, composed, tok, data["held_prompts"][:16]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else device.type,
        "torch": torch.__version__,
    }
    (out / "train.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
