"""``eagle``: feature-level drafting (EAGLE, Li et al. 2024, arXiv 2401.15077), verified exactly.

The draft is not a separate model but a small head over the target's own
features: at position ``t`` it reads the target's final hidden state ``f_t``
(the input of the target's output head) together with the embedding of the
token drawn from it, ``x_{t+1}``, fused by one linear map, and runs one decoder
layer of the target's width. Its output predicts the next feature ``f_{t+1}``;
the target's output head (shared, or the rows of a token subset) turns that
into ``q`` for ``x_{t+2}``. Drafting ``gamma`` tokens is then ``gamma`` passes
of that one layer, each feeding the head's own predicted feature to the next.

The target's verification forward hands back its hidden states at every
position it was fed (``probs(..., hidden=True)``): no extra target forward. The
head keeps a KV cache of its own; entries computed from the target's true
features stay, entries computed from predicted ones (the drafts) are cropped
after each verification and recomputed from the true features the
verification produced. The verifier is exact speculative sampling, so the
output keeps the target's distribution (and equals greedy ``sampling`` at
temperature 0).

A head is trained for one target (``scripts/train_eagle.py``) and records a
probe of that target's weights; a head is refused for any other target.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, PreTrainedModel

from decoders import probs as P
from decoders.assisted import AssistedDecoder, Proposal, Proposer, Verdict
from decoders.specdecode import exact_verify

# Numbers of the target's weights a head records, to refuse other targets.
_PROBE_ROWS, _PROBE_DIMS = 16, 8
# Relative L2 distance (of the embedding part and of the norm part, each) under which a
# target counts as the one trained for: loading in bfloat16 moves either by ~2e-3.
_PROBE_TOLERANCE = 1e-2


def head_config(target: PreTrainedModel, layers: int = 1) -> LlamaConfig:
    """The config of a head for ``target``: Llama layers of the target's shape.

    Width, heads, rotary settings and vocabulary are the target's, so the head
    shares the target's embeddings and output head and uses its positions.
    """
    t = target.config.get_text_config(decoder=True)
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, head_dim=head_dim, rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings, rope_parameters=getattr(t, "rope_parameters", None),
        hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
    )


def target_probe(target: PreTrainedModel) -> torch.Tensor:
    """A few numbers of ``target``'s embeddings, then as many of its final norm (float32, on the CPU)."""
    embed = target.get_input_embeddings().weight
    rows = torch.linspace(0, embed.shape[0] - 1, _PROBE_ROWS).long().to(embed.device)
    norm = target.model.norm.weight
    return torch.cat([embed[rows, :_PROBE_DIMS].flatten(), norm[: _PROBE_ROWS * _PROBE_DIMS]]).detach().float().cpu()


class EagleModel(LlamaModel):
    """A Llama stack fed ``fc(cat(embedding of x_{t+1}, feature f_t))`` instead of embeddings."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=True)

    def fuse_inputs(self, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The layer input from token embeddings and features ``(..., hidden)`` each."""
        return self.fc(torch.cat([embeds, features.to(embeds.dtype)], dim=-1))

    def forward(self, input_ids: torch.Tensor | None = None, features: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs):
        if features is not None:
            inputs_embeds, input_ids = self.fuse_inputs(self.embed_tokens(input_ids), features), None
        elif input_ids is not None:  # the layer was trained on fused inputs, never on bare embeddings
            raise ValueError("an EAGLE head needs the target's features with its tokens (features=...)")
        return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)


class EagleHead(LlamaForCausalLM):
    """The draft head: ``EagleModel`` plus the target's output head (or a token subset of it).

    Its final norm maps the layer's output into the space of the target's
    features (which are normed hidden states), so a predicted feature can be fed
    back in place of a true one. Build with ``harness.eagle_head.load_eagle_head``
    (sharing a loaded target's tensors) or ``EagleHead.for_target``.

    Attributes:
        target_probe: ``target_probe()`` of the target it was trained for.
        target_name: how that target was named when the head was trained.
    """

    #: Its forward needs the target's features: other decoders refuse it (``Decoder.drafts_from_features``).
    reads_target_features = True

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.model = EagleModel(config)
        self.target_probe: torch.Tensor | None = None
        self.target_name = "its target"
        self.target_layers: int | None = None  # the layer count of the target it was trained for
        self._accepted_targets: weakref.WeakSet = weakref.WeakSet()

    @classmethod
    def build(cls, target: PreTrainedModel, config: LlamaConfig | None = None) -> EagleHead:
        """A head for ``target`` sharing its embeddings and output head; its own tensors
        (layers, norm, fc) are allocated but not initialised (a loader fills them)."""
        config = config or head_config(target)
        embed = target.get_input_embeddings()
        device, dtype = embed.weight.device, embed.weight.dtype
        with torch.device("meta"):  # the vocabulary-sized modules are never allocated
            head = cls(config)
        head.model.embed_tokens = embed
        head.lm_head = target.get_output_embeddings()
        for module in head.own_modules():
            module.to_empty(device=device).to(dtype)
        head.model.rotary_emb = type(head.model.rotary_emb)(config).to(device)  # buffers stay float32
        head.target_probe = target_probe(target)
        head.target_layers = target.config.get_text_config(decoder=True).num_hidden_layers
        return head.eval()

    @classmethod
    def for_target(cls, target: PreTrainedModel, layers: int = 1, seed: int = 0) -> EagleHead:
        """A freshly initialised head for ``target`` (what training starts from)."""
        head = cls.build(target, head_config(target, layers))
        generator = torch.Generator(device="cpu").manual_seed(seed)
        for module in head.own_modules():
            for name, tensor in module.named_parameters():
                if name.endswith("bias"):
                    init = torch.zeros(tensor.shape)
                elif tensor.dim() == 1:  # norm weights
                    init = torch.ones(tensor.shape)
                else:
                    init = torch.randn(tensor.shape, generator=generator) * head.config.initializer_range
                with torch.no_grad():
                    tensor.copy_(init)
        return head

    def own_modules(self) -> list[nn.Module]:
        """What the head holds of its own: everything but the target's embeddings and head."""
        return [self.model.layers, self.model.norm, self.model.fc]

    def check_target(self, target: PreTrainedModel) -> None:
        """Raise ``ValueError`` unless ``target`` is the model this head was trained for.

        Checked once per target (it reads the target's weights back to the host).
        """
        if target in self._accepted_targets:
            return
        t = target.config.get_text_config(decoder=True)
        # A model distilled from the target can share its embeddings and most of its
        # norm: the layer count tells those apart.
        shape = (t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads, t.vocab_size,
                 t.num_hidden_layers if self.target_layers is not None else None)
        mine = (self.config.hidden_size, self.config.intermediate_size, self.config.num_attention_heads,
                self.config.num_key_value_heads, self.config.vocab_size, self.target_layers)
        why = None
        if shape != mine:
            why = f"(hidden, MLP width, heads, kv heads, vocabulary, layers) {shape} against {mine}"
        elif self.target_probe is not None:
            # On the host, in numpy: a one-off check that adds no operator to a decode's trace.
            probe, trained = target_probe(target).numpy(), self.target_probe.numpy()
            half = trained.shape[0] // 2  # embeddings, then the norm: each judged on its own scale
            distance = max(float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-12))
                           for a, b in ((probe[:half], trained[:half]), (probe[half:], trained[half:])))
            if distance > _PROBE_TOLERANCE:
                why = f"its weights differ (relative distance {distance:.3f} of a probe of its embeddings and norm)"
        if why is not None:
            raise ValueError(f"this EAGLE head was trained for {self.target_name}, not for the given target "
                             f"{type(target).__name__}: {why}; train one for this target with "
                             "scripts/train_eagle.py")
        self._accepted_targets.add(target)


