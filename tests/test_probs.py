"""Filtering and sampling primitives shared by all decoders."""

from __future__ import annotations

import pytest
import torch

from decoders.probs import filtered_probs, sample, sample_many

LOGITS = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))


def test_no_filter_is_softmax():
    assert torch.allclose(filtered_probs(LOGITS, 1.0, 0, 1.0), torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))


def test_temperature_zero_is_one_hot_argmax():
    assert filtered_probs(LOGITS, 0.0, 0, 1.0).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_top_k_keeps_k_most_likely_and_renormalises():
    p = filtered_probs(LOGITS, 1.0, 2, 1.0)
    assert torch.allclose(p, torch.tensor([5 / 7, 2 / 7, 0, 0, 0]))


def test_top_p_keeps_smallest_prefix_reaching_p():
    # 0.5 + 0.2 = 0.7 < 0.8, so the third token is needed; the fourth is not.
    p = filtered_probs(LOGITS, 1.0, 0, 0.8)
    assert torch.allclose(p, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    assert filtered_probs(LOGITS, 1.0, 0, 0.01).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_temperature_then_top_k_then_top_p():
    p = filtered_probs(LOGITS, 0.5, 3, 0.9)
    sharp = torch.tensor([0.5, 0.2, 0.15]) ** 2
    sharp = sharp / sharp.sum()  # [0.781, 0.125, 0.070]: top-p 0.9 keeps the first two
    expected = torch.tensor([sharp[0], sharp[1], 0, 0, 0])
    assert torch.allclose(p, expected / expected.sum(), atol=1e-6)


def test_sample_frequencies_match_probabilities():
    # 20,000 draws: each frequency's standard error is <= 0.0036; 5 sigma = 0.018.
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    g = torch.Generator().manual_seed(0)
    draws = sample(probs.expand(20_000, 5), g)
    freq = torch.bincount(draws, minlength=5).float() / 20_000
    assert torch.allclose(freq, probs, atol=0.018)


def test_sample_many_without_replacement_is_distinct_and_prefers_positive():
    probs = torch.tensor([0.0, 0.6, 0.0, 0.4, 0.0])
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        picks = sample_many(probs, 3, replacement=False, generator=g).tolist()
        assert len(set(picks)) == 3
        assert set(picks[:2]) == {1, 3}  # positive-probability picks come first
    with_rep = sample_many(probs, 64, replacement=True, generator=g)
    assert set(with_rep.tolist()) <= {1, 3} and len(with_rep) == 64


def _sorted_reference(logits, top_k, top_p):
    """Top-k by threshold, then top-p over a full sort: the textbook form."""
    if top_k:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[..., -1:], float("-inf"))
    probs = torch.softmax(logits, -1)
    ordered, order = torch.sort(probs, descending=True)
    drop = (ordered.cumsum(-1) - ordered) >= top_p
    probs = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
    return probs / probs.sum(-1, keepdim=True)


@pytest.mark.parametrize(("top_k", "top_p"), [(10, 0.9), (0, 0.9), (50, 0.5), (3, 0.99)])
def test_top_p_over_the_top_k_survivors_equals_a_full_sort(top_k, top_p):
    """The fast form (nucleus over topk's sorted survivors) is the textbook one."""
    logits = 3 * torch.randn(8, 1000, generator=torch.Generator().manual_seed(top_k))
    torch.testing.assert_close(filtered_probs(logits, 1.0, top_k, top_p), _sorted_reference(logits, top_k, top_p))


def test_ties_at_a_cut_stay():
    """Tokens tied with the k-th logit (bf16 logits tie often) stay, as in transformers;
    so do tokens tied with the last one the nucleus keeps."""
    logits = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0, 1.0])
    assert (filtered_probs(logits, 1.0, 3, 1.0) > 0).tolist() == [True] * 5 + [False]
    assert (filtered_probs(logits, 1.0, 0, 0.8) > 0).tolist() == [True] * 5 + [False]
