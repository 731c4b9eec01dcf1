"""Shared check for the fast path: it must decode what the plain path decodes."""

from __future__ import annotations

import weakref

import torch

from decoders import get_decoder
from decoders.eagle import EagleHead

DECODERS = {
    "sampling": {},
    "specdecode": {"gamma": 4},
    "mtad": {"gamma": 4, "beam_width": 4, "accept_thres": 0.5},
    "eagle": {"gamma": 4},
}
_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def draft_for(name, target, draft):
    """The draft ``name`` takes: none, the given draft, or (eagle, given no head) a seeded head for ``target``."""
    if not DECODERS[name]:
        return None
    if name != "eagle" or isinstance(draft, EagleHead):
        return draft
    if target not in _HEADS:
        _HEADS[target] = EagleHead.for_target(target, seed=0)
    return _HEADS[target]


def decode(name, target, draft, prompt, *, fast: str, n: int, seed: int = 0, compile_model: bool = False,
           **params):
    """Decode with the plain path (``fast="off"``), the static cache alone
    (``"static"``) or static cache plus CUDA graphs (``"graphs"``)."""
    dec = get_decoder(name, target=target, draft=draft_for(name, target, draft),
                      cuda_graphs=fast == "graphs", compile_model=compile_model, **{**DECODERS[name], **params})
    dec.static_cache = fast == "static"
    return dec.generate(prompt, max_new_tokens=n, generator=torch.Generator().manual_seed(seed))


def assert_same_decoding(a, b) -> None:
    """Same tokens and the same per-step drafted/accepted/committed counts."""
    assert a.tokens.tolist() == b.tokens.tolist()
    assert a.steps == b.steps
    assert (a.target_forwards, a.draft_forwards) == (b.target_forwards, b.draft_forwards)
