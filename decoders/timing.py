"""Where a generation's wall time goes: draft, verify, accept, other.

A decoder marks the end of each phase as it queues the phase's work; nothing
waits inside the loop. On CUDA each mark records an event on the current stream
and the gaps between consecutive events are read once, when the generation
ends: each phase gets the device-timeline time from the previous mark to its
own (the time the device spent on its kernels, or waiting for the host to queue
them). On the CPU the marks read ``time.perf_counter``.

Phases:
    draft: the proposer (draft-model forwards, n-gram lookup, ...).
    verify: the target forward and its filtered distributions (plain sampling's
        one forward per token is verify too).
    accept: the accept/resample rule and drawing the next token.
    other: committing tokens, stop checks, and the rest of the host's bookkeeping.

A phase runs from the previous mark to its own, so work queued between a
step's last mark and the next step's first (cropping caches, extending the
sequence) counts to the next step's draft, the prompt's prefill counts to the
first verify, and host work hidden behind queued device work (``sampling``'s
look-ahead) costs no phase anything, which is the point: phases are where the
device timeline went.
"""

from __future__ import annotations

import time

import torch

PHASES = ("draft", "verify", "accept", "other")


class PhaseTimer:
    """Accumulates time per phase between ``mark`` calls; ``totals_s`` reads them once."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._device = device
        self._marks: list[tuple[str, object]] = []
        self._start = self._now()

    def _now(self) -> object:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self._device))  # the decoding device's, not device 0's
            return event
        return time.perf_counter()

    def mark(self, phase: str) -> None:
        """The time since the previous mark belongs to ``phase``."""
        self._marks.append((phase, self._now()))

    def totals_s(self) -> dict[str, float]:
        """Seconds per phase (every phase present, 0.0 where unused); synchronises on CUDA."""
        totals = dict.fromkeys(PHASES, 0.0)
        previous = self._start
        if self._cuda and self._marks:
            self._marks[-1][1].synchronize()
        for phase, now in self._marks:
            totals[phase] += previous.elapsed_time(now) / 1e3 if self._cuda else now - previous
            previous = now
        return totals
