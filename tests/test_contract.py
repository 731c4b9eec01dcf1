"""The decoder contract: registry, determinism, budgets, EOS, caches, bad input."""

from __future__ import annotations

import pytest
import torch

from decoders import available_decoders, decoder_class, decoder_params, get_decoder
from tests.conftest import random_llama
from tests.fastpath import draft_for

ALL = available_decoders()
NEEDS_DRAFT = [name for name in ALL if decoder_class(name).needs_draft]


def make(name, tiny, **params):
    draft = draft_for(name, tiny.target, tiny.draft) if decoder_class(name).needs_draft else None
    return get_decoder(name, target=tiny.target, draft=draft, **params)


def run(dec, prompt, seed=0, n=40, eos=None):
    return dec.generate(prompt, max_new_tokens=n, generator=torch.Generator().manual_seed(seed), eos_token_id=eos)


def test_available_decoders_sorted():
    assert ALL == sorted(ALL)
    assert {"mtad", "prompt_lookup", "sampling", "specdecode"} <= set(ALL)


def test_mtad_reference_defaults(tiny):
    dec = make("mtad", tiny)
    assert dec.params == {
        "temperature": 1.0, "top_k": 10, "top_p": 0.9,
        "gamma": 4, "beam_width": 4, "accept_thres": 0.5, "replacement": False,
    }
    assert decoder_params("specdecode")["gamma"] == 4


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_tokens_other_seed_other_tokens(tiny, prompt, name):
    dec = make(name, tiny, temperature=1.0)
    a, b, c = run(dec, prompt, 7), run(dec, prompt, 7), run(dec, prompt, 8)
    assert torch.equal(a.tokens, b.tokens) and a.steps == b.steps
    assert not torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [1, 2, 5, 33])
def test_exactly_max_new_tokens_without_eos(tiny, prompt, name, n):
    out = run(make(name, tiny), prompt, n=n)
    assert out.tokens.dtype == torch.long and out.tokens.dim() == 1
    assert len(out.tokens) == n
    assert sum(s.committed for s in out.steps) == n
    assert out.target_forwards == len(out.steps)
    for s in out.steps:
        assert s.committed == s.accepted + 1  # the budget never cuts a step: drafts shrink instead
        assert 0 <= s.accepted <= s.drafted


# eagle has no draft that is the target (no head drafts perfectly); the cut is the
# skeleton's, the same for every assisted method.
@pytest.mark.parametrize("name", [n for n in ALL if n != "eagle"])
def test_stops_at_eos_inside_an_accepted_block(tiny, prompt, name):
    # draft == target at temperature 0 accepts whole blocks, so EOS lands mid-block.
    draft = tiny.target if name in NEEDS_DRAFT else None
    dec = get_decoder(name, target=tiny.target, draft=draft, temperature=0.0, top_k=0, top_p=1.0)
    free = run(dec, prompt, n=30).tokens.tolist()
    # Pick as EOS a token whose first occurrence is mid-output and, with gamma 4
    # and every draft accepted (blocks of 5), one of a block's drafted tokens.
    pos = next(i for i in range(6, 30) if free[i] not in free[:i] and i % 5 != 4)
    eos = free[pos]
    out = run(dec, prompt, n=30, eos=[999, eos])
    assert out.tokens.tolist() == free[: pos + 1]
    if name in NEEDS_DRAFT:
        last = out.steps[-1]
        assert last.committed < last.accepted + 1, "EOS should have cut an accepted block"


