"""Drafts stored as a small difference from their base (target) model.

A composed draft is a Llama-style model whose layer ``i`` starts from layer
``base_layers[i]`` of its base model during distillation. Only what is not the
base's own is stored (``draft.safetensors``, plus ``config.json`` and
``compose.json``):

- per layer, the change of each linear map's weight from the base layer it
  started from, quantised to 4 bits (symmetric, one float16 scale per group of
  ``group`` weights along the input dimension). Deltas are smaller than the
  weights, so 4 bits of a delta lose far less than 4 bits of a weight would;
- the layers' norms and the final norm, whole (they are tiny);
- ``head_tokens``: the token ids the draft can propose. Its output head scores
  only those (rows of the base's head) and gives every other token ``-inf``, so
  the logits still span the base's vocabulary, as the decoders require. A head
  over the few thousand tokens that carry nearly all of a chat model's output
  costs a sixth of the full one; the saving pays for more layers.

Embeddings are the base's own tensor, shared in memory. ``save_composed_draft``
writes a trained draft; ``compose_draft`` rebuilds it from a loaded base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

FORMAT = "composed-draft/1"
LINEAR_MAPS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
FILES = ("config.json", "compose.json", "draft.safetensors")


class SubsetHead(nn.Module):
    """An output head that scores ``index`` tokens and gives the rest ``-inf``.

    ``out_features`` is the full vocabulary size: the logits have the base's
    width, so a draft with this head pairs with its target like any other.
    """

    def __init__(self, weight: torch.Tensor, index: torch.Tensor, vocab_size: int):
        super().__init__()
        if weight.shape[0] != index.shape[0]:
            raise ValueError(f"{weight.shape[0]} head rows for {index.shape[0]} token ids")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= vocab_size):
            raise ValueError(f"head token ids must lie in [0, {vocab_size})")
        self.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
        self.register_buffer("index", index.long(), persistent=False)
        self.out_features = vocab_size

    def subset_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the ``index`` tokens only, ``(..., len(index))`` (what training needs)."""
        return F.linear(hidden, self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        scores = self.subset_logits(hidden)
        out = scores.new_full((*scores.shape[:-1], self.out_features), float("-inf"))
        return out.index_copy_(-1, self.index, scores)

    def extra_repr(self) -> str:
        return f"tokens={self.index.numel()}, out_features={self.out_features}"


def quantize_int4(delta: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 4-bit quantisation of a 2-D tensor in groups along its last dim.

    Returns ``(packed uint8 (rows, cols / 2), float16 scales (rows, cols / group))``.
    """
    rows, cols = delta.shape
    if cols % group or group % 2:
        raise ValueError(f"the input dimension {cols} must be a multiple of the (even) group size {group}")
    grouped = delta.float().reshape(rows, cols // group, group)
    scale = (grouped.abs().amax(-1, keepdim=True) / 7).to(torch.float16)
    safe = scale.float().clamp_min(torch.finfo(torch.float16).tiny)
    q = (grouped / safe).round().clamp(-8, 7).to(torch.int16).reshape(rows, cols) + 8
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    return packed, scale.squeeze(-1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of ``quantize_int4`` (float32)."""
    rows, half = packed.shape
    group = 2 * half // scale.shape[1]
    q = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(rows, 2 * half).float() - 8
    return (q.reshape(rows, -1, group) * scale.float().unsqueeze(-1)).reshape(rows, 2 * half)


def _layer_key(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}.weight"


def save_composed_draft(
    folder: str | Path, draft: LlamaForCausalLM, base: PreTrainedModel, base_layers: list[int],
    head_tokens: torch.Tensor, group: int = 64,
) -> dict[str, float]:
    """Write ``draft`` as deltas from ``base`` (see the module docstring).

    ``draft`` is a plain ``LlamaForCausalLM`` whose head is ignored (the stored
    head is ``head_tokens``' rows of the base's). Returns the relative error the
    4-bit deltas leave in the weights: ``||W - W_stored|| / ||W||`` averaged.
    """
    if len(base_layers) != draft.config.num_hidden_layers:
        raise ValueError(f"{len(base_layers)} base layers for a draft of {draft.config.num_hidden_layers}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu() for k, v in draft.state_dict().items()}
    base_state = base.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    errors = []
    for i, src in enumerate(base_layers):
        for name in LINEAR_MAPS:
            w = state[_layer_key(i, name)]
            w0 = base_state[_layer_key(src, name)].detach().float().cpu()
            packed, scale = quantize_int4(w - w0, group)
            tensors[f"{_layer_key(i, name)}.delta_q4"] = packed
            tensors[f"{_layer_key(i, name)}.delta_scale"] = scale
            errors.append(float((w0 + dequantize_int4(packed, scale) - w).norm() / w.norm()))
        for name in NORMS:
            tensors[_layer_key(i, name)] = state[_layer_key(i, name)].to(torch.bfloat16)
    tensors["model.norm.weight"] = state["model.norm.weight"].to(torch.bfloat16)
    tensors["head_tokens"] = head_tokens.to(torch.int32).cpu()
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "draft.safetensors")
    config = draft.config.to_dict()
    config.pop("quantization_config", None)
    config.update(tie_word_embeddings=False, dtype="float32")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    meta = {"format": FORMAT, "base_layers": list(base_layers), "delta_bits": 4, "delta_group": group,
            "head_tokens": int(head_tokens.numel())}
    (folder / "compose.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {"delta_relative_error": sum(errors) / len(errors)}


def compose_draft(folder: str | Path, base: PreTrainedModel) -> LlamaForCausalLM:
    """Rebuild a draft saved by ``save_composed_draft`` on top of a loaded ``base``.

    The draft lands on the device and in the dtype of the base's embeddings,
    which it shares; the sums ``base layer + delta`` are formed in float32.
    """
    folder = Path(folder)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} holds no draft (missing {', '.join(missing)})")
    meta = json.loads((folder / "compose.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder}/compose.json has format {meta.get('format')!r}; this version reads {FORMAT!r}")
    config = LlamaConfig(**json.loads((folder / "config.json").read_text()))
    embed = base.get_input_embeddings().weight
    base_head = base.get_output_embeddings()
    if base_head is None or config.hidden_size != embed.shape[1]:
        raise ValueError(f"{folder} was not distilled from this base model (hidden size or head differs)")
    stored = load_file(folder / "draft.safetensors")
    base_state = base.state_dict()
    if max(meta["base_layers"]) >= base.config.num_hidden_layers:
        raise ValueError(f"{folder} builds on layer {max(meta['base_layers'])}, but the base has "
                         f"{base.config.num_hidden_layers} layers")
    state = {}
    for i, src in enumerate(meta["base_layers"]):
        for name in LINEAR_MAPS:
            key = _layer_key(i, name)
            delta = dequantize_int4(stored[f"{key}.delta_q4"], stored[f"{key}.delta_scale"])
            # The base may be split over GPUs (device_map): the draft lives with its embeddings.
            state[key] = base_state[_layer_key(src, name)].to(embed.device, torch.float32) + delta.to(embed.device)
        for name in NORMS:
            state[_layer_key(i, name)] = stored[_layer_key(i, name)]
    state["model.norm.weight"] = stored["model.norm.weight"]
    state = {k: v.to(embed.device, embed.dtype) for k, v in state.items()}
    state["model.embed_tokens.weight"] = embed  # shared, not copied
    with torch.random.fork_rng(devices=[]):  # the throwaway init must not move the caller's RNG
        draft = LlamaForCausalLM(config)
    result = draft.load_state_dict(state, assign=True, strict=False)
    missing = sorted(set(result.missing_keys) - {"lm_head.weight"})
    if missing or result.unexpected_keys:
        raise ValueError(f"{folder}/config.json does not match its weights: missing {missing}, "
                         f"unexpected {result.unexpected_keys}")
    index = stored["head_tokens"].long().to(embed.device)
    draft.lm_head = SubsetHead(base_head.weight.detach()[index].clone(), index, config.vocab_size)
    return draft.to(device=embed.device, dtype=embed.dtype).eval()
