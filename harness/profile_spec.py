"""Profiles: YAML files that say which models, prompts and decoders to run.

Validation happens before any model loads and reports every problem at once,
each with its YAML path (``decoders[1].params.gamma: must be >= 1``).

Example (``profiles/smoke.yaml``)::

    name: smoke
    models: {target: builtin:tiny-random, draft: builtin:tiny-random-draft, device: cpu}
    prompts: {items: ["Once upon a time"], chat_template: false}
    generation: {max_new_tokens: 32, repeats: 2, warmup: 1, seed: 0}
    decoders:
      - {name: sampling, params: {temperature: 1.0}}
      - {name: specdecode, label: sd-g4, params: {gamma: 4}}
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from decoders import decoder_class, decoder_params
from harness import scorers


class ProfileError(ValueError):
    """An invalid profile; ``problems`` lists every ``path: message``."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"invalid profile {source}:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class ModelsSpec:
    target: str
    draft: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None  # "auto": accelerate splits the target over all visible GPUs


@dataclass(frozen=True)
class PromptsSpec:
    items: tuple[str, ...] = ()
    file: str | None = None  # JSONL, relative to the profile's folder
    field: str = "prompt"
    id_field: str | None = None
    limit: int | None = None
    chat_template: bool = False
    system: str | None = None
    source: str | None = None  # a built-in prompt set instead of items/file (harness.scorers.SOURCES)
    scorer: str | None = None  # scores each generation, e.g. humaneval (harness.scorers)


@dataclass(frozen=True)
class GenerationSpec:
    max_new_tokens: int = 64
    repeats: int = 1
    warmup: int = 1
    seed: int = 0
    # Execution settings (see decoders.Decoder): on a model on one CUDA device,
    # decode steps replay CUDA graphs over a static cache; compile_model also
    # runs them through torch.compile first: null (default) where it is cheap
    # (Llama-family models, seconds), true everywhere, false never.
    cuda_graphs: bool = True
    compile_model: bool | None = None
    # Sweep order: 1 runs each decoder's cells as one sweep, in the profile's order; N > 1 deals
    # every decoder's (prompt, repeat) cells out to N rounds, each round a sweep per decoder, the
    # decoders' order reversed every other round (harness.runner.sweep_plan), so drift over the
    # run falls on every decoder alike.
    rounds: int = 1


@dataclass(frozen=True)
class DecoderSpec:
    name: str
    label: str
    params: dict[str, Any] = field(default_factory=dict)
    draft: str | None = None  # this decoder's own draft (an EAGLE head, say); else models.draft

    def draft_spec(self, models: ModelsSpec) -> str | None:
        """The draft this decoder runs with (None for methods without one)."""
        return (self.draft or models.draft) if decoder_class(self.name).needs_draft else None


