"""Shared fixtures: tiny models built from configs, saved and loaded from disk.

Nothing here touches the network: the hub is switched off for the whole session.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels (decoders.decode_kernels) run under Triton's
# interpreter: read when a kernel is defined, so before decoders is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from harness.models import load_models  # noqa: E402
from harness.tiny import write_tiny_pair  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep built-in model builds out of the user's home cache."""
    old = os.environ.get("DECODING_HARNESS_CACHE")
    os.environ["DECODING_HARNESS_CACHE"] = str(tmp_path_factory.mktemp("harness-cache"))
    yield
    if old is None:
        os.environ.pop("DECODING_HARNESS_CACHE", None)
    else:
        os.environ["DECODING_HARNESS_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """The tiny target/draft pair saved with save_pretrained (plus tokenizer)."""
    return write_tiny_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny(tiny_dirs):
    """The tiny pair loaded back through the same loading code users hit."""
    target_dir, draft_dir = tiny_dirs
    return load_models(str(target_dir), str(draft_dir), dtype="float32", device="cpu")


def random_llama(vocab: int, seed: int, layers: int = 1, hidden: int = 16, init: float = 0.02) -> LlamaForCausalLM:
    """A random Llama of any vocabulary; ``init`` scales how peaked its outputs are."""
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        initializer_range=init,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def unrelated_draft(tiny):
    """A random draft with the tiny target's vocabulary but no shared weights."""
    return random_llama(tiny.target.config.vocab_size, seed=1234, hidden=32)


@pytest.fixture
def prompt(tiny):
    return tiny.tokenizer("The quick brown fox", return_tensors="pt").input_ids
