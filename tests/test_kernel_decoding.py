"""The decoders over the decode kernels, driven as a GPU drives them, checked on the CPU.

On a GPU every decode step of up to ``fused.KERNEL_ROWS`` rows runs
``decoders.decode_kernels`` inside a captured graph: a ``StaticCachedModel`` captures
its ``_compiled_forward``, whose engine takes the kernels. Here the kernels run under
Triton's interpreter (float16: its bfloat16 products are wrong) and each graph is a
stand-in that runs the forward a capture records on every replay, so the decoders
drive the kernels exactly as on a GPU (one-token steps, verification blocks, beams
in cache rows, an EAGLE head fed the target's features, crops, shapes prepared after
the first step). At temperature 0 they must decode what the eager static-cache path
decodes. ``tests/test_decode_kernels.py`` checks the kernels themselves.
"""

from __future__ import annotations

import contextlib
import copy
import os
from types import SimpleNamespace

import pytest
import torch

from decoders import decode_kernels, static
from tests.fastpath import DECODERS, assert_same_decoding, decode

# They run the kernels on CPU tensors, which only the interpreter takes (tests/conftest.py
# turns it on where no GPU is present); on a GPU the gpu-marked tests cover the kernel path.
pytestmark = [pytest.mark.skipif(decode_kernels.triton is None, reason="triton is not installed"),
              pytest.mark.skipif(torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="the kernels run under Triton's interpreter, off where a GPU is present")]


class _ReplayedForward(static._Graph):
    """A captured graph's stand-in: each replay runs the forward the capture would have
    recorded (the compiled form where the cache compiles), over the same buffers, after
    the eager forward of the same step, whose output it records beside its own in
    ``pairs`` (the compiled form's cache writes come last, as on a GPU)."""

    pairs: list = []

    def __init__(self, owner, inputs, keep, filters, hidden) -> None:
        self.inputs = tuple(t.expand(owner.rows, *t.shape[1:]).clone() for t in inputs)
        self.replays = 0

        def run() -> None:
            expected = owner._forward(self.inputs, keep, filters=filters, hidden=hidden)
            self.out = owner._compiled_forward(self.inputs, keep, filters=filters, hidden=hidden)
            self.pairs.append((self.out, expected))

        self.graph = SimpleNamespace(replay=run)
        run()
        self.first_out = self.out


@contextlib.contextmanager
def kernel_path():
    """Inside: static caches 'capture' their decode steps and run them through the kernels.
    Yields the caches taken, the count of gemv launches and each step's (kernels, eager) outputs."""
    acquire, taken = static.acquire, []

    def acquire_with_graphs(model, rows, max_length, graphs, busy, compile=False):
        # Built as a GPU builds it (compile=None: the fused engine's compiled form), then
        # marked as graphing, which on a CPU only the stand-in above makes possible.
        cache = acquire(model, rows, max_length, graphs, busy, compile=None)
        cache.graphs = True
        taken.append(cache)
        return cache

    config = decode_kernels.gemv_config

    def few_programs(n, k, rows=1, gated=False, norm=False):
        # Under the interpreter each program is a loop in Python: wide output blocks, few
        # programs (the configurations the GPU uses are test_decode_kernels' business).
        block_n, block_k, warps, stages = config(n, k, rows, gated, norm)
        return max(block_n, 64), block_k, warps, stages

    gemv = decode_kernels.gemv

    def counted_gemv(*args, **kwargs):
        launches["gemv"] += 1
        return gemv(*args, **kwargs)

    launches = {"gemv": 0}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode_kernels, "available", lambda device: True)  # as on a GPU
        patch.setattr(decode_kernels, "gemv_config", few_programs)
        patch.setattr(decode_kernels, "gemv", counted_gemv)
        patch.setattr(static, "LENGTH_BUCKET", 64)  # caches of 64 positions: one attention chunk
        patch.setattr(static, "_Graph", _ReplayedForward)
        patch.setattr(_ReplayedForward, "pairs", [])
        patch.setattr(static, "acquire", acquire_with_graphs)
        try:
            yield SimpleNamespace(caches=taken, launches=launches, pairs=_ReplayedForward.pairs)
        finally:
            for cache in taken:  # graph-marked CPU caches must not serve a later test
                static.release_all(cache.model)


@pytest.fixture(scope="module")
def half_pair(tiny):
    """The tiny pair in float16 (the interpreter's kernels' dtype)."""
    return SimpleNamespace(target=copy.deepcopy(tiny.target).half(), draft=copy.deepcopy(tiny.draft).half())


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoders_on_the_kernel_path_decode_like_the_eager_path(half_pair, prompt, name):
    plain = decode(name, half_pair.target, half_pair.draft, prompt, fast="static", n=16, temperature=0.0)
    with kernel_path() as path:
        fast = decode(name, half_pair.target, half_pair.draft, prompt, fast="static", n=16, temperature=0.0)
        assert path.caches and all(c.engine is not None and c.engine.kernels for c in path.caches), \
            "a cache did not take the kernels"
        assert all(c.replays for c in path.caches), "a cache replayed no decode step"
        # Five a layer and the head, per forward of every decode step.
        assert path.launches["gemv"] >= 5 * fast.target_forwards, "the steps did not run the kernels"
    assert_same_decoding(fast, plain)
    if name != "sampling":
        assert any(s.accepted < s.drafted for s in fast.steps), "no rejection: the crops are untested"


@pytest.mark.parametrize("name", list(DECODERS))
def test_every_step_the_decoders_feed_matches_its_eager_forward(half_pair, prompt, name):
    """Each decode step the decoders run through the kernels (whatever its tokens, rows,
    position, features or kept logits) gives the distributions (and features) of the eager
    forward of the same step, to float16 rounding: unfiltered at T=1, so every logit counts.

    Tolerance: the two forms' log-probabilities differ by at most 5e-4 here; a step that
    attends one position off differs by 0.036-0.073, so 5e-3 tells them apart both ways."""
    with kernel_path() as path:
        decode(name, half_pair.target, half_pair.draft, prompt, fast="static", n=16, seed=3,
               temperature=1.0, top_k=0, top_p=1.0)
    assert len(path.pairs) >= 8, "too few steps ran through the kernels"
    for got, expected in path.pairs:
        probs, want = (got[0], expected[0]) if isinstance(got, tuple) else (got, expected)
        torch.testing.assert_close(probs.log(), want.log(), rtol=0, atol=5e-3)
        if isinstance(got, tuple):  # an EAGLE target's features: float16 states of unit scale
            torch.testing.assert_close(got[1].float(), expected[1].float(), rtol=1e-2, atol=1e-2)
