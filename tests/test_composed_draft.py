"""Drafts stored as 4-bit deltas from their base model, with a head over a token subset."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from decoders import get_decoder
from decoders.kv import vocab_size
from harness.composed_draft import (
    LINEAR_MAPS,
    SubsetHead,
    compose_draft,
    dequantize_int4,
    quantize_int4,
    save_composed_draft,
)
from tests.conftest import random_llama

VOCAB = 40
HEAD = torch.tensor([0, 1, 2, 3, 5, 8, 13, 21, 34])


def test_int4_round_trip_is_exact_on_the_grid_and_bounded_off_it():
    torch.manual_seed(0)
    scale = torch.rand(6, 2) + 0.5
    ints = torch.randint(-7, 8, (6, 2, 64)).float()
    ints[:, :, 0] = 7  # the largest magnitude sets the scale to exactly `scale`
    on_grid = (ints * scale.unsqueeze(-1)).reshape(6, 128)
    packed, s = quantize_int4(on_grid, group=64)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 64) and s.shape == (6, 2)
    assert torch.allclose(dequantize_int4(packed, s), on_grid, rtol=2e-3)  # float16 scales

    off_grid = torch.randn(6, 128)
    packed, s = quantize_int4(off_grid, group=64)
    err = (dequantize_int4(packed, s) - off_grid).abs().reshape(6, 2, 64)
    assert bool((err <= s.float().unsqueeze(-1) * 0.5 + 1e-3).all())  # half a step at most
    with pytest.raises(ValueError, match="multiple"):
        quantize_int4(torch.zeros(2, 96), group=64)


def test_subset_head_scores_only_its_tokens():
    torch.manual_seed(0)
    weight = torch.randn(VOCAB, 8)
    head = SubsetHead(weight[HEAD], HEAD, VOCAB)
    hidden = torch.randn(2, 3, 8)
    logits = head(hidden)
    assert logits.shape == (2, 3, VOCAB) and head.out_features == VOCAB
    assert torch.allclose(logits[..., HEAD], hidden @ weight[HEAD].T)
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[HEAD] = False
    assert bool(torch.isneginf(logits[..., outside]).all())
    with pytest.raises(ValueError, match="must lie in"):
        SubsetHead(weight[:2], torch.tensor([0, VOCAB]), VOCAB)


@pytest.fixture(scope="module")
def base():
    return random_llama(VOCAB, seed=3, layers=3, hidden=64, init=0.2)


@pytest.fixture(scope="module")
def trained(base):
    """A 2-layer draft started from base layers (2, 0) and then changed, as training would."""
    draft = random_llama(VOCAB, seed=4, layers=2, hidden=64, init=0.2)
    state = base.state_dict()
    with torch.no_grad():
        for i, src in enumerate([2, 0]):
            for name, p in draft.model.layers[i].named_parameters():
                p.copy_(state[f"model.layers.{src}.{name}"] + 0.05 * torch.randn_like(p))
        draft.model.embed_tokens.weight.copy_(base.model.embed_tokens.weight)
        draft.model.norm.weight.copy_(1 + 0.1 * torch.randn(64))
        draft.lm_head.weight.copy_(base.lm_head.weight)
    return draft


@pytest.fixture(scope="module")
def stored(tmp_path_factory, base, trained):
    folder = tmp_path_factory.mktemp("draft")
    report = save_composed_draft(folder, trained, base, [2, 0], HEAD)
    return folder, report


def test_round_trip_rebuilds_the_trained_draft(base, trained, stored):
    folder, report = stored
    assert 0 < report["delta_relative_error"] < 0.05
    rng_before = torch.get_rng_state()
    draft = compose_draft(folder, base)
    assert torch.equal(torch.get_rng_state(), rng_before)
    # The reference applies the stored rounding by hand: 4-bit deltas on the base
    # layers it started from, bfloat16 norms. Composition must add nothing to that.
    reference = copy.deepcopy(trained)
    base_state = base.state_dict()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(p.to(torch.bfloat16).float())
            elif name.startswith("model.layers."):
                i = int(name.split(".")[2])
                w0 = base_state[name.replace(f"layers.{i}.", f"layers.{[2, 0][i]}.")]
                p.copy_(w0 + dequantize_int4(*quantize_int4(p - w0, group=64)))
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.inference_mode():
        want = reference(ids).logits[..., HEAD]
        got = draft(ids).logits
    assert torch.allclose(got[..., HEAD], want, atol=1e-5)
    assert bool(torch.isneginf(got[..., 4]).all())  # 4 is not a head token
    assert vocab_size(draft) == vocab_size(base) == VOCAB
    # The embeddings are the base's own tensor; the head rows are the base's head rows.
    assert draft.model.embed_tokens.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    assert torch.equal(draft.lm_head.weight, base.lm_head.weight[HEAD])
    # What is stored for the linear maps is 4-bit deltas, not their weights.
    with safe_open(folder / "draft.safetensors", "pt") as f:
        keys = set(f.keys())
    assert not any(k.endswith(f"{name}.weight") for k in keys for name in LINEAR_MAPS)
    assert f"model.layers.0.{LINEAR_MAPS[0]}.weight.delta_q4" in keys


def test_an_untrained_delta_gives_back_the_base_layers(tmp_path, base):
    """Zero deltas compose to exactly the base's layers (no drift from the format itself)."""
    draft = random_llama(VOCAB, seed=5, layers=1, hidden=64)
    draft.model.layers[0].load_state_dict(base.model.layers[1].state_dict())
    save_composed_draft(tmp_path, draft, base, [1], torch.arange(VOCAB))
    composed = compose_draft(tmp_path, base)
    for name in LINEAR_MAPS:
        mod_c, mod_b = composed.model.layers[0], base.model.layers[1]
        for part in name.split("."):
            mod_c, mod_b = getattr(mod_c, part), getattr(mod_b, part)
        assert torch.equal(mod_c.weight, mod_b.weight)


