"""Speculative sampling is distribution-exact: a statistical test that can fail.

On a 6-token vocabulary we enumerate the target's exact joint distribution of
the first two generated tokens (36 cells) and compare it with the empirical
distribution of ``specdecode`` over N seeded runs, by Pearson's chi-square test.

Tolerance: the test rejects at significance ALPHA = 1e-3, i.e. a correct
implementation fails it with probability 0.1% for a fresh set of seeds (the
seeds are fixed, so the outcome is reproducible). With N = 3000 the per-cell
standard error is at most sqrt(0.25 / 3000) ~ 0.009, and the chi-square test
has power near 1 against the "no residual" bug below, whose bias here is an
order of magnitude larger; the same test asserts that it catches that bug.
"""

from __future__ import annotations

import copy

import pytest
import torch
from scipy.stats import chisquare

import decoders.specdecode as sd
from decoders import get_decoder
from decoders.probs import filtered_probs
from harness.composed_draft import SubsetHead
from tests.conftest import random_llama

VOCAB = 6
N_RUNS = 3000
ALPHA = 1e-3
PROMPT = torch.tensor([[1, 4, 2]])


@pytest.fixture(scope="module")
def pair():
    # Large init makes both distributions peaked and different from each other,
    # so drafts are often rejected and the residual matters.
    target = random_llama(VOCAB, seed=1, init=0.4)
    draft = random_llama(VOCAB, seed=2, init=0.4)
    return target, draft


def exact_joint(target, filters, prompt: torch.Tensor = PROMPT) -> torch.Tensor:
    """p(t1, t2 | prompt) for all 36 pairs, by enumeration."""
    with torch.inference_mode():
        p1 = filtered_probs(target(prompt).logits[0, -1], **filters)
        rows = torch.cat([prompt.repeat(VOCAB, 1), torch.arange(VOCAB).view(-1, 1)], dim=1)
        p2 = filtered_probs(target(rows).logits[:, -1], **filters)
    return p1.unsqueeze(1) * p2  # (t1, t2)


def empirical_counts(target, draft, filters) -> torch.Tensor:
    dec = get_decoder("specdecode", target=target, draft=draft, gamma=2, **filters)
    counts = torch.zeros(VOCAB, VOCAB)
    for seed in range(N_RUNS):
        # 3 tokens with gamma 2: the first two cover rejection at draft position 1
        # and 2 (each residual) and full acceptance (bonus token from p_3).
        out = dec.generate(PROMPT, max_new_tokens=3, generator=torch.Generator().manual_seed(seed))
        counts[out.tokens[0], out.tokens[1]] += 1
    return counts


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test, pooling cells with expected count < 5 so it stays valid."""
    expected = probs.flatten().double()
    expected = expected / expected.sum() * counts.sum()  # float32 probs sum to 1 only roughly
    observed = counts.flatten().double()
    small = expected < 5
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    obs = torch.cat([observed[~small], observed[small].sum().view(1)])
    keep = exp > 0
    if obs[~keep].sum() > 0:  # a sample in a zero-probability cell: impossible
        return 0.0
    assert int(keep.sum()) >= 5, "too few cells for a meaningful test: the models are too peaked"
    return float(chisquare(obs[keep].numpy(), exp[keep].numpy()).pvalue)


_correct_accept = sd.speculative_accept


def _no_residual(p, q, drafts, uniforms):
    """A classic bug: after a rejection, resample from p instead of the residual."""
    n, _ = _correct_accept(p, q, drafts, uniforms)
    return n, p[n]


FILTERS = [
    {"temperature": 1.0, "top_k": 0, "top_p": 1.0},
    {"temperature": 1.5, "top_k": 4, "top_p": 0.95},  # every filter active, 10 cells left
]


@pytest.mark.parametrize("filters", FILTERS, ids=["plain", "filtered"])
def test_specdecode_matches_target_joint_distribution(pair, filters):
    target, draft = pair
    probs = exact_joint(target, filters)
    counts = empirical_counts(target, draft, filters)
    pvalue = chi_square_pvalue(counts, probs)
    assert pvalue > ALPHA, f"specdecode deviates from the target distribution (p = {pvalue:.2e})"


def test_specdecode_is_exact_when_the_draft_cannot_propose_every_token(pair):
    """A draft whose head scores half the vocabulary (q = 0 elsewhere, as the shipped
    SmolLM2 draft's 8192-token head does): those tokens come only from residuals."""
    target, draft = pair
    subset = copy.deepcopy(draft)
    index = torch.tensor([0, 2, 3])
    subset.lm_head = SubsetHead(draft.lm_head.weight.detach()[index].clone(), index, VOCAB)
    filters = FILTERS[0]
    counts = empirical_counts(target, subset, filters)
    assert counts[[1, 4, 5]].sum() > 0  # tokens the draft never proposes still appear
    pvalue = chi_square_pvalue(counts, exact_joint(target, filters))
    assert pvalue > ALPHA, f"specdecode deviates from the target distribution (p = {pvalue:.2e})"


def test_same_test_rejects_a_wrong_variant(pair, monkeypatch):
    """Without the residual distribution the output is biased, and the test sees it."""
    target, draft = pair
    filters = FILTERS[0]
    probs = exact_joint(target, filters)
    monkeypatch.setattr(sd, "speculative_accept", _no_residual)
    counts = empirical_counts(target, draft, filters)
    pvalue = chi_square_pvalue(counts, probs)
    assert pvalue < ALPHA, f"the test failed to detect a biased sampler (p = {pvalue:.2e})"

