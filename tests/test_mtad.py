"""MTAD: the joint-likelihood acceptance rule and the quality effect it exists for."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import wilcoxon

import decoders.mtad as mtad_module
from decoders import get_decoder, mtad_accept_length
from tests.conftest import random_llama

LOG = math.log


def block(ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """log_p, log_q whose per-token ratios p_j/q_j are ``ratios`` (q_j = 0.5)."""
    log_q = torch.full((len(ratios),), LOG(0.5))
    log_p = log_q + torch.tensor([LOG(r) for r in ratios])
    return log_p, log_q


@pytest.mark.parametrize(
    ("ratios", "expected"),
    [
        ([1.0, 1.0, 1.0, 1.0], 4),  # everything passes
        ([0.4, 0.4, 0.4, 0.4], 0),  # joint ratios 0.4, 0.16, ...: nothing passes tau 0.5
        ([0.9, 0.3, 3.0, 0.2], 3),  # depth 2 fails (0.27), depth 3 passes again (0.81)
        ([0.3, 2.0, 0.5, 1.0], 2),  # depth 1 fails (0.3) but depth 2 passes (0.6)
        ([1.0, 0.4, 1.0, 1.0], 1),  # prefix ratios 1.0, 0.4, 0.4, 0.4
    ],
)
def test_accept_length_is_longest_passing_prefix(ratios, expected):
    log_p, log_q = block(ratios)
    assert mtad_accept_length(log_p, log_q, accept_thres=0.5) == expected


def test_accept_length_threshold_is_strict_and_handles_impossible_tokens():
    log_p, log_q = block([0.5, 2.0])  # depth 1 equals tau exactly: not "> tau"
    assert mtad_accept_length(log_p, log_q, 0.5) == 2
    assert mtad_accept_length(*block([0.5]), 0.5) == 0
    log_p = torch.tensor([LOG(0.5), float("-inf"), LOG(0.5)])  # target gives x_2 probability 0
    assert mtad_accept_length(log_p, torch.full((3,), LOG(0.5)), 0.5) == 1


def test_decoder_commits_what_the_rule_accepts(tiny, prompt, monkeypatch):
    """Every step's accepted count is the rule's answer on that step's block."""
    answers = []

    def spy(log_p, log_q, tau):
        n = mtad_accept_length(log_p, log_q, tau)
        answers.append(n)
        return n

    monkeypatch.setattr(mtad_module, "mtad_accept_length", spy)
    dec = get_decoder("mtad", target=tiny.target, draft=tiny.draft, gamma=4)
    out = dec.generate(prompt, max_new_tokens=40, generator=torch.Generator().manual_seed(3))
    assert [s.accepted for s in out.steps if s.drafted] == answers
    assert any(0 < n < 4 for n in answers), "the tiny pair should give partial acceptances"
    for s in out.steps:
        assert 0 <= s.accepted <= s.drafted <= 4


def mean_target_loglik(target, prompt, tokens) -> float:
    """Mean log p(y_j | y_<j) under the unfiltered target."""
    seq = torch.cat([prompt[0], tokens]).view(1, -1)
    with torch.inference_mode():
        logp = torch.log_softmax(target(seq).logits[0, prompt.shape[1] - 1 : -1].float(), -1)
    return float(logp.gather(1, tokens.view(-1, 1)).mean())


def test_mtad_raises_output_likelihood_over_sampling():
    """With draft == target, MTAD keeps the best of several sampled beams, so its
    outputs are more likely under the target than plain sampling's.

    Paired over 40 seeds (same temperature, top-k, top-p), one-sided Wilcoxon
    signed-rank test at significance 1e-3.
    """
    target = random_llama(64, seed=5, layers=2, hidden=32, init=0.15)  # peaked next-token distributions
    prompt = torch.tensor([[3, 17, 42, 8]])
    filters = {"temperature": 1.0, "top_k": 10, "top_p": 0.9}
    sampling = get_decoder("sampling", target=target, **filters)
    mtad = get_decoder("mtad", target=target, draft=target, gamma=4, beam_width=4, **filters)
    diffs = []
    for seed in range(40):
        outs = [
            dec.generate(prompt, max_new_tokens=24, generator=torch.Generator().manual_seed(seed))
            for dec in (sampling, mtad)
        ]
        ll_sampling, ll_mtad = (mean_target_loglik(target, prompt, o.tokens) for o in outs)
        diffs.append(ll_mtad - ll_sampling)
    assert wilcoxon(diffs, alternative="greater").pvalue < 1e-3, diffs


@pytest.mark.parametrize("replacement", [False, True])
def test_perfect_draft_at_temperature_one_accepts_every_block(tiny, prompt, replacement):
    """With draft == target, q equals p on the kept beam, so every joint ratio is 1 > tau.

    This holds only if the draft cache follows the beams (reordered by parent at
    every depth, then reduced to the kept beam): a stale cache row gives the kept
    beam a q computed on another beam's history, and blocks get rejected.
    """
    dec = get_decoder("mtad", target=tiny.target, draft=tiny.target, gamma=4, beam_width=4,
                      replacement=replacement)  # reference filters: T=1, top-k 10, top-p 0.9
    for seed in range(5):
        out = dec.generate(prompt, max_new_tokens=40, generator=torch.Generator().manual_seed(seed))
        assert all(s.accepted == s.drafted for s in out.steps), [(s.drafted, s.accepted) for s in out.steps]
