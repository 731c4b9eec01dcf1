"""``sampling``: plain autoregressive decoding, the baseline of every comparison."""

from __future__ import annotations

import torch

from decoders import probs as P
from decoders.base import Decoder, _Progress
from decoders.kv import CachedModel


class SamplingDecoder(Decoder):
    """One target forward per token, drawn from the filtered ``p_i``.

    Steps report ``drafted=0, accepted=0`` so that every decoder yields the same
    record shape (as Spec-Bench's baseline does).
    """

    name = "sampling"
    needs_draft = False

    def _generate(self, input_ids: torch.Tensor, progress: _Progress, generator: torch.Generator) -> tuple[int, int]:
        target = CachedModel(self.target)
        pending = input_ids  # tokens the cache has not seen yet
        while not progress.finished:
            logits = target(pending, keep=1)[0, -1]
            token = P.sample(P.filtered_probs(logits, self.temperature, self.top_k, self.top_p), generator)
            progress.commit([int(token)], drafted=0, accepted=0)
            pending = token.view(1, 1)
        return target.forwards, 0
