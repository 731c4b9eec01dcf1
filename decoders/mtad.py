"""``mtad``: multi-token assisted decoding (Qin et al., ICLR 2025, arXiv 2407.09722).

The draft runs stochastic beam sampling to propose a block that is likely under
the *joint* distribution; the target accepts the longest prefix whose joint
likelihood ratio passes a threshold. Deliberately not distribution-preserving:
it trades exactness for lower output perplexity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from decoders import probs as P
from decoders.assisted import AssistedDecoder, DraftModelProposer, Proposal, Verdict
from decoders.params import DraftParams, FilterParams, param, redefault


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


@dataclass(frozen=True)
class MTADParams(DraftParams):
    """MTAD's parameters; the defaults are the reference implementation's."""

    beam_width: int = param(4, "beams of the draft's stochastic beam sampling", minimum=1)
    accept_thres: float = param(0.5, "tau of the joint-likelihood test: accept while P/Q > tau", kind=float,
                                minimum=0, maximum=1, exclusive_minimum=True,
                                rule="> 0 and <= 1", note="the paper uses 0.5; above 1 a perfect draft fails")
    replacement: bool = param(False, "sample the beams with replacement")
    top_k: int = redefault(FilterParams, "top_k", 10)
    top_p: float = redefault(FilterParams, "top_p", 0.9)


class BeamProposer(DraftModelProposer):
    """Steps 1-3: stochastic beam sampling on the draft; proposes the best beam."""

    def __init__(self, cache, filters: tuple[float, int, float], width: int, replacement: bool) -> None:
        super().__init__(cache, filters)
        self.width = width
        self.replacement = replacement

    def propose(self, seq: torch.Tensor, budget: int, generator: torch.Generator) -> Proposal:
        """The beam of the largest weight after ``budget`` depths, with its ``log q``.

        The draft cache is left holding that beam's first ``budget - 1`` tokens.
        """
        draft, width, g = self.cache, self.width, budget
        # 1. First tokens from q_1; weights are their probabilities, renormalised.
        q1 = draft.probs(self.pending(seq).view(1, -1), 1, self.filters)[0, -1]
        tokens = P.sample_many(q1, width, self.replacement, generator).view(width, 1)
        scores = q1[tokens[:, 0]]
        weights = scores / scores.sum()
        log_q = scores.log().view(width, 1)
        if g > 1:
            draft.repeat(width)
        # 2. Extend every beam by one token per depth from weight_b * q(token | beam_b).
        for _ in range(g - 1):
            q = draft.probs(tokens[:, -1:], 1, self.filters)[:, -1]  # (width, V)
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
        return Proposal(P.row(tokens, best), log_q=P.row(log_q, best))


class MTADDecoder(AssistedDecoder):
    """Beam sampling on the draft, joint-likelihood verification by the target."""

    name = "mtad"
    needs_draft = True
    Params = MTADParams

    def make_proposer(self, input_ids: torch.Tensor) -> BeamProposer:
        c = self.config
        return BeamProposer(self._cache(self.draft, rows=c.beam_width), c.filters, c.beam_width, c.replacement)

    def verify(self, p: torch.Tensor, proposal: Proposal, generator: torch.Generator) -> Verdict:
        # 5. Longest prefix passing the joint-likelihood test (no random draw).
        n = mtad_accept_length(P.log_probs_of(p[:-1], proposal.tokens), proposal.log_q, self.config.accept_thres)
        # 6. x_1..x_n plus one token drawn from p_{n+1} directly (no residual).
        return n, P.sample(P.row(p, n), generator)
