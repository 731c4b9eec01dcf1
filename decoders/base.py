"""The decoder contract shared by every decoding method.

A decoder turns a prompt ``input_ids`` of shape ``(1, n)`` into new tokens and
reports, for every target verification forward ("step"), how many tokens it
drafted and how many of those the target accepted. Everything else in the
project (the profiler, lm-eval adapter, reports) relies only on this contract.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import PreTrainedModel

from decoders import kv, static
from decoders.params import FilterParams, ParamInfo, check_param
from decoders.registry import register as _register
from decoders.timing import PhaseTimer

EosIds = int | Sequence[int] | None
_MAX_NEW_TOKENS = ParamInfo(int, "upper bound on new tokens", minimum=1)


@dataclass(frozen=True)
class StepRecord:
    """What happened in one target verification forward.

    Attributes:
        drafted: tokens proposed by the draft model in this step (0 for sampling).
        accepted: drafted tokens the target kept (a prefix of the drafted block).
        committed: tokens appended to the output in this step. Normally
            ``accepted + 1``; smaller only when EOS or ``max_new_tokens`` cut the step.
    """

    drafted: int
    accepted: int
    committed: int


@dataclass(frozen=True)
class GenerationOutput:
    """Result of one ``Decoder.generate`` call.

    Attributes:
        tokens: 1-D LongTensor (on CPU) of the new tokens only.
        steps: one ``StepRecord`` per target verification forward.
        target_forwards: number of target model forward calls.
        draft_forwards: number of draft model forward calls (batched beams count once).
        phase_times_s: the generation's time split into ``decoders.timing.PHASES``
            (draft, verify, accept, other), seconds.
    """

    tokens: torch.Tensor
    steps: tuple[StepRecord, ...]
    target_forwards: int
    draft_forwards: int = 0
    phase_times_s: dict[str, float] = field(default_factory=dict)

    @property
    def mean_accepted(self) -> float:
        """Mean number of drafted tokens accepted per step (0.0 without steps)."""
        return sum(s.accepted for s in self.steps) / len(self.steps) if self.steps else 0.0


StepCallback = Callable[[StepRecord], None]
StopCheck = Callable[[list[int]], bool]


@dataclass
class _Progress:
    """Mutable bookkeeping of one generation: the committed tokens and counters."""

    max_new_tokens: int
    eos_ids: frozenset[int]
    on_step: StepCallback | None
    should_stop: StopCheck | None
    timer: PhaseTimer
    tokens: list[int] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    finished: bool = False

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.tokens)

    def commit(self, new_tokens: Sequence[int], drafted: int, accepted: int) -> int:
        """Append a step's tokens, cut at EOS (kept) and at ``max_new_tokens``.

        Returns the number of tokens actually committed.
        """
        kept: list[int] = []
        for tok in new_tokens[: self.remaining]:
            kept.append(tok)
            if tok in self.eos_ids:
                self.finished = True
                break
        self.tokens.extend(kept)
        if self.remaining <= 0 or (self.should_stop is not None and kept and self.should_stop(self.tokens)):
            self.finished = True
        record = StepRecord(drafted=drafted, accepted=accepted, committed=len(kept))
        self.steps.append(record)
        if self.on_step is not None:
            self.on_step(record)
        self.timer.mark("other")
        return len(kept)


def _on_device(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from ``generator``, so noise needs no host copies.

    A CPU generator driving CUDA decoding would draw every step's noise on the
    host and copy it over; one draw from it seeds a device generator instead,
    which keeps runs reproducible from the caller's seed.
    """
    if generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device).manual_seed(seed)


def _eos_set(eos_token_id: EosIds) -> frozenset[int]:
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset({eos_token_id})
    return frozenset(int(t) for t in eos_token_id)


