"""``specdecode``: exact speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

The output distribution equals plain sampling from the target's filtered
distribution; at temperature 0 the output equals greedy ``sampling``.
"""

from __future__ import annotations

import torch

from decoders import probs as P
from decoders.base import Decoder, _Progress, check_int, commit_block


def speculative_accept(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The accept/resample rule of speculative sampling, on the device (no host sync).

    Args:
        p: target probabilities ``(g + 1, V)`` at the g draft positions plus one.
        q: draft probabilities ``(g, V)`` the drafts were drawn from.
        drafts: drafted tokens ``(g,)``.
        uniforms: ``U(0, 1)`` draws ``(g,)``.

    Returns:
        ``(n, dist)``: the number of accepted drafts (a 0-dim LongTensor) and the
        distribution the extra token must be drawn from (residual
        ``norm(max(0, p - q))`` after a rejection, ``p_{g+1}`` when all were accepted).
    """
    g = drafts.shape[0]
    idx = torch.arange(g, device=drafts.device)
    # Accept x_j while r_j < p_j(x_j) / q_j(x_j), written without the division.
    # Strict: with r in [0, 1) a token the target gives probability 0 is never
    # accepted, which keeps temperature 0 exactly greedy.
    accept = uniforms * q[idx, drafts] < p[idx, drafts]
    n = torch.cumprod(accept.long(), 0).sum()
    # Every position's residual is formed and row n picked on the device, so the
    # step's only synchronisation is the caller's read of the result.
    residual = (p[:g] - q).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    # p == q up to rounding makes a rejection (almost) impossible and the residual
    # empty; falling back to p is then the exact distribution.
    residual = torch.where(total > 0, residual / total.clamp_min(torch.finfo(total.dtype).tiny), p[:g])
    return n, P.row(torch.cat([residual, p[g:]]), n)


class SpeculativeDecoder(Decoder):
    """Draft ``gamma`` tokens with the draft model, verify them in one target forward."""

    name = "specdecode"
    needs_draft = True

    @classmethod
    def check_param(cls, name: str, value: object) -> None:
        if name == "gamma":
            check_int(name, value, 1)
        else:
            super().check_param(name, value)

    def __init__(self, target, draft=None, *, gamma: int = 4, **filters) -> None:
        super().__init__(target, draft, **filters)
        self.check_param("gamma", gamma)
        self.gamma = gamma

    @property
    def params(self) -> dict[str, object]:
        return {**super().params, "gamma": self.gamma}

    def _generate(self, input_ids: torch.Tensor, progress: _Progress, generator: torch.Generator) -> tuple[int, int]:
        target, draft = self._cache(self.target), self._cache(self.draft)
        device = input_ids.device
        seq = input_ids[0]  # prompt + committed tokens
        filt = (self.temperature, self.top_k, self.top_p)
        while not progress.finished:
            # Never draft past max_new_tokens: the step's extra token needs a slot.
            g = min(self.gamma, progress.remaining - 1)
            # 1. Draft g tokens one by one, x_j ~ q_j.
            drafts, q = [], []
            pending = seq[draft.length :]
            for _ in range(g):
                q_j = P.filtered_probs(draft(pending.view(1, -1), keep=1)[0, -1], *filt)
                x_j = P.sample(q_j, generator)
                drafts.append(x_j)
                q.append(q_j)
                pending = x_j.view(1)
            drafts_t = torch.stack(drafts) if drafts else seq.new_empty(0)
            # 2. One target forward over the unseen tail plus the drafts: p_1..p_{g+1}.
            tail = torch.cat([seq[target.length :], drafts_t])
            p = P.filtered_probs(target(tail.view(1, -1), keep=g + 1)[0], *filt)
            # 3-4. Accept a prefix, then draw the extra token.
            if g:
                n, dist = speculative_accept(p, torch.stack(q), drafts_t, P.uniform((g,), generator, device))
            else:
                n, dist = torch.zeros((), dtype=torch.long, device=device), p[0]
            # 5. Commit, and crop both caches to the committed prefix.
            seq = commit_block(progress, seq, drafts_t, n, P.sample(dist, generator), g, target, draft)
        return target.forwards, draft.forwards
