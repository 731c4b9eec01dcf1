"""A model plus its KV cache: the only way decoders call a model.

Wrapping transformers' ``DynamicCache`` in one small class keeps the cache
bookkeeping (crop on rejection, beam reorder) in one place and counts forwards.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, PreTrainedModel

from decoders.probs import filtered_probs


def device_of(model: PreTrainedModel) -> torch.device:
    """Device of the model's input embeddings (where input ids must live)."""
    return model.get_input_embeddings().weight.device


def cache_kwarg(model: PreTrainedModel) -> str:
    """Name of the keyword that takes the KV cache in ``model.forward``.

    transformers renamed ``past_key_values`` to ``cache`` in late 5.x; using
    whichever this model's forward takes keeps old and new releases working.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def vocab_size(model: PreTrainedModel) -> int:
    """Width of the model's logits (the output head), which is what must match."""
    head = model.get_output_embeddings()
    if head is not None:
        # out_features: nn.Linear, and heads over a token subset (which still emit full-width logits)
        width = getattr(head, "out_features", None)
        if width is None and getattr(head, "weight", None) is not None:
            width = head.weight.shape[0]
        if width is not None:
            return int(width)
    return int(model.config.vocab_size)



def check_same_vocabulary(target: PreTrainedModel, draft: PreTrainedModel, target_name: str = "target",
                          draft_name: str = "draft") -> None:
    """Raise ``ValueError`` unless ``draft`` emits logits over the target's vocabulary.

    The one check of it: ``get_decoder`` and the model loader both call it
    (the loader with the specs the user gave, as names).
    """
    t_vocab, d_vocab = vocab_size(target), vocab_size(draft)
    if t_vocab != d_vocab:
        raise ValueError(
            f"{draft_name} vocabulary size {d_vocab} differs from {target_name} vocabulary size {t_vocab} "
            f"(the target has {t_vocab} tokens); a draft must share the target's tokenizer"
        )


def model_outputs(model: PreTrainedModel, tokens: torch.Tensor, keep: int, features: torch.Tensor | None = None,
                  hidden: bool = False, **kwargs):
    """The last ``keep`` logits of ``model`` on ``tokens``, or ``(logits, hidden states)``.

    Hidden states, or a ``features`` input, need the model's inner stack and its
    head called apart (the causal-LM forward returns neither); ``kwargs`` go to
    whichever runs (cache, mask, positions).
    """
    if features is None and not hidden:
        return model(input_ids=tokens, logits_to_keep=keep, **kwargs).logits[:, -keep:]
    extra = {} if features is None else {"features": features}
    states = model.model(input_ids=tokens, **extra, **kwargs).last_hidden_state
    logits = model.get_output_embeddings()(states[:, -keep:])
    return (logits, states) if hidden else logits


class CachedModel:
    """A causal LM with a reusable KV cache holding a prefix of the sequence.

    The cache always holds the first ``length`` tokens that were fed; callers feed
    only the tokens after that, so no forward ever re-reads the whole prefix.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.device = device_of(model)
        self.cache = DynamicCache(config=model.config)
        self.forwards = 0
        self._cache_kwarg = cache_kwarg(model)

    @property
    def length(self) -> int:
        """Number of tokens currently held in the cache."""
        return self.cache.get_seq_length()

    def __call__(self, tokens: torch.Tensor, keep: int | None = None, features: torch.Tensor | None = None,
                 hidden: bool = False):
        """Feed ``tokens`` of shape ``(batch, n)`` after the cached prefix.

        Args:
            tokens: LongTensor ``(batch, n)``; every row continues its cached row.
            keep: return logits for the last ``keep`` positions only (all if None);
                skipping the head on a long prompt saves memory and time.
            features: ``(batch, n, hidden)`` a second input per position, for models
                whose forward takes ``features`` (a feature-level draft head).
            hidden: also return the final (normed) hidden states of all ``n``
                positions: the features a feature-level draft reads.

        Returns:
            float32 logits of shape ``(batch, keep or n, vocab)``, on the device of
            the model's input embeddings (a model split over GPUs computes its
            head on the last one; decoders work where the inputs live); with
            ``hidden``, the pair ``(logits, hidden states (batch, n, hidden))``.
        """
        n_keep = tokens.shape[1] if keep is None else keep
        kwargs = {self._cache_kwarg: self.cache}
        out = model_outputs(self.model, tokens, n_keep, features, hidden, use_cache=True, **kwargs)
        self.forwards += 1
        if hidden:
            return out[0].to(self.device).float(), out[1].to(self.device)
        return out.to(self.device).float()

    def probs(self, tokens: torch.Tensor, keep: int, filters: tuple[float, int, float],
              features: torch.Tensor | None = None, hidden: bool = False):
        """``probs.filtered_probs(self(tokens, keep), *filters)``: the filtered next-token
        distributions ``(batch, keep, V)`` (the fast path computes them in its graph);
        with ``hidden``, the pair ``(probs, hidden states)``."""
        if hidden:
            logits, states = self(tokens, keep, features, hidden=True)
            return filtered_probs(logits, *filters), states
        return filtered_probs(self(tokens, keep, features), *filters)

    def prepare(self, sizes, filters: tuple[float, int, float] | None = None, hidden: bool = False,
                keep: int | None = None, feature_size: int = 0) -> None:
        """Nothing to warm up: this cache captures no graphs (``static.StaticCachedModel.prepare``)."""

    def crop(self, length: int) -> None:
        """Drop cached positions from ``length`` on (rejected draft tokens)."""
        extra = self.length - length
        if extra < 0:
            raise ValueError(f"cannot crop a cache of {self.length} tokens to {length}")
        # A negative argument means "remove this many" in every transformers 5.x
        # release, while a positive one changed meaning; crop(0) would empty it.
        if extra:
            self.cache.crop(-extra)

    def repeat(self, times: int) -> None:
        """Repeat each cached row ``times`` times (one row per beam)."""
        self.cache.batch_repeat_interleave(times)

    def select(self, rows: torch.Tensor) -> None:
        """Keep cache rows ``rows`` in that order (beam reorder or selection)."""
        self.cache.reorder_cache(rows)
