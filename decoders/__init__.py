"""Pure decoding: torch and model objects in, tokens and per-step counts out.

    >>> from decoders import get_decoder, available_decoders
    >>> dec = get_decoder("specdecode", target=target, draft=draft, gamma=4)
    >>> out = dec.generate(input_ids, max_new_tokens=64, generator=torch.Generator().manual_seed(0))
    >>> out.tokens, out.steps

This package never imports measurement or I/O libraries (zeus, pandas, lm_eval).
"""

from __future__ import annotations

import difflib
import inspect

from decoders.base import Decoder, GenerationOutput, StepRecord
from decoders.mtad import MTADDecoder, mtad_accept_length
from decoders.sampling import SamplingDecoder
from decoders.specdecode import SpeculativeDecoder, speculative_accept

_REGISTRY: dict[str, type[Decoder]] = {
    cls.name: cls for cls in (SamplingDecoder, SpeculativeDecoder, MTADDecoder)
}


def available_decoders() -> list[str]:
    """Names accepted by ``get_decoder``, sorted."""
    return sorted(_REGISTRY)


def decoder_class(name: str) -> type[Decoder]:
    """The class registered under ``name``; unknown names raise with a suggestion."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown decoder {name!r}; known decoders: {', '.join(available_decoders())}.{hint}")
    return _REGISTRY[name]


def decoder_params(name: str) -> dict[str, object]:
    """Parameters decoder ``name`` accepts, with their defaults."""
    cls = decoder_class(name)
    names: dict[str, object] = {}
    for klass in reversed(cls.__mro__):  # base-class filters first, subclass overrides last
        if klass is object or "__init__" not in vars(klass):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind is p.KEYWORD_ONLY:
                names[p.name] = p.default
    return names


def check_execution_settings(**settings: object) -> None:
    """Raise ``TypeError`` unless every execution setting (``cuda_graphs``,
    ``compile_model``) is a bool; usable before any model loads."""
    for option, value in settings.items():
        if not isinstance(value, bool):
            raise TypeError(f"{option} must be true or false, got {type(value).__name__} ({value!r})")


def get_decoder(
    name: str, *, target, draft=None, cuda_graphs: bool = True, compile_model: bool = False, **params
) -> Decoder:
    """Build decoder ``name`` for ``target`` (and ``draft`` for assisted decoders).

    Args:
        name: one of ``available_decoders()``.
        target: a transformers causal LM.
        draft: a causal LM sharing the target's vocabulary (``specdecode``, ``mtad``).
        cuda_graphs: use the fast path (static KV cache, CUDA graphs) for models
            on one CUDA device; an execution setting, not a decoding parameter.
        compile_model: on the fast path, ``torch.compile`` each decode-step shape
            before capturing it (faster steps; the first call of each shape
            compiles, which takes tens of seconds for a 7B model).
        **params: ``temperature``, ``top_k``, ``top_p`` for all decoders; ``gamma``
            for ``specdecode`` and ``mtad``; ``beam_width``, ``accept_thres`` and
            ``replacement`` for ``mtad``. Unknown parameters raise ``TypeError``.
    """
    cls = decoder_class(name)
    known = decoder_params(name)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise TypeError(
            f"decoder {name!r} takes no parameter(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(sorted(known))}"
        )
    check_execution_settings(cuda_graphs=cuda_graphs, compile_model=compile_model)
    decoder = cls(target, draft, **params)
    decoder.cuda_graphs, decoder.compile_model = cuda_graphs, compile_model
    return decoder


__all__ = [
    "Decoder",
    "GenerationOutput",
    "StepRecord",
    "available_decoders",
    "check_execution_settings",
    "decoder_class",
    "decoder_params",
    "get_decoder",
    "mtad_accept_length",
    "speculative_accept",
]