class FeatureProposer(Proposer):
    """Drafts a chain from the target's features with an ``EagleHead`` over its own cache.

    The skeleton hands over the target's hidden states after each verification
    (``observe``); ``known`` positions of the sequence have true features (all
    but the last token, which the verification drew).
    """

    reads_target_features = True

    def __init__(self, cache, filters: tuple[float, int, float], max_length: int) -> None:
        self.cache = cache
        self.filters = filters
        self.max_length = max_length
        self.features: torch.Tensor | None = None  # (max_length, hidden): the target's, by position
        self.known = 0

    @property
    def forwards(self) -> int:  # type: ignore[override]
        return self.cache.forwards

    def observe(self, features: torch.Tensor, start: int) -> None:
        """The target's features ``(n, hidden)`` at positions ``start .. start + n``."""
        if self.features is None:
            self.features = features.new_empty(self.max_length, features.shape[-1])
        self.features[start : start + features.shape[0]] = features

    def propose(self, seq: torch.Tensor, budget: int, generator: torch.Generator) -> Proposal:
        if self.known == 0:  # before the target's first forward there is no feature to draft from
            return Proposal(seq.new_empty(0))
        # Head entry t reads (f_t, x_{t+1}): the entries not cached yet, from true features.
        start = self.cache.length
        features, tokens = self.features[start : self.known], seq[start + 1 : self.known + 1]
        drafts, q = [], []
        for _ in range(budget):
            q_all, hidden = self.cache.probs(tokens.view(1, -1), 1, self.filters, features=features.unsqueeze(0),
                                             hidden=True)
            q_j = q_all[0, -1]
            x_j = P.sample(q_j, generator)
            drafts.append(x_j)
            q.append(q_j)
            # The head's predicted feature stands in for the target's at the next position.
            features, tokens = hidden[0, -1:], x_j.view(1)
        return Proposal(torch.stack(drafts), probs=torch.stack(q))

    def prepare(self, max_drafts: int) -> None:
        # A propose first feeds the entries since the last one from true features: one per
        # token the verification committed (1 .. max_drafts + 1), then one per further draft.
        self.cache.prepare(range(1, max_drafts + 2), self.filters, hidden=True, keep=1,
                           feature_size=self.cache.model.config.hidden_size)

    def commit(self, tokens: list[int], kept: int) -> None:
        # Entries from predicted features are dropped; the verification just gave the
        # true features up to ``kept``, from which the next propose recomputes them.
        self.cache.crop(min(self.cache.length, self.known))
        self.known = kept


class EagleDecoder(AssistedDecoder):
    """A chain of ``gamma`` tokens from an ``EagleHead``, verified by exact speculative sampling."""

    name = "eagle"
    needs_draft = True
    drafts_from_features = True

    def __init__(self, target: PreTrainedModel, draft: PreTrainedModel | None = None, **params: object) -> None:
        super().__init__(target, draft, **params)
        if not isinstance(draft, EagleHead):
            raise ValueError(f"decoder 'eagle' needs an EAGLE head as its draft (for example "
                             f"builtin:smollm2-135m-eagle), got a {type(draft).__name__}")
        draft.check_target(target)

    def make_proposer(self, input_ids: torch.Tensor) -> FeatureProposer:
        return FeatureProposer(self._cache(self.draft), self.config.filters, self._max_length)

    def verify(self, p: torch.Tensor, proposal: Proposal, generator: torch.Generator) -> Verdict:
        return exact_verify(p, proposal, generator)