class Decoder(abc.ABC):
    """Base class of every decoding method: parameters, input checks, caches.

    A subclass sets ``name`` (registered on definition), ``Params`` (a
    ``decoders.params`` dataclass: its declaration is the whole parameter
    interface), ``needs_draft``, and implements ``_generate``. Propose/verify
    methods subclass ``decoders.assisted.AssistedDecoder`` instead, which owns
    the iteration and asks only for a proposer and a verifier.

    Execution (not decoding) settings, as attributes:
        cuda_graphs: on a model that sits on one CUDA device, use a static KV
            cache and replay CUDA graphs for decode steps (``decoders.static``).
            The tokens are those of the plain path (eager forwards over a
            ``DynamicCache``) up to floating-point rounding. False forces the
            plain path, e.g. to measure what the graphs buy.
        static_cache: use the static cache without graphs, on any device (for
            testing the fast path's cache logic on a CPU).
        compile_model: on the fast path, also ``torch.compile`` the decode-step
            forwards before capturing them (fewer, fused kernels; compiles once
            per shape). ``None``: only where the fused forward runs the model.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[FilterParams]] = FilterParams
    needs_draft: ClassVar[bool] = False
    # Whether the draft may be a feature-level head (``decoders.eagle.EagleHead``), whose
    # forward needs the target's hidden states: only methods that hand them over.
    drafts_from_features: ClassVar[bool] = False
    cuda_graphs: bool = True
    static_cache: bool = False
    compile_model: bool | None = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):  # its own name: a subclass without one is not a new method
            _register(cls)

    @classmethod
    def check_param(cls, name: str, value: object) -> object:
        """Raise ``TypeError``/``ValueError`` if ``value`` is bad for parameter ``name``.

        Usable without models, so profiles are validated before anything loads.
        Returns the value in its canonical type.
        """
        return check_param(cls.Params, cls.name, name, value)

    @classmethod
    def check_draft(cls, has_draft: bool, how: str = "pass draft=...") -> None:
        """Raise ``ValueError`` unless a draft is given exactly when the method needs one.

        ``how`` names the way the caller's user passes a draft, for the message.
        """
        if cls.needs_draft and not has_draft:
            raise ValueError(f"decoder {cls.name!r} needs a draft model: {how}")
        if not cls.needs_draft and has_draft:
            raise ValueError(f"decoder {cls.name!r} takes no draft model; drop the draft ({how})")

    def __init__(self, target: PreTrainedModel, draft: PreTrainedModel | None = None, **params: object) -> None:
        for key, value in params.items():  # one clear message per bad name or value
            self.check_param(key, value)
        self.config = self.Params(**params)
        self.check_draft(draft is not None)
        if draft is not None:
            kv.check_same_vocabulary(target, draft)
            if getattr(draft, "reads_target_features", False) and not self.drafts_from_features:
                raise ValueError(f"the draft is an EAGLE head, which drafts from the target's hidden states: "
                                 f"it works with decoder 'eagle', not {self.name!r}; give {self.name!r} a draft model")
        self.target = target
        self.draft = draft

    @property
    def params(self) -> dict[str, object]:
        """The decoder's parameters, as passed to ``get_decoder`` (JSON-friendly)."""
        return self.config.as_dict()

    @property
    def max_draft_tokens(self) -> int:
        """The most tokens one iteration drafts (0 for methods that draft nothing).

        Sizes the caches and the per-position statistics.
        """
        return 0

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        generator: torch.Generator | None = None,
        eos_token_id: EosIds = None,
        on_step: StepCallback | None = None,
        should_stop: StopCheck | None = None,
    ) -> GenerationOutput:
        """Generate up to ``max_new_tokens`` tokens after ``input_ids``.

        Args:
            input_ids: LongTensor of shape ``(1, n)``, n >= 1, on the target's device.
            max_new_tokens: upper bound on new tokens (>= 1).
            generator: the only source of randomness; ``None`` uses a fresh,
                unseeded generator (non-reproducible).
            eos_token_id: token id(s) that end generation; the EOS token is kept.
            on_step: called after each step with its ``StepRecord`` (e.g. to time
                the first token); it must not modify the decoder.
            should_stop: called after each step with all tokens so far; returning
                True ends generation after that step (e.g. a stop string appeared).
                The step's tokens are kept whole; callers trim text themselves.

        Returns:
            ``GenerationOutput`` with the new tokens on CPU and one record per step.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long:
            raise TypeError("input_ids must be a torch.LongTensor of shape (1, n)")
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
            raise ValueError(
                f"input_ids must have shape (1, n) with n >= 1 (batch size 1), got {tuple(input_ids.shape)}"
            )
        _MAX_NEW_TOKENS.check("max_new_tokens", max_new_tokens)
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        device = kv.device_of(self.target)
        progress = _Progress(max_new_tokens, _eos_set(eos_token_id), on_step, should_stop, PhaseTimer(device))
        # Room for the prompt, the new tokens and one over-long final draft block.
        self._max_length = input_ids.shape[1] + max_new_tokens + self.max_draft_tokens + 1
        self._open: list = []
        try:
            counts = self._generate(input_ids.to(device), progress, _on_device(generator, device))
        finally:
            self._open = []
        return GenerationOutput(
            tokens=torch.tensor(progress.tokens, dtype=torch.long),
            steps=tuple(progress.steps),
            target_forwards=counts[0],
            draft_forwards=counts[1],
            phase_times_s=progress.timer.totals_s(),
        )

    def _cache(self, model: PreTrainedModel, rows: int = 1) -> kv.CachedModel | static.StaticCachedModel:
        """The KV-cached view of ``model`` for this generation (``rows`` beams at most)."""
        graphs = self.cuda_graphs and kv.device_of(model).type == "cuda"
        if (graphs or self.static_cache) and static.supports_static_cache(model):
            cache = static.acquire(model, rows, self._max_length, graphs, busy=self._open,
                                   compile=self.compile_model if graphs else False)
        else:
            cache = kv.CachedModel(model)
        self._open.append(cache)
        return cache

    @abc.abstractmethod
    def _generate(
        self, input_ids: torch.Tensor, progress: _Progress, generator: torch.Generator
    ) -> tuple[int, int]:
        """Run the decode loop, committing through ``progress``.

        Returns ``(target_forwards, draft_forwards)``.
        """
