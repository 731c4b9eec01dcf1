"""``mtad``: multi-token assisted decoding (Qin et al., ICLR 2025, arXiv 2407.09722).

The draft runs stochastic beam sampling to propose a block that is likely under
the *joint* distribution; the target accepts the longest prefix whose joint
likelihood ratio passes a threshold. Deliberately not distribution-preserving:
it trades exactness for lower output perplexity.
"""

from __future__ import annotations

import math

import torch

from decoders import probs as P
from decoders.base import Decoder, _Progress, check_float, check_int, commit_block


def mtad_accept_length(log_p: torch.Tensor, log_q: torch.Tensor, accept_thres: float) -> torch.Tensor:
    """Accepted length of MTAD's joint-likelihood test.

    Args:
        log_p: ``(g,)`` target log-probabilities ``log p_j(x_j)`` of the drafted block.
        log_q: ``(g,)`` draft log-probabilities ``log q_j(x_j)`` of the same block.
        accept_thres: tau > 0.

    Returns:
        The LARGEST ``i`` with ``log P_i - log Q_i > log tau``, where ``P_i``/``Q_i``
        are the joint probabilities of the first ``i`` tokens; 0 if none passes.
        Every depth is scanned: a short prefix may fail while a longer one passes.
        A 0-dim LongTensor on the inputs' device: the caller decides when to sync.
    """
    ratio = log_p.cumsum(0) - log_q.cumsum(0)
    depth = torch.arange(1, ratio.shape[0] + 1, device=ratio.device)
    return torch.where(ratio > math.log(accept_thres), depth, 0).max()


class MTADDecoder(Decoder):
    """Beam sampling on the draft, joint-likelihood verification by the target."""

    name = "mtad"
    needs_draft = True

    def __init__(
        self,
        target,
        draft=None,
        *,
        gamma: int = 4,
        beam_width: int = 4,
        accept_thres: float = 0.5,
        replacement: bool = False,
        temperature: float = 1.0,
        top_k: int = 10,
        top_p: float = 0.9,
    ) -> None:
        super().__init__(target, draft, temperature=temperature, top_k=top_k, top_p=top_p)
        for name, value in (("gamma", gamma), ("beam_width", beam_width), ("accept_thres", accept_thres),
                            ("replacement", replacement)):
            self.check_param(name, value)
        self.gamma = gamma
        self.beam_width = beam_width
        self.accept_thres = float(accept_thres)
        self.replacement = replacement

    @classmethod
    def check_param(cls, name: str, value: object) -> None:
        if name in ("gamma", "beam_width"):
            check_int(name, value, 1)
        elif name == "accept_thres":
            if not check_float(name, value) > 0:
                raise ValueError(f"accept_thres must be > 0 (the paper uses 0.5), got {value}")
        elif name == "replacement":
            if not isinstance(value, bool):
                raise TypeError(f"replacement must be true or false, got {type(value).__name__} ({value!r})")
        else:
            super().check_param(name, value)

    @property
    def params(self) -> dict[str, object]:
        return {
            **super().params,
            "gamma": self.gamma,
            "beam_width": self.beam_width,
            "accept_thres": self.accept_thres,
            "replacement": self.replacement,
        }

    def _draft_beams(self, draft, pending: torch.Tensor, g: int, generator: torch.Generator):
        """Steps 1-3: stochastic beam sampling of ``g`` tokens; returns the best beam.

        Returns ``(tokens (g,), log_q (g,))`` of the beam with the largest weight.
        The draft cache is left holding that beam's first ``g - 1`` tokens.
        """
        filt = (self.temperature, self.top_k, self.top_p)
        width = self.beam_width
        # 1. First tokens from q_1; weights are their probabilities, renormalised.
        q1 = P.filtered_probs(draft(pending.view(1, -1), keep=1)[0, -1], *filt)
        tokens = P.sample_many(q1, width, self.replacement, generator).view(width, 1)
        scores = q1[tokens[:, 0]]
        weights = scores / scores.sum()
        log_q = scores.log().view(width, 1)
        if g > 1:
            draft.repeat(width)
        # 2. Extend every beam by one token per depth from weight_b * q(token | beam_b).
        for _ in range(g - 1):
            q = P.filtered_probs(draft(tokens[:, -1:], keep=1)[:, -1], *filt)  # (width, V)
            joint = (weights.unsqueeze(1) * q).flatten()
            pick = P.sample_many(joint, width, self.replacement, generator)
            parent, token = pick // q.shape[1], pick % q.shape[1]
            chosen = joint[pick]
            # Zero-weight picks (fewer positive pairs than beams) stay dead beams.
            weights = chosen / chosen.sum()
            draft.select(parent)
            tokens = torch.cat([tokens[parent], token.unsqueeze(1)], dim=1)
            log_q = torch.cat([log_q[parent], q[parent, token].log().unsqueeze(1)], dim=1)
        # 3. Keep the single beam with the largest weight.
        best = weights.argmax()
        if g > 1:
            draft.select(best.view(1))
        return P.row(tokens, best), P.row(log_q, best)

    def _generate(self, input_ids: torch.Tensor, progress: _Progress, generator: torch.Generator) -> tuple[int, int]:
        target, draft = self._cache(self.target), self._cache(self.draft, rows=self.beam_width)
        seq = input_ids[0]
        filt = (self.temperature, self.top_k, self.top_p)
        while not progress.finished:
            g = min(self.gamma, progress.remaining - 1)
            if g:
                drafts, log_q = self._draft_beams(draft, seq[draft.length :], g, generator)
            else:
                drafts, log_q = seq.new_empty(0), None
            # 4. One target forward over the unseen tail plus the kept beam.
            tail = torch.cat([seq[target.length :], drafts])
            p = P.filtered_probs(target(tail.view(1, -1), keep=g + 1)[0], *filt)
            # 5. Longest prefix passing the joint-likelihood test (no random draw).
            if g:
                n = mtad_accept_length(P.log_probs_of(p[:g], drafts), log_q, self.accept_thres)
            else:
                n = torch.zeros((), dtype=torch.long, device=p.device)
            # 6. Commit x_1..x_n plus one token drawn from p_{n+1} directly (no residual);
            # crop the target cache to the committed prefix, the draft's to the kept beam's.
            seq = commit_block(progress, seq, drafts, n, P.sample(P.row(p, n), generator), g, target, draft)
        return target.forwards, draft.forwards
