"""The fused decode forward (``decoders.fused``) computes the model's own function.

Logits are compared with transformers' forward over the whole sequence, for the
architectures it serves (Llama with and without biases, Qwen2 with its q/k/v
biases), fed in pieces through the static cache with a crop in between; the
compiled layer is compared with the eager one. The decoders' token-level
equality on the fast path is tests/test_static_cache.py's (it runs this forward).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from decoders import fused, static

SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE)),
    "llama-biases": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, attention_bias=True, mlp_bias=True)),
    "llama-mha": lambda: LlamaForCausalLM(LlamaConfig(**{**SHAPE, "num_key_value_heads": 4})),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE)),
}


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[kind]().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # zero-initialised: make them matter
                p.normal_(std=0.5)
    return model


def pieces_through_cache(model, ids: torch.Tensor, compile: bool = False) -> torch.Tensor:
    """Logits of ``ids`` fed as a prompt, a decode step, a 4-token block cropped to 2, and the rest."""
    cache = static.StaticCachedModel(model, rows=1, max_length=64, graphs=False, compile=compile)
    assert cache.engine is not None
    a = cache(ids[:, :10])
    b = cache(ids[:, 10:11])
    c = cache(ids[:, 11:15])
    cache.crop(13)  # two of the four "drafts" rejected
    d = cache(ids[:, 13:20])
    return torch.cat([a, b, c[:, :2], d], dim=1)


@pytest.mark.parametrize("kind", list(MODELS))
def test_fused_forward_matches_transformers(kind):
    model = build(kind)
    assert fused.supports(model)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(ids).logits.float()
        got = pieces_through_cache(model, ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_compiled_layer_matches_eager():
    model = build("qwen2")
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        eager = pieces_through_cache(model, ids)
        cache = static.StaticCachedModel(model, rows=1, max_length=64, graphs=False, compile=True)
        cache(ids[:, :10])
        cache._start.fill_(10)
        step = cache._compiled_forward((ids[:, 10:11],), 1)  # what a captured graph replays
    torch.testing.assert_close(step[:, 0], eager[:, 10], rtol=1e-4, atol=1e-5)


def test_copies_follow_changes_to_the_model():
    """Concatenated projections are rebuilt after an in-place weight change (no stale copies)."""
    model = build("llama")
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        pieces_through_cache(model, ids)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(3.0)
        model.model.layers[1].mlp.up_proj.weight.add_(0.1)
    with torch.inference_mode():
        expected = model(ids).logits.float()
        got = pieces_through_cache(model, ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_other_models_take_transformers_forward():
    """Architectures or rotary variants it does not compute keep the model's own forward."""
    dynamic = LlamaForCausalLM(LlamaConfig(**SHAPE, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                     "rope_theta": 10000.0}))
    assert not fused.supports(dynamic)
    cache = static.StaticCachedModel(dynamic, rows=1, max_length=16, graphs=False, compile=None)
    assert cache.engine is None and cache.compiled is False
    assert static.StaticCachedModel(build("llama"), rows=1, max_length=16, graphs=False,
                                    fused=False).engine is None


def test_pooled_caches_of_a_changed_model_are_not_reused():
    """A cache kept between generations is dropped once its model's weights change
    (its concatenated copies and graphs would be stale)."""
    model = build("llama")
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(4))
    static.release_all()
    with torch.inference_mode():
        first = static.acquire(model, 1, 32, graphs=False, busy=[])
        first(ids)
        assert static.acquire(model, 1, 32, graphs=False, busy=[]) is first
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight.mul_(2.0)
    with torch.inference_mode():
        again = static.acquire(model, 1, 32, graphs=False, busy=[])
        assert again is not first
        torch.testing.assert_close(again(ids), model(ids).logits.float(), rtol=1e-4, atol=1e-5)
