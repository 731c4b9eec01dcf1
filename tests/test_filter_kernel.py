"""The top-k filter's kernels (``decoders.filter_kernel``) give ``probs.filtered_probs_torch``'s result.

On a machine without a GPU they run under Triton's interpreter. Logits are drawn on
a bfloat16 grid, as a bfloat16 model's head gives them, so that many tokens tie, at
the k-th place too, and the vocabulary spans several chunks with a ragged last one.
"""

from __future__ import annotations

import pytest
import torch

from decoders import filter_kernel, probs

pytestmark = pytest.mark.skipif(filter_kernel.triton is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g) * scale).bfloat16().float().to(DEVICE)


@pytest.mark.parametrize("top_k,top_p", [(10, 0.9), (1, 0.9), (10, 1.0), (50, 0.5), (64, 0.999), (3, 0.01)])
def test_kernel_filter_matches_the_pytorch_filter(top_k, top_p):
    logits = _logits(3, 2 * filter_kernel.CHUNK + 1000, seed=top_k)
    got = filter_kernel.filtered_probs(logits, 1.0, top_k, top_p)
    expected = probs.filtered_probs_torch(logits, 1.0, top_k, top_p)
    assert torch.equal(got > 0, expected > 0)  # the same tokens survive, ties included
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.sum(-1), torch.ones(3, device=DEVICE))


def test_ties_with_the_kth_logit_stay_and_count_in_the_nucleus():
    """Twenty tokens share the largest logit: a top-5 keeps all twenty (as transformers
    does), and a nucleus cut below them keeps all twenty, each with 1/20."""
    logits = _logits(2, filter_kernel.CHUNK + 7, seed=3, scale=1.0)
    tied = torch.arange(20, device=DEVICE) * 199  # spread over both chunks
    logits[:, tied] = 20.0
    for top_p in (1.0, 0.3):
        got = filter_kernel.filtered_probs(logits, 1.0, 5, top_p)
        expected = probs.filtered_probs_torch(logits, 1.0, 5, top_p)
        assert torch.equal(got > 0, expected > 0)
        assert int((got[0] > 0).sum()) == 20
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_a_temperature_scales_the_logits_first():
    logits = _logits(2, 3000, seed=4)
    got = filter_kernel.filtered_probs(logits, 0.7, 20, 0.9)
    expected = probs.filtered_probs_torch(logits, 0.7, 20, 0.9)
    assert torch.equal(got > 0, expected > 0)  # the token at the nucleus's cut too
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, device=DEVICE))


def test_leading_dimensions_are_kept():
    logits = _logits(6, 500, seed=5).view(2, 3, 500)
    got = filter_kernel.filtered_probs(logits, 1.0, 10, 0.9)
    assert got.shape == (2, 3, 500)
    torch.testing.assert_close(got, probs.filtered_probs_torch(logits, 1.0, 10, 0.9), rtol=1e-5, atol=1e-7)


def test_what_the_kernels_do_not_serve():
    logits = _logits(1, 100, seed=6)
    assert filter_kernel.supports(logits, 1.0, 10)
    assert not filter_kernel.supports(logits, 0.0, 10)  # greedy: an argmax
    assert not filter_kernel.supports(logits, 1.0, 0)  # top-p alone sorts the vocabulary
    assert not filter_kernel.supports(logits, 1.0, filter_kernel.MAX_K + 1)
    assert not filter_kernel.supports(logits, 1.0, 100)
    assert not filter_kernel.supports(logits.half(), 1.0, 10)
