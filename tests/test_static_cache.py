"""The fast path's cache logic on the CPU: static cache, crop by position, beam rows.

CUDA graphs themselves need a GPU (tests/test_cuda_graphs.py, ``-m gpu``); every
graph replays a forward of ``StaticCachedModel._forward``, which these tests run
eagerly over the same cache, so a wrong position, mask, crop or beam copy shows
up here as a different token.
"""

from __future__ import annotations

import collections
import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from decoders import static
from decoders.eagle import EagleHead
from harness.models import load_models
from tests.fastpath import DECODERS, assert_same_decoding, decode


@pytest.mark.parametrize("name", list(DECODERS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_static_cache_decodes_like_the_plain_path(tiny, prompt, name, temperature):
    """Same tokens and step counts; at T=1 the same seed draws the same noise, so
    the samples agree too (the logits differ only by float32 rounding)."""
    filters = {"temperature": temperature, "top_k": 10, "top_p": 0.9}
    for seed in range(3):
        plain = decode(name, tiny.target, tiny.draft, prompt, fast="off", n=40, seed=seed, **filters)
        fast = decode(name, tiny.target, tiny.draft, prompt, fast="static", n=40, seed=seed, **filters)
        assert_same_decoding(fast, plain)
    if name != "sampling":  # the case must exercise rejections, or crop is untested
        assert any(s.accepted < s.drafted for s in fast.steps)


@pytest.mark.parametrize(
    ("name", "params"),
    [("specdecode", {"gamma": 1}), ("mtad", {"gamma": 1}), ("mtad", {"beam_width": 1}),
     ("mtad", {"gamma": 3, "beam_width": 2}), ("mtad", {"replacement": True})],
)
def test_static_cache_decodes_like_the_plain_path_for_other_settings(tiny, prompt, name, params):
    filters = {"temperature": 1.0, "top_k": 10, "top_p": 0.9, **params}
    for seed in range(2):
        plain = decode(name, tiny.target, tiny.draft, prompt, fast="off", n=33, seed=seed, **filters)
        fast = decode(name, tiny.target, tiny.draft, prompt, fast="static", n=33, seed=seed, **filters)
        assert_same_decoding(fast, plain)


@pytest.mark.parametrize("name", ["specdecode", "mtad"])
def test_draft_equal_to_target_gets_its_own_cache(tiny, prompt, name):
    """A draft that is the target model must not share the target's cache."""
    plain = decode(name, tiny.target, tiny.target, prompt, fast="off", n=30, temperature=0.0)
    fast = decode(name, tiny.target, tiny.target, prompt, fast="static", n=30, temperature=0.0)
    assert_same_decoding(fast, plain)
    assert all(s.accepted == s.drafted for s in fast.steps)


@pytest.mark.parametrize(("name", "drafter"), [(n, d) for n in DECODERS if n != "sampling"
                                               for d in (("given",) if n == "eagle" else ("given", "target"))])
def test_every_shape_fed_after_the_first_step_was_prepared(tiny, prompt, name, drafter, monkeypatch):
    """What the fast path captures after a generation's first step (the target's
    ``prepare`` and the proposer's) covers every decode-sized forward the rest of
    the generation feeds, the target's and the drafter's, so no graph is captured
    inside a measured step. Checked on the CPU through the static cache's own
    bookkeeping (``graph_keys``, ``_graph_key``), with a perfect draft (the target
    itself: whole blocks accepted) and the given one (blocks cut short)."""
    prepared, fed = collections.defaultdict(set), collections.defaultdict(set)
    original_prepare, original_run = static.StaticCachedModel.prepare, static.StaticCachedModel._run

    models = {}

    def spy_prepare(self, sizes, filters=None, hidden=False, keep=None, feature_size=0):
        prepared[id(self)].update(self.graph_keys(sizes, filters, hidden, keep, feature_size))
        models[id(self)] = self.model
        return original_prepare(self, sizes, filters, hidden, keep, feature_size)

    def spy_run(self, tokens, keep, filters, features=None, hidden=False):
        n = tokens.shape[1]
        if prepared and self.length > 0 and n <= static.MAX_GRAPHED_TOKENS:  # what a graph would serve
            fed[id(self)].add(static._graph_key(n, n if keep is None else keep, filters,
                                                1 if features is None else 2, hidden))
        return original_run(self, tokens, keep, filters, features, hidden)

    monkeypatch.setattr(static.StaticCachedModel, "prepare", spy_prepare)
    monkeypatch.setattr(static.StaticCachedModel, "_run", spy_run)
    draft = tiny.target if drafter == "target" else tiny.draft
    for seed in range(3):
        fed.clear()
        prepared.clear()
        out = decode(name, tiny.target, draft, prompt, fast="static", n=40, seed=seed, temperature=0.0)
        assert len(fed) == 2, "the target's and the drafter's later forwards were not both seen"
        for cache, keys in fed.items():
            assert keys <= prepared[cache], f"fed after the first step but never prepared: {keys - prepared[cache]}"
    if drafter == "target":
        assert any(s.accepted == s.drafted for s in out.steps), "no block accepted whole"
    if name == "eagle":  # a random head rarely has a block accepted whole: its shapes, from the algorithm
        (head,) = [c for c, model in models.items() if isinstance(model, EagleHead)]
        gamma = DECODERS[name]["gamma"]  # a propose feeds accepted + 1 entries from true features
        assert {key[0] for key in prepared[head]} >= set(range(1, gamma + 2))
        # ... each keeping one distribution, fed features and handing back its hidden state.
        assert all((key[1], key[3], key[4]) == (1, 2, True) for key in prepared[head])


def test_caches_are_reused_and_grown(tiny, prompt):
    """A second generation reuses the model's cache; a longer one replaces it."""
    static.release_all()
    decode("sampling", tiny.target, None, prompt, fast="static", n=8)
    (first,) = static._POOL[tiny.target]
    decode("sampling", tiny.target, None, prompt, fast="static", n=8)
    assert static._POOL[tiny.target] == [first]
    long = static.LENGTH_BUCKET + 10
    plain = decode("sampling", tiny.target, None, prompt, fast="off", n=long, temperature=0.0)
    fast = decode("sampling", tiny.target, None, prompt, fast="static", n=long, temperature=0.0)
    assert_same_decoding(fast, plain)
    (grown,) = static._POOL[tiny.target]
    assert grown is not first and grown.max_length >= prompt.shape[1] + long


def test_static_cache_rejects_misuse(tiny):
    cache = static.StaticCachedModel(tiny.target, rows=2, max_length=8, graphs=False)
    with pytest.raises(ValueError, match="fed 2 rows"):
        cache(torch.zeros((2, 3), dtype=torch.long))
    cache(torch.zeros((1, 6), dtype=torch.long))
    with pytest.raises(ValueError, match="cannot take 3 more after 6"):
        cache(torch.zeros((1, 3), dtype=torch.long))
    with pytest.raises(ValueError, match="cannot crop"):
        cache.crop(7)
    with pytest.raises(ValueError, match="cannot repeat 3"):
        cache.repeat(3)
    with pytest.raises(ValueError, match="takes 1 or 2 rows"):
        cache.select(torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="need a CUDA model"):
        static.StaticCachedModel(tiny.target, rows=1, max_length=8, graphs=True)


def test_beam_rows_follow_select(tiny):
    """After select(), each row continues the beam it was given: the logits of a
    reordered cache equal those of a cache fed that beam from the start."""
    torch.manual_seed(0)
    prefix = torch.randint(0, 50, (1, 5))
    beams = torch.randint(0, 50, (2, 3))
    cache = static.StaticCachedModel(tiny.target, rows=2, max_length=16, graphs=False)
    cache(prefix)
    cache.repeat(2)
    cache(beams)
    cache.select(torch.tensor([1, 1]))
    swapped = cache(torch.tensor([[7], [9]]))
    for row, tok in enumerate([7, 9]):
        seq = torch.cat([prefix[0], beams[1], torch.tensor([tok])]).view(1, -1)
        want = tiny.target(seq).logits[0, -1]
        torch.testing.assert_close(swapped[row, -1], want, rtol=1e-4, atol=1e-4)
    cache.select(torch.tensor([0]))  # one beam to every row, caller sees one row again
    assert cache(torch.tensor([[3]])).shape[0] == 1


def test_only_full_attention_models_on_one_device_take_the_static_path(tiny):
    assert static.supports_static_cache(tiny.target)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config)
    assert static.supports_static_cache(model)
    model.config.sliding_window = 8  # a rolling cache: positions are not what the mask assumes
    assert not static.supports_static_cache(model)


class _HostReads(TorchDispatchMode):
    """Counts operators that copy a tensor's value to the host (a device sync on a GPU)."""

    READS = ("aten.item", "aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += str(func).startswith(self.READS)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(DECODERS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_no_host_reads_inside_a_step(tiny, prompt, name, temperature):
    """The step's outcome is read once (sampling: the token's ``HostCopy``; assisted
    decoders: one ``tolist()`` of accepted length and tokens; no operator sees either);
    any other read, such as ``int(token)`` or indexing with a 0-dim tensor, would stall
    the GPU queue (and ``int(token)`` would wait for the step queued behind it too)."""
    with _HostReads() as reads:
        decode(name, tiny.target, tiny.draft, prompt, fast="static", n=40, temperature=temperature)
    assert reads.count == 0


def test_kept_caches_do_not_keep_a_model_alive(tiny_dirs, prompt):
    """The per-model pool is weak: dropping the last reference to a model frees
    the model and its caches (and on a GPU their graphs), as users expect."""
    model = load_models(str(tiny_dirs[0]), dtype="float32", device="cpu").target
    decode("sampling", model, None, prompt, fast="static", n=4)
    assert len(static._POOL.get(model, [])) == 1
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
