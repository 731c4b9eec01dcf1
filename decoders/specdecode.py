"""``specdecode``: exact speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

The draft model proposes ``gamma`` tokens one by one, ``x_j ~ q_j``; the target
accepts ``x_j`` with probability ``min(1, p_j(x_j) / q_j(x_j))`` and, after the
first rejection, draws from the residual ``norm(max(0, p - q))``. The output
distribution equals plain sampling from the target's filtered distribution; at
temperature 0 the output equals greedy ``sampling``.

``exact_verify`` is the verifier of every exact method here: drafters without a
distribution (``Proposal.probs is None``) have ``q_j`` one-hot on ``x_j``.
"""

from __future__ import annotations

import torch

from decoders import probs as P
from decoders.assisted import AssistedDecoder, DraftModelProposer, Proposal, Verdict


def speculative_accept(
    p: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The accept/resample rule of speculative sampling, on the device (no host sync).

    Args:
        p: target probabilities ``(g + 1, V)`` at the g draft positions plus one.
        q: draft probabilities ``(g, V)`` the drafts were drawn from, or ``None``
            for deterministic drafts (``q_j`` one-hot on ``x_j``).
        drafts: drafted tokens ``(g,)``.
        uniforms: ``U(0, 1)`` draws ``(g,)``.

    Returns:
        ``(n, dist)``: the number of accepted drafts (a 0-dim LongTensor) and the
        distribution the extra token must be drawn from (residual
        ``norm(max(0, p - q))`` after a rejection, ``p_{g+1}`` when all were accepted).
    """
    g = drafts.shape[0]
    idx = torch.arange(g, device=drafts.device)
    p_x = p[idx, drafts]
    # Accept x_j while r_j < p_j(x_j) / q_j(x_j), written without the division.
    # Strict: with r in [0, 1) a token the target gives probability 0 is never
    # accepted, which keeps temperature 0 exactly greedy.
    if q is None:
        accept = uniforms < p_x
        # max(0, p - onehot(x)) is p with x removed.
        residual = p[:g].scatter(-1, drafts.view(-1, 1), 0.0)
    else:
        accept = uniforms * q[idx, drafts] < p_x
        residual = (p[:g] - q).clamp_min(0)
    n = torch.cumprod(accept.long(), 0).sum()
    # Every position's residual is formed and row n picked on the device, so the
    # step's only synchronisation is the caller's read of the result.
    total = residual.sum(-1, keepdim=True)
    # p == q up to rounding makes a rejection (almost) impossible and the residual
    # empty; falling back to p is then the exact distribution.
    residual = torch.where(total > 0, residual / total.clamp_min(torch.finfo(total.dtype).tiny), p[:g])
    return n, P.row(torch.cat([residual, p[g:]]), n)


def exact_verify(p: torch.Tensor, proposal: Proposal, generator: torch.Generator) -> Verdict:
    """Exact speculative acceptance of ``proposal`` under ``p`` ``(g + 1, V)``: the verifier
    that keeps the target's distribution, for any drafter."""
    uniforms = P.uniform((proposal.size,), generator, p.device)
    n, dist = speculative_accept(p, proposal.probs, proposal.tokens, uniforms)
    return n, P.sample(dist, generator)


class ChainProposer(DraftModelProposer):
    """Draft tokens one by one from the draft model: ``x_j ~ q_j``."""

    def propose(self, seq: torch.Tensor, budget: int, generator: torch.Generator) -> Proposal:
        drafts, q = [], []
        pending = self.pending(seq)
        for _ in range(budget):
            q_j = self.cache.probs(pending.view(1, -1), 1, self.filters)[0, -1]
            x_j = P.sample(q_j, generator)
            drafts.append(x_j)
            q.append(q_j)
            pending = x_j.view(1)
        return Proposal(torch.stack(drafts), probs=torch.stack(q))


class SpeculativeDecoder(AssistedDecoder):
    """Draft ``gamma`` tokens with the draft model, verify them in one target forward."""

    name = "specdecode"
    needs_draft = True

    def make_proposer(self, input_ids: torch.Tensor) -> ChainProposer:
        return ChainProposer(self._cache(self.draft), self.config.filters)

    def verify(self, p: torch.Tensor, proposal: Proposal, generator: torch.Generator) -> Verdict:
        return exact_verify(p, proposal, generator)