@pytest.mark.parametrize("name", ALL)
def test_kv_cache_is_reused_not_recomputed(tiny, prompt, name):
    """The target reads each position once, plus the drafts it verifies."""
    fed = []
    # On the inner stack: a verification that also returns hidden states (eagle) calls it directly.
    hook = tiny.target.model.register_forward_pre_hook(
        lambda mod, args, kwargs: fed.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        out = run(make(name, tiny), prompt, n=40)
    finally:
        hook.remove()
    # Each step feeds the one token committed last step (the prompt at first) plus its drafts.
    expected = prompt.shape[1] + sum(s.drafted + 1 for s in out.steps) - 1
    assert sum(fed) == expected


@pytest.mark.parametrize("name", ALL)
def test_step_callback_sees_every_step(tiny, prompt, name):
    seen = []
    dec = make(name, tiny)
    out = dec.generate(prompt, max_new_tokens=20, generator=torch.Generator().manual_seed(0), on_step=seen.append)
    assert tuple(seen) == out.steps


def test_mtad_with_replacement_runs_and_differs(tiny, prompt):
    a = run(make("mtad", tiny, replacement=True), prompt, 1)
    b = run(make("mtad", tiny, replacement=False), prompt, 1)
    assert len(a.tokens) == len(b.tokens) == 40
    assert not torch.equal(a.tokens, b.tokens)


# --- bad input -------------------------------------------------------------


def test_unknown_decoder_lists_names_and_suggests(tiny):
    with pytest.raises(ValueError, match=rf"known decoders: {', '.join(ALL)}.*Did you mean 'specdecode'"):
        get_decoder("specdecod", target=tiny.target, draft=tiny.draft)


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("specdecode", {"gamma": 0}, "gamma must be >= 1"),
        ("mtad", {"gamma": -1}, "gamma must be >= 1"),
        ("mtad", {"beam_width": 0}, "beam_width must be >= 1"),
        ("mtad", {"accept_thres": 0.0}, "accept_thres must be > 0"),
        ("mtad", {"accept_thres": -0.5}, "accept_thres must be > 0"),
        ("sampling", {"temperature": -0.1}, "temperature must be >= 0"),
        ("specdecode", {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ("mtad", {"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ("sampling", {"top_k": -1}, "top_k must be >= 0"),
    ],
)
def test_bad_parameter_values(tiny, name, params, match):
    with pytest.raises(ValueError, match=match):
        make(name, tiny, **params)


@pytest.mark.parametrize(
    ("name", "params"),
    [("specdecode", {"gamma": 2.5}), ("mtad", {"beam_width": "4"}), ("mtad", {"replacement": 1}),
     ("sampling", {"gamma": 4}), ("specdecode", {"beam_width": 4})],
)
def test_bad_parameter_types_and_unknown_parameters(tiny, name, params):
    with pytest.raises(TypeError):
        make(name, tiny, **params)


@pytest.mark.parametrize("option", ["cuda_graphs", "compile_model"])
def test_execution_settings_must_be_booleans(tiny, option):
    with pytest.raises(TypeError, match=f"{option} must be true(,| or) false"):
        get_decoder("sampling", target=tiny.target, **{option: "yes"})
    assert getattr(get_decoder("sampling", target=tiny.target, **{option: False}), option) is False


def test_compile_model_defaults_to_automatic(tiny):
    """None: compile only where it is cheap (the fused layer); null in a profile means the same."""
    assert get_decoder("sampling", target=tiny.target).compile_model is None
    with pytest.raises(TypeError, match="cuda_graphs must be true or false"):
        get_decoder("sampling", target=tiny.target, cuda_graphs=None)


@pytest.mark.parametrize("name", NEEDS_DRAFT)
def test_missing_draft(tiny, name):
    with pytest.raises(ValueError, match="needs a draft model"):
        get_decoder(name, target=tiny.target)


@pytest.mark.parametrize("name", sorted(set(ALL) - set(NEEDS_DRAFT)))
def test_methods_without_a_draft_model_refuse_one(tiny, name):
    with pytest.raises(ValueError, match="takes no draft"):
        get_decoder(name, target=tiny.target, draft=tiny.draft)


@pytest.mark.parametrize("name", NEEDS_DRAFT)
def test_vocabulary_mismatch(tiny, name):
    vocab = tiny.target.config.vocab_size
    other = random_llama(vocab + 3, seed=0)
    with pytest.raises(ValueError, match=rf"draft vocabulary size {vocab + 3}.*target vocabulary size {vocab}"):
        get_decoder(name, target=tiny.target, draft=other)


@pytest.mark.parametrize(
    ("input_ids", "n", "error"),
    [
        (torch.tensor([1, 2, 3]), 4, ValueError),  # 1-D
        (torch.tensor([[1, 2], [3, 4]]), 4, ValueError),  # batch 2
        (torch.zeros((1, 0), dtype=torch.long), 4, ValueError),  # empty prompt
        (torch.tensor([[1.0, 2.0]]), 4, TypeError),  # not integer ids
        (torch.tensor([[1, 2]]), 0, ValueError),  # no budget
    ],
)
def test_bad_generate_arguments(tiny, input_ids, n, error):
    dec = make("specdecode", tiny)
    with pytest.raises(error):
        dec.generate(input_ids, max_new_tokens=n)
