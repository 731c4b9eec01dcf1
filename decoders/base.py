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

import torch
from transformers import PreTrainedModel

from decoders import kv, static

EosIds = int | Sequence[int] | None


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
    """

    tokens: torch.Tensor
    steps: tuple[StepRecord, ...]
    target_forwards: int
    draft_forwards: int = 0

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
    should_stop: StopCheck | None = None
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
        return len(kept)


def commit_block(
    progress: _Progress, seq: torch.Tensor, drafts: torch.Tensor, n: torch.Tensor, extra: torch.Tensor,
    drafted: int, target: kv.CachedModel, draft: kv.CachedModel,
) -> torch.Tensor:
    """Commit ``drafts[:n]`` plus the ``extra`` token and crop both caches to match.

    ``n`` is a 0-dim tensor: reading it together with the tokens is the step's one
    host synchronisation. The target cache keeps the committed prefix up to
    ``x_n`` (the extra token is fed next step); the draft cache never held more
    than the drafts it was fed. Returns the sequence (prompt + committed tokens)
    extended by the new tokens.
    """
    values = torch.cat([n.view(1), drafts, extra.view(1)]).tolist()
    accepted = values[0]
    new = values[1 : 1 + accepted] + values[-1:]
    progress.commit(new, drafted=drafted, accepted=accepted)
    old_len = seq.shape[0]
    target.crop(old_len + accepted)
    draft.crop(min(draft.length, old_len + accepted))
    return torch.cat([seq, drafts[:accepted], extra.view(1)])


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


def check_int(name: str, value: object, minimum: int, hint: str = "") -> None:
    """Raise unless ``value`` is an int (not bool) >= ``minimum``."""
    # bool is an int subclass; "gamma: true" in a YAML profile is a mistake.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{hint}, got {value}")


def check_float(name: str, value: object) -> float:
    """Raise unless ``value`` is a real number; return it as float."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    return float(value)


class Decoder(abc.ABC):
    """Base class: holds the sampling filter parameters and validates inputs.

    Subclasses implement ``_generate`` and extend ``check_param`` for their own
    parameters. ``temperature`` 0 means greedy (argmax); ``top_k`` 0 and
    ``top_p`` 1.0 switch those filters off.

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
            per shape).
    """

    name: str = ""
    needs_draft: bool = False
    cuda_graphs: bool = True
    static_cache: bool = False
    compile_model: bool = False

    @classmethod
    def check_param(cls, name: str, value: object) -> None:
        """Raise ``TypeError``/``ValueError`` if ``value`` is bad for parameter ``name``.

        Usable without models, so profiles are validated before anything loads.
        """
        if name == "temperature":
            if check_float(name, value) < 0:
                raise ValueError(f"temperature must be >= 0 (0 means greedy), got {value}")
        elif name == "top_k":
            check_int(name, value, 0, " (0 switches it off)")
        elif name == "top_p":
            if not 0.0 < check_float(name, value) <= 1.0:
                raise ValueError(f"top_p must be in (0, 1] (1.0 switches it off), got {value}")
        else:
            raise TypeError(f"decoder {cls.name!r} takes no parameter {name!r}")

    def __init__(
        self,
        target: PreTrainedModel,
        draft: PreTrainedModel | None = None,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
    ) -> None:
        for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
            self.check_param(name, value)
        if self.needs_draft and draft is None:
            raise ValueError(f"decoder {self.name!r} needs a draft model: pass draft=...")
        if not self.needs_draft and draft is not None:
            raise ValueError(f"decoder {self.name!r} takes no draft model; drop draft=...")
        if draft is not None:
            t_vocab, d_vocab = kv.vocab_size(target), kv.vocab_size(draft)
            if t_vocab != d_vocab:
                raise ValueError(
                    f"draft vocabulary size {d_vocab} differs from target vocabulary size "
                    f"{t_vocab}; the draft must share the target's tokenizer"
                )
        self.target = target
        self.draft = draft
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.top_p = float(top_p)

    @property
    def params(self) -> dict[str, object]:
        """The decoder's parameters, as passed to ``get_decoder`` (JSON-friendly)."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}

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
        check_int("max_new_tokens", max_new_tokens, 1)
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        progress = _Progress(max_new_tokens, _eos_set(eos_token_id), on_step, should_stop)
        device = kv.device_of(self.target)
        # Room for the prompt, the new tokens and one over-long final draft block.
        self._max_length = input_ids.shape[1] + max_new_tokens + int(getattr(self, "gamma", 0)) + 1
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
        )

    def _cache(self, model: PreTrainedModel, rows: int = 1) -> kv.CachedModel | static.StaticCachedModel:
        """The KV-cached view of ``model`` for this generation (``rows`` beams at most)."""
        graphs = self.cuda_graphs and kv.device_of(model).type == "cuda"
        if (graphs or self.static_cache) and static.supports_static_cache(model):
            cache = static.acquire(model, rows, self._max_length, graphs, busy=self._open,
                                   compile=graphs and self.compile_model)
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
