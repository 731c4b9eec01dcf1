"""The one registry of decoding methods.

A ``Decoder`` subclass with a ``name`` registers itself when its class is
defined, so a new method is one file: every module of this package is imported
on the first look-up. Methods written outside this repository plug in either

- by module path, ``mypkg.decoders:MyDecoder`` (in a profile's ``name:``, in
  lm-eval's ``decoder=``, or in ``get_decoder``), or
- through the entry-point group ``decoding_harness.decoders`` of an installed
  package (``my_method = "mypkg.decoders:MyDecoder"``), which makes
  ``my_method`` an ordinary name everywhere.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import pkgutil
import warnings

ENTRY_POINT_GROUP = "decoding_harness.decoders"

_REGISTRY: dict[str, type] = {}
_discovered = False


def register(cls: type) -> None:
    """Record decoder class ``cls`` under ``cls.name`` (called by ``Decoder.__init_subclass__``)."""
    old = _REGISTRY.get(cls.name)
    # The same class defined again (a module imported twice) replaces itself.
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(
            f"decoder name {cls.name!r} of {_path(cls)} is already taken by {_path(old)}; choose another name"
        )
    _REGISTRY[cls.name] = cls


def _path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _discover() -> None:
    """Import this package's modules and the installed plug-ins, once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import decoders

    for module in pkgutil.iter_modules(decoders.__path__):
        importlib.import_module(f"decoders.{module.name}")
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = entry.load()
        except Exception as err:  # one broken plug-in must not take the built-in methods down
            warnings.warn(f"decoder plug-in {entry.name!r} ({entry.value}) failed to load: {err}", stacklevel=2)
            continue
        _check_decoder(cls, entry.value)
        if cls.name != entry.name:
            _REGISTRY[entry.name] = cls  # the entry point's name is what users will type


def names() -> list[str]:
    """Registered decoder names, sorted."""
    _discover()
    return sorted(_REGISTRY)


def lookup(name: str) -> type:
    """The decoder class for a registered name or a ``module:Class`` path.

    Raises ``ValueError`` naming the known decoders (and the closest one).
    """
    _discover()
    if not isinstance(name, str):
        raise ValueError(f"a decoder name must be a string, got {type(name).__name__} ({name!r})")
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return _import_path(name)
    close = difflib.get_close_matches(name, _REGISTRY, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"unknown decoder {name!r}; known decoders: {', '.join(sorted(_REGISTRY))}.{hint} "
        "(a decoder outside this package is named as module.path:ClassName)"
    )


def _import_path(path: str) -> type:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"decoder {path!r}: cannot import module {module_name!r} ({err})") from err
    cls = getattr(module, attr, None)
    if cls is None:
        raise ValueError(f"decoder {path!r}: module {module_name!r} has no attribute {attr!r}")
    _check_decoder(cls, path)
    return cls


def _check_decoder(cls: object, where: str) -> None:
    from decoders.base import Decoder

    if not (isinstance(cls, type) and issubclass(cls, Decoder) and cls.name):
        raise ValueError(f"decoder {where!r} is not a decoders.Decoder subclass with a name")
