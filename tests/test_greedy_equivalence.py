"""Temperature 0: assisted decoders reduce to greedy decoding of the target."""

from __future__ import annotations

import pytest
import torch

from decoders import get_decoder

GREEDY = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}


def generate(name, target, draft, prompt, n=48, **params):
    dec = get_decoder(name, target=target, draft=draft, **{**GREEDY, **params})
    return dec.generate(prompt, max_new_tokens=n, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["specdecode", "mtad"])
@pytest.mark.parametrize("gamma", [1, 4])
def test_perfect_draft_accepts_every_drafted_token(tiny, prompt, name, gamma):
    out = generate(name, tiny.target, tiny.target, prompt, gamma=gamma)
    assert len(out.tokens) == 48
    assert all(s.accepted == s.drafted for s in out.steps), [(s.drafted, s.accepted) for s in out.steps]
    # Every step but the budget-limited last one drafts the full gamma.
    assert all(s.drafted == gamma for s in out.steps[:-1])
    assert out.target_forwards == len(out.steps) == -(-48 // (gamma + 1))


@pytest.mark.parametrize("name", ["specdecode", "mtad"])
@pytest.mark.parametrize("draft_kind", ["perfect", "related", "unrelated"])
def test_assisted_greedy_equals_greedy_sampling(tiny, unrelated_draft, prompt, name, draft_kind):
    draft = {"perfect": tiny.target, "related": tiny.draft, "unrelated": unrelated_draft}[draft_kind]
    greedy = generate("sampling", tiny.target, None, prompt)
    assisted = generate(name, tiny.target, draft, prompt, gamma=4)
    assert torch.equal(assisted.tokens, greedy.tokens)
    accepted = sum(s.accepted for s in assisted.steps)
    if draft_kind == "unrelated":
        # The unrelated draft must actually get rejected, or this case proves nothing.
        assert accepted < sum(s.drafted for s in assisted.steps) / 2


def test_sampling_greedy_matches_hf_generate(tiny, prompt):
    """Our baseline's greedy output equals transformers' own greedy generate."""
    ours = generate("sampling", tiny.target, None, prompt, n=32)
    hf = tiny.target.generate(prompt, do_sample=False, max_new_tokens=32, min_new_tokens=32, pad_token_id=0)
    assert torch.equal(ours.tokens, hf[0, prompt.shape[1] :])


@pytest.mark.parametrize("name", ["sampling", "specdecode"])
def test_top_k_1_at_temperature_1_decodes_greedys_tokens(tiny, prompt, name):
    """Top-k 1 leaves one token whatever the temperature (but for a tie at the top, which this
    model's float32 logits do not have): T=1 draws greedy's tokens through the T>0 filter
    (benchmarks/loop_profile.py's ``t1-k1`` setting relies on it)."""
    draft = tiny.draft if name == "specdecode" else None
    greedy = generate(name, tiny.target, draft, prompt)
    top1 = generate(name, tiny.target, draft, prompt, temperature=1.0, top_k=1)
    assert torch.equal(top1.tokens, greedy.tokens)
    if name == "specdecode":  # the related draft is accepted sometimes, rejected sometimes
        accepted = sum(s.accepted for s in top1.steps)
        assert 0 < accepted < sum(s.drafted for s in top1.steps)
