"""Pure decoding: torch and model objects in, tokens and per-step counts out.

    >>> from decoders import get_decoder, available_decoders
    >>> dec = get_decoder("specdecode", target=target, draft=draft, gamma=4)
    >>> out = dec.generate(input_ids, max_new_tokens=64, generator=torch.Generator().manual_seed(0))
    >>> out.tokens, out.steps

A method is one module: a ``Decoder`` subclass (or, for propose/verify methods,
an ``AssistedDecoder`` with a ``Proposer`` and a verifier) whose ``name``
registers it and whose ``Params`` dataclass declares its parameters. Methods
outside this package are named ``module.path:ClassName`` or installed through
the ``decoding_harness.decoders`` entry-point group (``decoders.registry``).

This package never imports measurement or I/O libraries (zeus, pandas, lm_eval).
"""

from __future__ import annotations

from decoders import registry
from decoders.assisted import AssistedDecoder, DraftModelProposer, Proposal, Proposer
from decoders.base import Decoder, GenerationOutput, StepRecord
from decoders.mtad import mtad_accept_length
from decoders.params import DraftParams, FilterParams, ParamInfo, Params, param, redefault
from decoders.specdecode import exact_verify, speculative_accept


def available_decoders() -> list[str]:
    """Names accepted by ``get_decoder``, sorted (plug-ins by module path come on top)."""
    return registry.names()


def decoder_class(name: str) -> type[Decoder]:
    """The class of decoder ``name`` (a registered name or ``module:Class``).

    Unknown names raise ``ValueError`` listing the known ones, with a suggestion.
    """
    return registry.lookup(name)


def decoder_params(name: str) -> dict[str, object]:
    """Parameters decoder ``name`` accepts, with their defaults."""
    from decoders.params import defaults

    return defaults(decoder_class(name).Params)


def decoder_param_info(name: str) -> dict[str, ParamInfo]:
    """Parameters decoder ``name`` accepts, with their kinds, bounds and docs."""
    from decoders.params import infos

    return infos(decoder_class(name).Params)


def check_execution_settings(**settings: object) -> None:
    """Raise ``TypeError`` unless every execution setting is valid: ``cuda_graphs``
    a bool, ``compile_model`` a bool or None (automatic); usable before any model loads."""
    for option, value in settings.items():
        if option == "compile_model" and value is None:
            continue
        if not isinstance(value, bool):
            allowed = "true, false or null (automatic)" if option == "compile_model" else "true or false"
            raise TypeError(f"{option} must be {allowed}, got {type(value).__name__} ({value!r})")


def get_decoder(
    name: str, *, target, draft=None, cuda_graphs: bool = True, compile_model: bool | None = None, **params
) -> Decoder:
    """Build decoder ``name`` for ``target`` (and ``draft`` for methods that need one).

    Args:
        name: one of ``available_decoders()``, or ``module.path:ClassName``.
        target: a transformers causal LM.
        draft: a causal LM sharing the target's vocabulary (``needs_draft`` methods).
        cuda_graphs: use the fast path (static KV cache, CUDA graphs) for models
            on one CUDA device; an execution setting, not a decoding parameter.
        compile_model: on the fast path, ``torch.compile`` each decode-step shape
            before capturing it. ``None`` (default): compile where it is cheap,
            i.e. the one-layer compilation of ``decoders.fused`` (a few seconds
            per step shape, cached on disk by inductor); ``True`` also compiles
            transformers' own forward for other architectures (minutes for a
            7B model); ``False`` never.
        **params: the method's parameters (``decoder_param_info(name)`` lists
            them): ``temperature``, ``top_k``, ``top_p`` for all; ``gamma`` for
            the propose/verify methods; ``beam_width``, ``accept_thres`` and
            ``replacement`` for ``mtad``. Unknown parameters raise ``TypeError``.
    """
    cls = decoder_class(name)
    check_execution_settings(cuda_graphs=cuda_graphs, compile_model=compile_model)
    decoder = cls(target, draft, **params)
    decoder.cuda_graphs, decoder.compile_model = cuda_graphs, compile_model
    return decoder


__all__ = [
    "AssistedDecoder",
    "Decoder",
    "DraftModelProposer",
    "DraftParams",
    "FilterParams",
    "GenerationOutput",
    "ParamInfo",
    "Params",
    "Proposal",
    "Proposer",
    "StepRecord",
    "available_decoders",
    "check_execution_settings",
    "decoder_class",
    "decoder_param_info",
    "decoder_params",
    "exact_verify",
    "get_decoder",
    "mtad_accept_length",
    "param",
    "redefault",
    "speculative_accept",
]
