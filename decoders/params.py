"""Decoder parameters, declared once.

Each decoder declares its parameters as a frozen dataclass whose fields are made
with ``param(default, doc, ...)``. Everything else reads that declaration:
``get_decoder``'s validation and its error messages, ``Decoder.params``,
``decoders.decoder_params``, the profile and lm-eval checks, and the CLI's
listing (``harness decoders``).

    >>> @dataclass(frozen=True)
    ... class MyParams(FilterParams):
    ...     gamma: int = param(4, "tokens drafted per target forward", minimum=1)

Subclasses inherit their parent's fields and may redeclare one to change its
default (MTAD's reference settings are ``top_k=10, top_p=0.9``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParamInfo:
    """What a parameter accepts.

    Attributes:
        kind: ``int``, ``float`` or ``bool`` (an int is accepted for a float).
        doc: one line for users.
        minimum, maximum: bounds (``None``: unbounded on that side).
        exclusive_minimum: the minimum itself is refused (``> 0`` instead of ``>= 0``).
        rule: the wording of the bounds in error messages, when the generated
            one would read badly; ``note``: appended to it (what a value means).
    """

    kind: type
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    rule: str | None = None
    note: str = ""

    def describe(self) -> str:
        """The accepted values, e.g. ``>= 1`` or ``in (0, 1]``."""
        if self.rule:
            return self.rule
        if self.kind is bool:
            return "true or false"
        low = None if self.minimum is None else f"{'>' if self.exclusive_minimum else '>='} {_num(self.minimum)}"
        if self.maximum is None:
            return low or "any number"
        if self.minimum is None:
            return f"<= {_num(self.maximum)}"
        bracket = "(" if self.exclusive_minimum else "["
        return f"in {bracket}{_num(self.minimum)}, {_num(self.maximum)}]"

    def check(self, name: str, value: object) -> Any:
        """Return ``value`` in its canonical type, or raise ``TypeError``/``ValueError`` with the fix."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be true or false, got {type(value).__name__} ({value!r})")
            return value
        # bool is an int subclass: "gamma: true" in a YAML profile is a mistake.
        if self.kind is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
        if self.kind is float:
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        too_low = self.minimum is not None and (
            value <= self.minimum if self.exclusive_minimum else value < self.minimum
        )
        too_high = self.maximum is not None and value > self.maximum
        if too_low or too_high:
            note = f" ({self.note})" if self.note else ""
            raise ValueError(f"{name} must be {self.describe()}{note}, got {value}")
        return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def param(default: Any, doc: str, *, kind: type | None = None, minimum: float | None = None,
          maximum: float | None = None, exclusive_minimum: bool = False, rule: str | None = None,
          note: str = "") -> Any:
    """A dataclass field carrying its ``ParamInfo``; ``kind`` defaults to the default's type."""
    info = ParamInfo(kind or type(default), doc, minimum, maximum, exclusive_minimum, rule, note)
    return dataclasses.field(default=default, metadata={"param": info})


def redefault(params_cls: type, name: str, default: Any) -> Any:
    """Field ``name`` of ``params_cls`` with another default (same doc and bounds), for a subclass."""
    field = {f.name: f for f in dataclasses.fields(params_cls)}[name]
    return dataclasses.field(default=default, metadata=field.metadata)


def infos(params_cls: type) -> dict[str, ParamInfo]:
    """``{name: ParamInfo}`` of a parameter dataclass, in declaration order."""
    return {f.name: f.metadata["param"] for f in dataclasses.fields(params_cls)}


def defaults(params_cls: type) -> dict[str, Any]:
    """``{name: default}`` of a parameter dataclass."""
    return {f.name: f.default for f in dataclasses.fields(params_cls)}


def check_param(params_cls: type, owner: str, name: str, value: object) -> Any:
    """Check one parameter of decoder ``owner``; unknown names raise ``TypeError``."""
    known = infos(params_cls)
    if name not in known:
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"decoder {owner!r} takes no parameter {name!r}; it takes: {', '.join(sorted(known))}.{hint}")
    return known[name].check(name, value)


@dataclass(frozen=True)
class Params:
    """Base of every decoder's parameter dataclass: validates on construction."""

    def __post_init__(self) -> None:
        for name, info in infos(type(self)).items():
            object.__setattr__(self, name, info.check(name, getattr(self, name)))

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly ``{name: value}`` as passed to ``get_decoder``."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FilterParams(Params):
    """How every decoder turns logits into a distribution (temperature, then top-k, then top-p)."""

    temperature: float = param(1.0, "softmax temperature; 0 decodes greedily (argmax)", kind=float,
                               minimum=0, note="0 means greedy")
    top_k: int = param(0, "keep the k most likely tokens; 0 switches it off", minimum=0,
                       note="0 switches it off")
    top_p: float = param(1.0, "keep the smallest set of tokens whose mass reaches p; 1.0 switches it off",
                         minimum=0, maximum=1, exclusive_minimum=True, note="1.0 switches it off")

    @property
    def filters(self) -> tuple[float, int, float]:
        """``(temperature, top_k, top_p)`` for ``probs.filtered_probs``."""
        return self.temperature, self.top_k, self.top_p


@dataclass(frozen=True)
class DraftParams(FilterParams):
    """Filters plus the draft length of a propose/verify decoder."""

    gamma: int = param(4, "tokens drafted per target forward (the most, for drafters that may find fewer)",
                       minimum=1)
