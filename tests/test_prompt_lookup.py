"""Prompt lookup decoding: the n-gram proposer, greedy equality, and exactness at T=1.

The exactness test is ``test_specdecode_exact``'s: the joint distribution of the
first two tokens over N seeded runs against the target's, by Pearson's
chi-square at ALPHA = 1e-3, on a prompt whose suffix recurs, so that the
proposer drafts in every run (asserted). Drafts are deterministic, so the
verifier's residual is ``p`` with the drafted token removed; the same test must
reject a variant that resamples from ``p`` instead.
"""

from __future__ import annotations

import pytest
import torch

import decoders.specdecode as sd
from decoders import get_decoder
from decoders.prompt_lookup import NgramProposer
from tests.conftest import random_llama
from tests.test_specdecode_exact import ALPHA, VOCAB, _no_residual, chi_square_pvalue, exact_joint

GREEDY = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
# "3 5" recurs: its earlier occurrence is followed by "4 1", which is drafted first. The
# target gives those drafts probability 0.49 and 0.44 (T=1), so rejections are frequent
# and the wrong variant's bias (p(x)(1 - p(x)) on the first token) is large.
PROMPT = torch.tensor([[3, 5, 4, 1, 0, 3, 5]])
N_RUNS = 3000


def lookup(history, budget, max_ngram=3, min_ngram=1):
    return NgramProposer(history, max_ngram, min_ngram, torch.device("cpu")).lookup(budget)


@pytest.mark.parametrize(
    ("history", "budget", "expected"),
    [
        ([1, 2, 3, 4, 2, 3], 5, [4, 2, 3]),  # "2 3" found at 1; what followed it, up to the end
        ([1, 2, 3, 4, 2, 3], 1, [4]),  # cut to the budget
        ([7, 1, 2, 9, 1, 2, 8, 1, 2], 2, [8, 1]),  # the LATEST earlier occurrence wins
        ([5, 1, 2, 3, 6, 2, 3], 3, [6, 2, 3]),  # longest n first: "2 3" (at 5) beats "3" alone
        ([1, 2, 3], 4, []),  # nothing recurs: no draft
    ],
)
def test_lookup_finds_the_latest_longest_match(history, budget, expected):
    assert lookup(history, budget) == expected


def test_lookup_respects_the_ngram_range():
    history = [9, 1, 2, 3, 7, 8, 3]  # only the 1-gram "3" recurs
    assert lookup(history, 2, min_ngram=1) == [7, 8]
    assert lookup(history, 2, min_ngram=2) == []


def test_proposer_follows_committed_tokens():
    proposer = NgramProposer([1, 2, 3], 2, 1, torch.device("cpu"))
    assert proposer.lookup(3) == []
    proposer.commit([1, 2], kept=3)  # history 1 2 3 1 2: "1 2" recurs
    assert proposer.lookup(3) == [3, 1, 2]


def _scan(history, budget, max_ngram, min_ngram):
    """The definition, by brute force: the latest earlier window equal to the longest suffix."""
    for n in range(min(max_ngram, len(history) - 1), min_ngram - 1, -1):
        starts = [i for i in range(len(history) - n) if history[i : i + n] == history[-n:]]
        if starts:
            return history[starts[-1] + n : starts[-1] + n + budget]
    return []


@pytest.mark.parametrize(("max_ngram", "min_ngram"), [(3, 1), (4, 2), (1, 1), (3, 3), (2, 2)])
def test_index_agrees_with_a_scan_of_the_history(max_ngram, min_ngram):
    """The proposer's n-gram index (the prompt's built at once, then updated as tokens are
    committed, in chunks of any size, none included) proposes what a scan of the whole
    history finds, for prompts shorter and longer than the n-grams, before and after every commit."""
    rng = torch.Generator().manual_seed(0)

    def draw(low, high):  # a small vocabulary: many repeats
        return torch.randint(0, 4, (int(torch.randint(low, high + 1, (1,), generator=rng)),), generator=rng).tolist()

    for _ in range(40):
        history = draw(0, 6)
        proposer = NgramProposer(history, max_ngram, min_ngram, torch.device("cpu"))
        for step in range(16):
            if step:
                new = draw(0, 4)
                proposer.commit(new, kept=len(history))
                history = history + new
            for budget in (1, 3, 8):
                assert proposer.lookup(budget) == _scan(history, budget, max_ngram, min_ngram), history


def test_bad_ngram_range_is_refused(tiny):
    with pytest.raises(ValueError, match=r"min_ngram \(3\) must be <= max_ngram \(2\)"):
        get_decoder("prompt_lookup", target=tiny.target, max_ngram=2, min_ngram=3)
    with pytest.raises(ValueError, match="max_ngram must be >= 1"):
        get_decoder("prompt_lookup", target=tiny.target, max_ngram=0)


@pytest.mark.parametrize("gamma", [1, 3, 8])
def test_greedy_equals_greedy_sampling_and_drafts(tiny, gamma):
    # A repetitive prompt: the target's greedy continuation of the tiny model loops, so drafts get accepted.
    prompt = tiny.tokenizer("abc abc abc abc abc", return_tensors="pt").input_ids
    greedy = get_decoder("sampling", target=tiny.target, **GREEDY).generate(prompt, 48)
    out = get_decoder("prompt_lookup", target=tiny.target, gamma=gamma, **GREEDY).generate(prompt, 48)
    assert torch.equal(out.tokens, greedy.tokens)
    assert out.draft_forwards == 0
    drafted, accepted = sum(s.drafted for s in out.steps), sum(s.accepted for s in out.steps)
    assert drafted > 0 and accepted > 0, "the prompt should make prompt lookup draft and be right sometimes"
    assert all(0 <= s.accepted <= s.drafted <= gamma for s in out.steps)
    assert out.target_forwards == len(out.steps) < 48


@pytest.fixture(scope="module")
def target():
    return random_llama(VOCAB, seed=1, init=0.4)  # peaked: drafts are often rejected


def counts_of_first_two(target, filters):
    dec = get_decoder("prompt_lookup", target=target, gamma=2, max_ngram=2, **filters)
    counts, drafted_first = torch.zeros(VOCAB, VOCAB), 0
    for seed in range(N_RUNS):
        out = dec.generate(PROMPT, max_new_tokens=3, generator=torch.Generator().manual_seed(seed))
        counts[out.tokens[0], out.tokens[1]] += 1
        drafted_first += out.steps[0].drafted == 2
    assert drafted_first == N_RUNS, "the first step must draft in every run, or the test checks sampling only"
    return counts


FILTERS = [
    {"temperature": 1.0, "top_k": 0, "top_p": 1.0},
    {"temperature": 1.5, "top_k": 4, "top_p": 0.95},
]


@pytest.mark.slow
@pytest.mark.parametrize("filters", FILTERS, ids=["plain", "filtered"])
def test_prompt_lookup_matches_target_joint_distribution(target, filters):
    pvalue = chi_square_pvalue(counts_of_first_two(target, filters), exact_joint(target, filters, PROMPT))
    assert pvalue > ALPHA, f"prompt_lookup deviates from the target distribution (p = {pvalue:.2e})"


@pytest.mark.slow
def test_same_test_rejects_resampling_from_p(target, monkeypatch):
    filters = FILTERS[0]
    monkeypatch.setattr(sd, "speculative_accept", _no_residual)
    pvalue = chi_square_pvalue(counts_of_first_two(target, filters), exact_joint(target, filters, PROMPT))
    assert pvalue < ALPHA, f"the test failed to detect a biased sampler (p = {pvalue:.2e})"
