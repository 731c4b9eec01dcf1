"""The propose/verify skeleton that every assisted decoding method shares.

One iteration (one target forward) of every such method:

1. the *proposer* drafts up to ``budget`` tokens after the committed sequence
   (a draft model, beams on a draft model, n-gram lookup, a feature head, ...);
2. one target forward over the unseen tail plus the drafts gives ``p_1 ..
   p_{g+1}``, filtered like every other distribution;
3. the *verifier* decides how many drafts to accept (``n``) and draws the one
   token that follows them;
4. the skeleton commits ``x_1 .. x_n`` plus that token (cut at EOS and at the
   budget), crops the target cache to the committed prefix, and tells the
   proposer what was committed so it can crop or extend its own state.

A method is a ``Proposer`` (``propose`` and ``commit``) plus a verifier: an
``AssistedDecoder`` subclass sets ``make_proposer`` and ``verify``. The budget
never lets a step overrun ``max_new_tokens``: the last steps draft fewer tokens,
because each step's extra token needs a slot.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch

from decoders import probs as P
from decoders.base import Decoder, _Progress
from decoders.params import DraftParams


@dataclass(frozen=True)
class Proposal:
    """The drafts of one iteration.

    Attributes:
        tokens: ``(g,)`` LongTensor of drafted tokens on the target's device (g may be 0).
        probs: ``(g, V)`` the distributions ``q_j`` the tokens were drawn from;
            ``None`` for a deterministic drafter, whose ``q_j`` is one-hot on ``x_j``.
        log_q: ``(g,)`` ``log q_j(x_j)`` when the verifier needs only those
            (MTAD's joint test); ``None`` otherwise.
    """

    tokens: torch.Tensor
    probs: torch.Tensor | None = None
    log_q: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])


class Proposer(abc.ABC):
    """Makes the drafts of one generation; built by ``AssistedDecoder.make_proposer``.

    Attributes:
        forwards: draft-model forward calls so far (0 for model-free drafters).
        reads_target_features: True for drafters that read the target's hidden
            states: each verification forward then returns them too and hands
            them to ``observe`` (no extra target forward).
    """

    forwards: int = 0
    reads_target_features: bool = False

    def observe(self, features: torch.Tensor, start: int) -> None:
        """The target's final hidden states ``(n, hidden)`` at positions ``start .. start + n``
        (called after each verification forward when ``reads_target_features``)."""
        return None

    @abc.abstractmethod
    def propose(self, seq: torch.Tensor, budget: int, generator: torch.Generator) -> Proposal:
        """Draft at most ``budget`` (>= 1) tokens after ``seq``.

        Args:
            seq: ``(L,)`` prompt plus committed tokens, on the target's device.
            budget: the most tokens this step may draft.
            generator: the generation's only source of randomness.
        """

    def commit(self, tokens: list[int], kept: int) -> None:
        """After an iteration: ``tokens`` were appended to the sequence (host ints).

        ``kept`` is the length of the prefix whose KV entries stay valid (the
        sequence before the newly drawn extra token): drafters with a cache crop
        it to at most this. The default does nothing.
        """
        return None

    def prepare(self, max_drafts: int) -> None:
        """Capture now every forward shape of the drafter's later iterations (drafting at most
        ``max_drafts`` tokens each); called once, after the generation's first iteration, so
        that no shape is first captured inside a measured one. The default does nothing.
        """
        return None


Verdict = tuple[torch.Tensor, torch.Tensor]  # (accepted count n, 0-dim; the token after them, 0-dim)


class AssistedDecoder(Decoder):
    """Template of a propose/verify method: subclasses give a proposer and a verifier."""

    Params: ClassVar[type[DraftParams]] = DraftParams

    @property
    def max_draft_tokens(self) -> int:
        return self.config.gamma

    @abc.abstractmethod
    def make_proposer(self, input_ids: torch.Tensor) -> Proposer:
        """The proposer of one generation of ``input_ids`` ``(1, n)``.

        Draft-model caches come from ``self._cache(model, rows)``, so they are
        reused across generations and released with them.
        """

    @abc.abstractmethod
    def verify(self, p: torch.Tensor, proposal: Proposal, generator: torch.Generator) -> Verdict:
        """Accept a prefix of ``proposal`` under ``p`` ``(g + 1, V)`` and draw the next token.

        Called only for ``g >= 1``. Returns 0-dim tensors on the device, so the
        iteration's one host synchronisation is the skeleton's read of both.
        """

    def _generate(self, input_ids: torch.Tensor, progress: _Progress, generator: torch.Generator) -> tuple[int, int]:
        target = self._cache(self.target)
        proposer = self.make_proposer(input_ids)
        seq = input_ids[0]  # prompt + committed tokens
        filters = self.config.filters
        prepared = False
        while not progress.finished:
            # 1. Draft, never past max_new_tokens: the step's extra token needs a slot.
            budget = min(self.max_draft_tokens, progress.remaining - 1)
            proposal = proposer.propose(seq, budget, generator) if budget > 0 else Proposal(seq.new_empty(0))
            g = proposal.size
            progress.timer.mark("draft")
            # 2. One target forward over the unseen tail plus the drafts: p_1 .. p_{g+1}.
            start = target.length
            tail = torch.cat([seq[start:], proposal.tokens]).view(1, -1)
            if proposer.reads_target_features:
                p, features = target.probs(tail, g + 1, filters, hidden=True)
                proposer.observe(features[0], start)
            else:
                p = target.probs(tail, g + 1, filters)
            p = p[0]
            progress.timer.mark("verify")
            # 3. Accept a prefix and draw the token after it (a plain sampling step without drafts).
            if g:
                n, extra = self.verify(p, proposal, generator)
            else:
                n, extra = torch.zeros((), dtype=torch.long, device=p.device), P.sample(p[0], generator)
            progress.timer.mark("accept")
            # 4. Commit; crop the target cache to the committed prefix, the proposer's likewise.
            seq = self._commit(progress, seq, proposal.tokens, n, extra, target, proposer)
            if not prepared:
                # Every verification shape (1 .. max_draft_tokens + 1 tokens), and every shape the
                # drafter feeds, captured after the first step (the prompt's), not when each first
                # occurs (a no-op once captured).
                target.prepare(range(1, self.max_draft_tokens + 2), filters, proposer.reads_target_features)
                proposer.prepare(self.max_draft_tokens)
                progress.timer.mark("other")  # a capture is not the next step's drafting
                prepared = True
        return target.forwards, proposer.forwards

    @staticmethod
    def _commit(progress: _Progress, seq: torch.Tensor, drafts: torch.Tensor, n: torch.Tensor, extra: torch.Tensor,
                target, proposer: Proposer) -> torch.Tensor:
        """Commit ``drafts[:n]`` plus ``extra``; return the extended sequence.

        Reading ``n`` together with the tokens is the step's one host
        synchronisation. The target cache keeps the prefix up to ``x_n``: the
        extra token is fed with the next step's drafts.
        """
        values = torch.cat([n.view(1), drafts, extra.view(1)]).tolist()
        accepted = values[0]
        new = values[1 : 1 + accepted] + values[-1:]
        progress.commit(new, drafted=drafts.shape[0], accepted=accepted)
        kept = seq.shape[0] + accepted
        target.crop(kept)
        proposer.commit(new, kept)
        return torch.cat([seq, drafts[:accepted], extra.view(1)])


class DraftModelProposer(Proposer):
    """Base of proposers that run a draft model over a KV cache of its own.

    The cache holds a prefix of the sequence; ``pending`` (what it has not
    seen) is fed at the next draft step.
    """

    def __init__(self, cache, filters: tuple[float, int, float]) -> None:
        self.cache = cache
        self.filters = filters

    @property
    def forwards(self) -> int:  # type: ignore[override]
        return self.cache.forwards

    def pending(self, seq: torch.Tensor) -> torch.Tensor:
        """The tokens of ``seq`` the draft cache has not seen."""
        return seq[self.cache.length :]

    def commit(self, tokens: list[int], kept: int) -> None:
        # The draft cache never held more than the drafts it was fed.
        self.cache.crop(min(self.cache.length, kept))

    def prepare(self, max_drafts: int) -> None:
        # After the first iteration a draft forward feeds one token, or two when the
        # whole block was accepted (the last draft, never fed, and the extra token).
        self.cache.prepare((1, 2), self.filters, keep=1)
