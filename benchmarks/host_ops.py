"""What each decoder asks of the host per iteration, outside its forwards.

On a GPU every forward is one graph replay, so what a decoder's loop costs beyond its
forwards is the host's work: each PyTorch operation outside the graphs is a dispatch and,
unless it only makes a view, a kernel launch, and each read of a device value is a
synchronisation. Where a target step is short (SmolLM2: 0.5 ms) that work decides the
loop (``benchmarks/loop_profile.py`` shows the device idle). This counts it without a
GPU: every decoder runs on the fast path's static cache (graphs off, the same decoding
code), random Llama models of a small vocabulary, and a dispatch mode counts the
operations issued outside ``StaticCachedModel._forward`` (which a graph replays), split
into views and allocations (no kernel) and the rest, each about one kernel launch on a
GPU: a count of dispatched operations, not of kernels seen on a GPU. Averaged over a
64-token generation, its set-up included. Not counted: the device read each iteration
makes by design (the skeleton's ``tolist``: a synchronisation on a GPU, no dispatched
operation on a CPU tensor) and copies that are no-ops on a CPU (prompt lookup's drafts
sent to the device: one more launch per iteration on a GPU). On a GPU each decode
forward also launches its graph (the replay, the copy into its input buffer and the
clone of its output: ``GPU_LAUNCHES_PER_FORWARD``, for the one-input, one-output graphs
of the decoders here), added in the last column; the prompt's forward, eager on a GPU,
is counted there like a decode forward. MTAD runs at T=1 only (its joint test needs a
distribution).

    python benchmarks/host_ops.py [--methods sampling,specdecode,prompt_lookup,mtad] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from markdown_result import print_table, write_result  # noqa: E402

import decoders  # noqa: E402
from decoders import static  # noqa: E402

METHODS = ("sampling", "specdecode", "prompt_lookup", "mtad")
SETTINGS = {"greedy": {"temperature": 0.0}, "t1": {"temperature": 1.0, "top_k": 10, "top_p": 0.9}}
# Operations that neither launch a kernel nor read the device: allocations and aliasing.
NO_KERNEL = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.new_empty.default", "aten.detach_.default",
             "aten.lift_fresh.default", "aten.resolve_conj.default", "aten.resolve_neg.default"}


GPU_LAUNCHES_PER_FORWARD = 3  # decoders.static._Graph.replay: copy_, replay, clone


class _Counter(TorchDispatchMode):
    """Counts the operations dispatched outside the forwards (while ``depth`` is 0): ``counts``
    per kind ("view", "launch") and per operation, ``launched`` the launching ones by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.launched: collections.Counter[str] = collections.Counter()
        self.depth = 0  # > 0 inside a forward

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.depth:
            name = str(func)
            kind = "view" if func.is_view or name in NO_KERNEL else "launch"
            self.counts[kind] += 1
            self.counts[name] += 1
            if kind == "launch":
                self.launched[name] += 1
        return func(*args, **(kwargs or {}))


def _model(vocab: int, layers: int, hidden: int, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def measure(method: str, setting: str, target, draft, prompt: torch.Tensor, new_tokens: int) -> dict:
    kw = {"draft": draft} if decoders.decoder_class(method).needs_draft else {}
    decoder = decoders.get_decoder(method, target=target, cuda_graphs=False, **kw, **SETTINGS[setting])
    decoder.static_cache = True
    generator = torch.Generator().manual_seed(0)
    decoder.generate(prompt, 8, generator=generator)  # caches built
    counter = _Counter()
    forward = static.StaticCachedModel._forward

    def counted_forward(self, *args, **kwargs):
        counter.depth += 1
        try:
            return forward(self, *args, **kwargs)
        finally:
            counter.depth -= 1

    static.StaticCachedModel._forward = counted_forward
    try:
        with counter:
            out = decoder.generate(prompt, new_tokens, generator=generator)
    finally:
        static.StaticCachedModel._forward = forward
    iterations = len(out.steps)
    forwards = out.target_forwards + out.draft_forwards
    c = counter.counts
    return {"method": method, "setting": setting, "iterations": iterations, "tokens": len(out.tokens),
            "forwards_per_iteration": forwards / iterations,
            "launches_per_iteration": c["launch"] / iterations, "views_per_iteration": c["view"] / iterations,
            "gpu_launches_per_iteration": (c["launch"] + GPU_LAUNCHES_PER_FORWARD * forwards) / iterations,
            "top_launches": {k: v / iterations for k, v in counter.launched.most_common()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    target, draft = _model(512, 2, 64, 0), _model(512, 1, 32, 1)
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10] * 16])  # repeats, so prompt lookup drafts
    rows = [measure(m, s, target, draft, prompt, args.new_tokens)
            for m in args.methods.split(",") for s in args.settings.split(",") if (m, s) != ("mtad", "greedy")]
    print_table(["decoder", "setting", "forwards / iteration", "launches / iteration", "views",
                 "most frequent launches", "launches / iteration on a GPU"],
                [[r["method"], r["setting"], f"{r['forwards_per_iteration']:.2f}", f"{r['launches_per_iteration']:.1f}",
                  f"{r['views_per_iteration']:.1f}",
                  ", ".join(f"{k.split('.')[1]} {v:.1f}" for k, v in list(r["top_launches"].items())[:5]),
                  f"{r['gpu_launches_per_iteration']:.0f}"] for r in rows])
    write_result(args.out, rows)


if __name__ == "__main__":
    main()
