"""``sampling``: plain autoregressive decoding, the baseline of every comparison."""

from __future__ import annotations

import torch

from decoders import probs as P
from decoders.base import Decoder, _Progress
from decoders.host_copy import HostCopy


class SamplingDecoder(Decoder):
    """One target forward per token, drawn from the filtered ``p_i``.

    Steps report ``drafted=0, accepted=0`` so that every decoder yields the same
    record shape (as Spec-Bench's baseline does). ``target_forwards`` counts one
    forward more than tokens when EOS or a stop check ends the generation early
    (the next step is already queued when the token is read).
    """

    name = "sampling"
    needs_draft = False

    def _generate(self, input_ids: torch.Tensor, progress: _Progress, generator: torch.Generator) -> tuple[int, int]:
        target = self._cache(self.target)
        filt = self.config.filters

        def queue_next(tokens: torch.Tensor) -> tuple[torch.Tensor, HostCopy]:
            """Queue a forward, a draw and the drawn token's copy to the host; nothing waits for them."""
            p = target.probs(tokens, 1, filt)[0, -1]
            progress.timer.mark("verify")
            token = P.sample(p, generator)
            read = HostCopy(token.view(1))
            progress.timer.mark("accept")
            return token, read

        token, read = queue_next(input_ids)
        while True:
            # Queue the next step before reading this token, so the device works
            # while the host waits for the value and does its bookkeeping: the read
            # waits for this token's copy, not for the step queued behind it. If
            # this token ends the generation (EOS, a stop string), that one forward
            # is wasted.
            following = queue_next(token.view(1, 1)) if progress.remaining > 1 else None
            progress.commit(read.tolist(), drafted=0, accepted=0)
            if progress.finished:
                return target.forwards, 0
            token, read = following