def test_assisted_decoders_run_with_a_subset_head_draft(base, stored):
    """Greedy specdecode/mtad with the composed draft give the target's greedy tokens."""
    draft = compose_draft(stored[0], base)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    greedy = dict(temperature=0.0, top_k=0, top_p=1.0)
    want = get_decoder("sampling", target=base, **greedy).generate(ids, 12).tokens
    for name, extra in [("specdecode", {}), ("mtad", {"beam_width": 2})]:
        out = get_decoder(name, target=base, draft=draft, gamma=3, **greedy, **extra).generate(ids, 12)
        assert torch.equal(out.tokens, want), name


def test_subset_head_draft_on_the_fast_path(base, stored):
    """The fused forward applies the draft's own head (a subset head scattering
    to the full vocabulary), so the static-cache path decodes as the plain one."""
    from tests.fastpath import assert_same_decoding, decode

    draft = compose_draft(stored[0], base)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    for name in ("specdecode", "mtad"):
        plain = decode(name, base, draft, ids, fast="off", n=16, temperature=1.0)
        fast = decode(name, base, draft, ids, fast="static", n=16, temperature=1.0)
        assert_same_decoding(fast, plain)


def test_mismatches_are_clear_errors(tmp_path, base, stored):
    folder, _ = stored
    with pytest.raises(FileNotFoundError, match="holds no draft"):
        compose_draft(tmp_path, base)
    small_base = random_llama(VOCAB, seed=6, layers=1, hidden=64)
    with pytest.raises(ValueError, match="builds on layer 2"):
        compose_draft(folder, small_base)
    narrow_base = random_llama(VOCAB, seed=6, layers=3, hidden=32)
    with pytest.raises(ValueError, match="not distilled from this base"):
        compose_draft(folder, narrow_base)
    for name in ("config.json", "compose.json", "draft.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    meta = json.loads((tmp_path / "compose.json").read_text())
    (tmp_path / "compose.json").write_text(json.dumps({**meta, "format": "composed-draft/0"}))
    with pytest.raises(ValueError, match="format"):
        compose_draft(tmp_path, base)
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "compose.json").write_text(json.dumps(meta))
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="does not match its weights"):
        compose_draft(tmp_path, base)
