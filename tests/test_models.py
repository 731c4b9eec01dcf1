"""Model loading: local folders, built-ins, clear errors for bad specs."""

from __future__ import annotations

import pytest
import torch

from harness.models import load_models, resolve_spec
from tests.conftest import random_llama


def test_loaded_pair_round_trips_weights_and_tokenizer(tiny_dirs, tiny):
    from harness.tiny import build_tiny_pair

    target, draft = build_tiny_pair()
    for built, loaded in ((target, tiny.target), (draft, tiny.draft)):
        for (name, a), (_, b) in zip(built.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    text = "Hello, world!\nBye."
    assert tiny.tokenizer.decode(tiny.tokenizer(text).input_ids) == text
    assert tiny.tokenizer.eos_token_id == 2
    assert not tiny.target.training


def test_builtin_tiny_pair_loads_offline():
    m = load_models("builtin:tiny-random", "builtin:tiny-random-draft", device="cpu")
    assert m.target.config.num_hidden_layers == 2 and m.draft.config.num_hidden_layers == 1
    assert m.target_spec == "builtin:tiny-random"


def test_dtype_choice(tiny_dirs):
    m = load_models(str(tiny_dirs[0]), dtype="bfloat16", device="cpu")
    assert m.target.dtype == torch.bfloat16 and m.draft is None


def test_draft_with_other_vocabulary_is_refused(tiny_dirs, tmp_path):
    odd = random_llama(vocab=77, seed=0)
    odd.save_pretrained(tmp_path / "odd")
    with pytest.raises(ValueError, match=r"vocabulary size 77 .* has 100"):
        load_models(str(tiny_dirs[0]), str(tmp_path / "odd"), device="cpu")


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("/no/such/folder", FileNotFoundError, "model path not found: /no/such/folder"),
        ("./missing-model", FileNotFoundError, "model path not found"),
        ("weights/model.gguf", FileNotFoundError, "GGUF file not found"),
        ("builtin:nope", ValueError, "unknown built-in model 'builtin:nope'; known: builtin:tiny-random"),
        ("", ValueError, "non-empty string"),
    ],
)
def test_bad_specs_give_clear_errors(spec, error, match):
    with pytest.raises(error, match=match):
        resolve_spec(spec)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        resolve_spec(str(tmp_path))


def test_missing_draft_path_fails_before_loading_the_target(tiny_dirs):
    with pytest.raises(FileNotFoundError, match="model path not found"):
        load_models(str(tiny_dirs[0]), "/no/such/draft", device="cpu")


def test_hub_id_not_in_cache_gives_clear_error():
    with pytest.raises(OSError, match="could not load 'nobody/no-such-model'"):
        load_models("nobody/no-such-model", device="cpu")


def test_cuda_without_gpu_is_a_clear_error(tiny_dirs):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        load_models(str(tiny_dirs[0]), device="cuda")
