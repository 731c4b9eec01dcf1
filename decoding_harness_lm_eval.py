"""Make ``lm_eval --model decoding`` and ``lm_eval --model NAME`` find this project's decoders.

lm-eval 0.4.13 resolves ``--model NAME`` only against its own registry; entry
points (group ``lm_eval.models``, which ``pyproject.toml`` also declares for
``decoding``) came in a later release. So the installed
``decoding_harness_lm_eval.pth`` imports this module at interpreter start. It
costs a few microseconds: it only appends a finder to ``sys.meta_path``.
Nothing of lm-eval or of this project is imported until some program imports
``lm_eval.api.registry``; right after that module runs, the finder registers
``decoding`` and every name in ``decoders.available_decoders()`` there as lazy
``"module:attribute"`` placeholders, exactly as lm-eval registers its own. No
name is listed here: a decoder added to the registry is an lm-eval model too.

It is a top-level module, not part of ``harness``: importing ``harness.*`` at
start would bind the installed ``harness`` package in every interpreter and
hide a checkout's own ``harness`` (edited code, a retrained draft) from the
tests and scripts run in it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

REGISTRY_MODULE = "lm_eval.api.registry"
MODELS_MODULE = "harness.lm_eval_models"


def models() -> dict[str, str]:
    """``{lm-eval model name: lazy "module:attribute" path}`` for every registered decoder."""
    from decoders import available_decoders  # only once lm-eval's registry loads: imports torch

    return {"decoding": f"{MODELS_MODULE}:DecodingLM",
            **{name: f"{MODELS_MODULE}:for_{name}" for name in available_decoders()}}


def register(registry_module) -> None:
    """Register the models in lm-eval's model registry (idempotent; never hides lm-eval's own)."""
    # get_model() imports lm_eval.models only while the registry is empty;
    # import it first so our entries never hide the built-in models.
    import lm_eval.models  # noqa: F401

    registry = registry_module.model_registry
    for name, target in models().items():
        if name not in registry:
            registry.register(name, target=target)


class _RegisterAfterExec(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        try:
            register(module)
        except Exception as err:  # never break lm-eval itself; say why our models are missing
            print(f"decoding-harness: could not register lm-eval models: {err}", file=sys.stderr)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != REGISTRY_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisterAfterExec(spec.loader)
        return spec


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once); register now if lm-eval is already loaded."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    if REGISTRY_MODULE in sys.modules:
        register(sys.modules[REGISTRY_MODULE])
        return
    sys.meta_path.insert(0, _Finder())


install()