@dataclass(frozen=True)
class Profile:
    name: str
    models: ModelsSpec
    prompts: PromptsSpec
    generation: GenerationSpec
    decoders: tuple[DecoderSpec, ...]
    base_dir: str = "."  # folder that relative paths in the profile are read from
    warnings: tuple[str, ...] = ()  # what validation changed or ignored (the CLI prints these)

    def to_dict(self) -> dict[str, Any]:
        """The resolved profile as plain data (what run.json records)."""
        data = asdict(self)
        data.pop("base_dir")
        data.pop("warnings")
        data["prompts"]["items"] = list(self.prompts.items)
        for key in ("source", "scorer"):  # absent when unset: older profiles keep their fingerprints
            if data["prompts"][key] is None:
                del data["prompts"][key]
        if data["generation"]["rounds"] == 1:  # likewise
            del data["generation"]["rounds"]
        # A decoder's own draft appears only when set: older profiles keep their fingerprints.
        data["decoders"] = [{k: v for k, v in asdict(d).items() if k != "draft" or v is not None}
                            for d in self.decoders]
        return data

    def draft_specs(self) -> list[str]:
        """Every draft some decoder of the profile runs with, the profile's own first."""
        specs = [d.draft_spec(self.models) for d in self.decoders]
        return sorted({s for s in specs if s is not None}, key=lambda s: (s != self.models.draft, s))

    def fingerprint(self) -> str:
        """Short hash of everything that determines the run's rows."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]


_SECTIONS = {"name": str, "models": ModelsSpec, "prompts": PromptsSpec, "generation": GenerationSpec, "decoders": list}
_TYPES = {
    ModelsSpec: {"target": str, "draft": (str, type(None)), "dtype": str, "device": str,
                 "device_map": (str, type(None))},
    PromptsSpec: {
        "items": list, "file": (str, type(None)), "field": str, "id_field": (str, type(None)),
        "limit": (int, type(None)), "chat_template": bool, "system": (str, type(None)),
        "source": (str, type(None)), "scorer": (str, type(None)),
    },
    GenerationSpec: {"max_new_tokens": int, "repeats": int, "warmup": int, "seed": int, "cuda_graphs": bool,
                     "compile_model": (bool, type(None)), "rounds": int},
}
_MINIMUM = {"max_new_tokens": 1, "repeats": 1, "warmup": 0, "seed": 0, "limit": 1, "rounds": 1}
_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _device_problem(device: str) -> str | None:
    if device == "auto":
        return None
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        return f"models.device: {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps"
    return None


def _type_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def _is(value, kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False
    return isinstance(value, kinds)


def _section(raw: dict, key: str, cls, problems: list[str]):
    data = raw.get(key, {})
    if not isinstance(data, dict):
        problems.append(f"{key}: must be a mapping, got {type(data).__name__}")
        return None
    types = _TYPES[cls]
    for name in sorted(set(data) - set(types)):
        problems.append(f"{key}.{name}: unknown key (known: {', '.join(types)})")
    ok = {}
    for name, value in data.items():
        if name not in types:
            continue
        if not _is(value, types[name]):
            problems.append(f"{key}.{name}: must be {_type_name(types[name])}, got {type(value).__name__} ({value!r})")
        elif isinstance(value, int) and name in _MINIMUM and value < _MINIMUM[name]:
            problems.append(f"{key}.{name}: must be >= {_MINIMUM[name]}, got {value}")
        else:
            ok[name] = tuple(value) if isinstance(value, list) else value
    return ok


def _decoders(raw: object, problems: list[str]) -> list[DecoderSpec]:
    if not isinstance(raw, list) or not raw:
        problems.append("decoders: must be a non-empty list of {name, label?, params?, draft?}")
        return []
    specs, labels = [], set()
    for i, entry in enumerate(raw):
        where = f"decoders[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a mapping with a name, got {entry!r}")
            continue
        for key in sorted(set(entry) - {"name", "label", "params", "draft"}):
            problems.append(f"{where}.{key}: unknown key (known: name, label, params, draft)")
        name, params = entry.get("name"), entry.get("params") or {}
        try:
            cls = decoder_class(name)
        except ValueError as err:
            problems.append(f"{where}.name: {err}")
            continue
        if not isinstance(params, dict):
            problems.append(f"{where}.params: must be a mapping, got {type(params).__name__}")
            continue
        draft = entry.get("draft")
        if draft is not None and (not isinstance(draft, str) or not draft.strip()):
            problems.append(f"{where}.draft: must be a model spec (a string), got {draft!r}")
            continue
        draft = draft.strip() if draft is not None else None
        if draft is not None and not cls.needs_draft:
            problems.append(f"{where}.draft: {name} takes no draft model; remove the key")
            continue
        known = decoder_params(name)
        bad = False
        for key, value in params.items():
            if key not in known:
                problems.append(f"{where}.params.{key}: {name} takes no such parameter (it takes: {', '.join(known)})")
                bad = True
                continue
            try:
                cls.check_param(key, value)
            except (TypeError, ValueError) as err:
                problems.append(f"{where}.params.{key}: {err}")
                bad = True
        if not bad:
            try:  # rules between parameters (e.g. min_ngram <= max_ngram)
                cls.Params(**params)
            except (TypeError, ValueError) as err:
                problems.append(f"{where}.params: {err}")
        label = entry.get("label", name)
        if not isinstance(label, str) or not label or "/" in label:
            problems.append(f"{where}.label: must be a non-empty string without '/', got {label!r}")
            continue
        if label in labels:
            problems.append(f"{where}.label: {label!r} is used twice; give each setting its own label")
        labels.add(label)
        specs.append(DecoderSpec(name=name, label=label, params=dict(params), draft=draft))
    return specs


def parse_profile(raw: object, source: str = "<profile>", base_dir: str = ".") -> Profile:
    """Validate plain data (parsed YAML) into a ``Profile``; raise ``ProfileError``."""
    if not isinstance(raw, dict):
        raise ProfileError(source, [f"<root>: must be a mapping, got {type(raw).__name__}"])
    problems: list[str] = []
    warnings: list[str] = []
    for key in sorted(set(raw) - set(_SECTIONS)):
        problems.append(f"{key}: unknown key (known: {', '.join(_SECTIONS)})")
    name = raw.get("name", Path(source).stem)
    if not isinstance(name, str) or not name:
        problems.append(f"name: must be a non-empty string, got {name!r}")
    models = _section(raw, "models", ModelsSpec, problems)
    prompts = _section(raw, "prompts", PromptsSpec, problems)
    generation = _section(raw, "generation", GenerationSpec, problems)
    decoders = _decoders(raw.get("decoders"), problems)
    if models is not None:
        if "target" not in models and "models.target" not in " ".join(problems):
            problems.append("models.target: required (a folder, a .gguf file, a hub id or builtin:NAME)")
        if models.get("device_map") not in (None, "auto"):
            problems.append(f"models.device_map: only 'auto' (or null) is supported, got {models['device_map']!r}")
        if models.get("dtype", "auto") not in _DTYPES:
            problems.append(f"models.dtype: must be one of {', '.join(_DTYPES)}, got {models['dtype']!r}")
        if isinstance(models.get("device"), str) and (problem := _device_problem(models["device"])):
            problems.append(problem)
        # Decoders that need a draft and name none of their own take models.draft.
        needs_draft = [d.label for d in decoders if decoder_class(d.name).needs_draft and d.draft is None]
        if needs_draft and not models.get("draft"):
            problems.append(f"models.draft: required by decoder(s) {', '.join(needs_draft)}")
        if decoders and not needs_draft and models.get("draft"):
            # A draft no decoder uses would be loaded for nothing and recorded on every row.
            warnings.append(f"models.draft ({models['draft']}) is not loaded: no decoder of this profile uses "
                            f"it ({', '.join(d.label for d in decoders)}); remove it from the profile")
            models = {**models, "draft": None}
    if prompts is not None:
        if sum(bool(prompts.get(k)) for k in ("items", "file", "source")) != 1:
            problems.append("prompts: give exactly one of items (a list of strings), file (a JSONL path) "
                            "or source (a built-in prompt set)")
        problems.extend(scorers.check_prompts(prompts))
        bad = [i for i, p in enumerate(prompts.get("items", ())) if not isinstance(p, str) or not p]
        if bad:
            problems.append(f"prompts.items[{bad[0]}]: every prompt must be a non-empty string")
        if prompts.get("file") and not (Path(base_dir) / prompts["file"]).is_file():
            problems.append(f"prompts.file: {Path(base_dir) / prompts['file']} does not exist")
    if problems:
        raise ProfileError(source, problems)
    return Profile(
        name=name,
        models=ModelsSpec(**models),
        prompts=PromptsSpec(**prompts),
        generation=GenerationSpec(**generation),
        decoders=tuple(decoders),
        base_dir=str(base_dir),
        warnings=tuple(warnings),
    )


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``--set a.b.c=value`` overrides (value parsed as YAML; list indices allowed)."""
    data = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ProfileError("--set", [f"{item!r}: expected key=value, e.g. generation.max_new_tokens=16"])
        path, text = item.split("=", 1)
        keys = path.strip().split(".")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            reason = " ".join(str(getattr(err, "problem", None) or err).split())
            raise ProfileError("--set", [f"{item!r}: the value is not valid YAML ({reason}); quote it to pass "
                                         f"a string, e.g. --set {path}='\"{text}\"'"]) from None
        node = data
        try:
            for key in keys[:-1]:
                node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
            last = keys[-1]
            if isinstance(node, list):
                node[int(last)] = value
            else:
                node[last] = value
        except (IndexError, ValueError, TypeError, AttributeError) as err:
            raise ProfileError("--set", [f"{item!r}: cannot set {path} ({err})"]) from None
    return data


def load_profile(path: str | Path, overrides: list[str] | None = None) -> Profile:
    """Read, override and validate a YAML profile."""
    path = Path(path)
    if not path.is_file():
        raise ProfileError(str(path), [f"file not found: {path}"])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ProfileError(str(path), [f"not valid YAML: {err}"]) from None
    if overrides:
        raw = apply_overrides(raw, overrides)
    return parse_profile(raw, str(path), base_dir=str(path.parent))
