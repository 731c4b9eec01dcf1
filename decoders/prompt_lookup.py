"""``prompt_lookup``: prompt lookup decoding (Saxena 2023), verified exactly.

Drafts come from the text itself: find the most recent earlier occurrence of the
last ``n`` tokens of prompt + output (``n = max_ngram .. min_ngram``, longest
first) and propose the up to ``gamma`` tokens that followed it. No draft model,
no draft cache; no match means no draft, and that step is plain sampling. The
drafts are deterministic (``q`` one-hot), so exact speculative acceptance keeps
the target's distribution, and at temperature 0 the output is greedy
``sampling``'s. It pays where output copies input: editing, summarising, code.
Known as ``prompt_lookup_num_tokens`` in transformers and ``ngram`` in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decoders.assisted import AssistedDecoder, Proposal, Proposer, Verdict
from decoders.params import DraftParams, param, redefault
from decoders.specdecode import exact_verify


@dataclass(frozen=True)
class PromptLookupParams(DraftParams):
    gamma: int = redefault(DraftParams, "gamma", 8)
    max_ngram: int = param(3, "longest suffix n-gram to look up", minimum=1)
    min_ngram: int = param(1, "shortest suffix n-gram to look up", minimum=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) must be <= max_ngram ({self.max_ngram})")


class NgramProposer(Proposer):
    """Proposes the continuation of the latest earlier match of the sequence's suffix.

    Example: with history ``a b c d b c`` and ``max_ngram=2``, the suffix ``b c``
    occurred at position 1, so the proposal is what followed it: ``d b c``
    (cut to the budget).

    The lookup sits between the host's read of one iteration and the launch of the
    next, with the device idle, so it is an index, not a search: every n-gram
    (``min_ngram .. max_ngram`` tokens) that is followed by a token maps to its latest
    start, updated as tokens are committed, and a lookup is at most ``max_ngram -
    min_ngram + 1`` dictionary reads (``benchmarks/ngram_lookup.py``, 2-core CPU: 5.5-6.8 us
    per iteration where a numpy scan of the history took 0.10-0.28 ms at 256-4,096 tokens,
    against a SmolLM2-sized verification of 0.5-0.9 ms on a GPU). The prompt is
    indexed once, when the proposer is made (0.3-1.8 ms, repaid within 3-7 iterations).
    """

    def __init__(self, prompt: list[int], max_ngram: int, min_ngram: int, device: torch.device) -> None:
        self.history = [int(t) for t in prompt]
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.device = device
        # n-gram -> its latest start among those followed by a token. The prompt's windows
        # in bulk (starts 0 .. len - n - 1, in order, so the latest start stays): 2-2.5x
        # faster than committing the prompt token by token (1.8 against 4.0 ms at 4,096 tokens).
        self._latest: dict[tuple[int, ...], int] = {}
        h = self.history
        for n in range(min_ngram, min(max_ngram, len(h) - 1) + 1):
            windows = zip(*(h[i : len(h) - n + i] for i in range(n)), strict=True)
            self._latest.update(zip(windows, range(len(h) - n), strict=True))

    def propose(self, seq: torch.Tensor, budget: int, generator: torch.Generator) -> Proposal:
        found = self.lookup(budget)
        return Proposal(torch.tensor(found, dtype=torch.long).to(self.device, non_blocking=True))

    def lookup(self, budget: int) -> list[int]:
        """The up to ``budget`` tokens after the latest earlier match of the longest suffix that has one."""
        h = self.history
        for n in range(min(self.max_ngram, len(h) - 1), self.min_ngram - 1, -1):
            start = self._latest.get(tuple(h[-n:]))
            if start is not None:
                return h[start + n : start + n + budget]
        return []

    def commit(self, tokens: list[int], kept: int) -> None:
        h = self.history
        for token in tokens:
            # Appending a token makes the n-grams that end just before it "followed by a token".
            end = len(h)
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self._latest[tuple(h[end - n : end])] = end - n
            h.append(int(token))


class PromptLookupDecoder(AssistedDecoder):
    """n-gram lookup over prompt and output as the drafter; exact verification."""

    name = "prompt_lookup"
    Params = PromptLookupParams

    def make_proposer(self, input_ids: torch.Tensor) -> NgramProposer:
        c = self.config
        return NgramProposer(input_ids[0].tolist(), c.max_ngram, c.min_ngram, input_ids.device)

    def verify(self, p: torch.Tensor, proposal: Proposal, generator: torch.Generator) -> Verdict:
        return exact_verify(p, proposal, generator)
