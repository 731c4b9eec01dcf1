"""Load a target (and optional draft) model plus tokenizer, offline-friendly.

A model spec is one of:
- a local folder written by ``save_pretrained``;
- a GGUF file, ``path/to/file.gguf`` (transformers dequantises it);
- ``builtin:NAME``: a model that ships with or is built by this project
  (see ``BUILTIN_MODELS``);
- a Hugging Face hub id (``org/name``), resolved by transformers (from the local
  cache when ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from decoders.kv import vocab_size
from harness import tiny

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedSpec:
    """Where transformers should load a model spec from."""

    folder: str
    gguf_file: str | None = None


@dataclass(frozen=True)
class LoadedModels:
    """A loaded target, optional draft, and the target's tokenizer."""

    target: PreTrainedModel
    draft: PreTrainedModel | None
    tokenizer: PreTrainedTokenizerBase
    target_spec: str
    draft_spec: str | None
    dtype: torch.dtype
    device: torch.device


def _cache_dir() -> Path:
    root = os.environ.get("DECODING_HARNESS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "decoding-harness"
    )
    return Path(root)


def _tiny(role: str) -> ResolvedSpec:
    folder = _cache_dir() / f"tiny-random-v{tiny.TINY_VERSION}"
    if not (folder / role / "config.json").exists():
        # Build in a temporary sibling and rename, so a crash never leaves half a model.
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tiny-"))
        try:
            tiny.write_tiny_pair(tmp)
            os.replace(tmp, folder)
        except OSError:
            if not (folder / role / "config.json").exists():
                raise
            # Another process finished first; its copy is identical.
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return ResolvedSpec(str(folder / role))


#: ``builtin:NAME`` specs. Each resolver returns where to load from, building or
#: locating the files on first use; none touches the network.
BUILTIN_MODELS: dict[str, Callable[[], ResolvedSpec]] = {
    "tiny-random": lambda: _tiny("target"),
    "tiny-random-draft": lambda: _tiny("draft"),
}


def resolve_spec(spec: str) -> ResolvedSpec:
    """Map a model spec to a folder (and GGUF file name); clear errors when missing."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a model spec must be a non-empty string, got {spec!r}")
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN_MODELS:
            known = ", ".join("builtin:" + n for n in BUILTIN_MODELS)
            raise ValueError(f"unknown built-in model {spec!r}; known: {known}")
        return BUILTIN_MODELS[name]()
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return ResolvedSpec(str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file() and not any(path.glob("*.gguf")):
            raise FileNotFoundError(f"{path} is a folder but holds no config.json (not a saved model)")
        return ResolvedSpec(str(path))
    if path.exists():
        raise ValueError(f"{path} is a file; give a model folder or a .gguf file")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ResolvedSpec(spec)
    raise FileNotFoundError(f"model path not found: {path} (give a folder, a .gguf file, a hub id or builtin:NAME)")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU; use device: cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _from_pretrained(loader, spec: str, resolved: ResolvedSpec, **kwargs):
    extra = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    try:
        return loader.from_pretrained(resolved.folder, **extra, **kwargs)
    except OSError as err:
        raise OSError(
            f"could not load {spec!r}: {err}. A hub id only loads when it is in the local "
            "Hugging Face cache or the hub is reachable; a local folder needs config.json."
        ) from err


def load_model(spec: str, *, dtype: str = "auto", device: str = "auto") -> PreTrainedModel:
    """Load one causal LM from ``spec`` in eval mode on ``device``."""
    dev = resolve_device(device)
    resolved = resolve_spec(spec)
    model = _from_pretrained(AutoModelForCausalLM, spec, resolved, dtype=resolve_dtype(dtype, dev))
    return model.to(dev).eval()


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer stored with model ``spec``."""
    return _from_pretrained(AutoTokenizer, spec, resolve_spec(spec))


def load_models(
    target: str, draft: str | None = None, *, dtype: str = "auto", device: str = "auto", tokenizer: str | None = None
) -> LoadedModels:
    """Load a target, an optional draft and the tokenizer (the target's by default).

    Raises:
        FileNotFoundError: a local path or GGUF file does not exist.
        ValueError: the draft's vocabulary size differs from the target's, or a bad
            dtype/device.
    """
    dev = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, dev)
    # Resolve both specs first so a typo in the draft fails before a long target load.
    resolve_spec(target)
    if draft is not None:
        resolve_spec(draft)
    target_model = load_model(target, dtype=dtype, device=device)
    draft_model = load_model(draft, dtype=dtype, device=device) if draft is not None else None
    if draft_model is not None and vocab_size(draft_model) != vocab_size(target_model):
        raise ValueError(
            f"draft {draft!r} has vocabulary size {vocab_size(draft_model)} but target {target!r} has "
            f"{vocab_size(target_model)}; a draft must share the target's tokenizer"
        )
    tok = load_tokenizer(tokenizer or target)
    return LoadedModels(target_model, draft_model, tok, target, draft, resolved_dtype, dev)
