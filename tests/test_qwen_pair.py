"""The opt-in Qwen2.5-Coder pair (``bash scripts/setup.sh --qwen``): joined, verified, loaded.

Joining needs the 28 data wheels; loading needs minutes on a 2-core CPU, so the
loading test runs on a GPU (``pytest -m gpu``).
"""

from __future__ import annotations

import pytest
import torch

from harness import gguf_parts
from harness.models import QWEN_CODER, gguf_cache_dir, resolve_spec


def _installed() -> bool:
    try:
        for model in QWEN_CODER.values():
            gguf_parts.locate_parts(model)
    except gguf_parts.PartsMissingError:
        return all(gguf_parts.is_verified(gguf_cache_dir() / m.file_name, m) for m in QWEN_CODER.values())
    return True


@pytest.fixture(autouse=True)
def _needs_the_pair():
    # Checked when the test runs, not at collection: the test session points the
    # cache at a temporary folder only then, and the check must see that cache.
    if not _installed():
        pytest.skip("the Qwen pair is not set up (bash scripts/setup.sh --qwen)")


@pytest.mark.slow
def test_pair_joins_with_the_published_md5():
    for name, model in QWEN_CODER.items():
        resolved = resolve_spec("builtin:" + name)
        path = gguf_cache_dir() / model.file_name
        assert (resolved.folder, resolved.gguf_file) == (str(path.parent), path.name)
        assert path.stat().st_size == model.size_bytes and gguf_parts.file_md5(path) == model.md5


@pytest.mark.gpu
def test_pair_loads_and_greedy_specdecode_equals_greedy_sampling():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from decoders import get_decoder
    from decoders.kv import vocab_size
    from harness.models import load_models

    m = load_models("builtin:qwen2.5-coder-1.5b-instruct", "builtin:qwen2.5-coder-0.5b-instruct", device="cuda")
    assert m.target.config.num_hidden_layers == 28 and m.draft.config.num_hidden_layers == 24
    assert vocab_size(m.target) == vocab_size(m.draft) == 151936
    text = m.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}],
        add_generation_prompt=True, tokenize=False)
    ids = m.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(m.device)
    greedy = get_decoder("sampling", target=m.target, temperature=0.0).generate(ids, 64)
    sd = get_decoder("specdecode", target=m.target, draft=m.draft, gamma=4, temperature=0.0).generate(ids, 64)
    assert torch.equal(greedy.tokens, sd.tokens)
    assert len(sd.tokens) / sd.target_forwards > 2  # the 0.5B agrees with the 1.5B on most code tokens
