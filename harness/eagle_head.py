"""EAGLE draft heads on disk, and the unrolled forward that trains them.

A head folder (written by ``save_eagle_head``, read by ``load_eagle_head``) holds
only what is not the target's:

- ``config.json``: the head's Llama config (one layer of the target's shape);
- ``eagle.json``: format, the name of the target it was trained for, its size;
- ``head.safetensors``: the layer, the final norm and the input fusion ``fc``
  (bfloat16), a probe of the target's weights (``decoders.eagle.target_probe``)
  and, when the head scores a token subset, that subset's ids.

The embeddings are the loaded target's own tensor; the output head is the
target's own module, or a ``SubsetHead`` over rows of it (the tokens that carry
nearly all of the target's output; it makes a draft step a few times cheaper on
a small model, whose output head is a fifth of its weights).

``unrolled_states`` is the training forward: it runs ``depth`` drafting steps
at every position of a sequence at once, each step reading the head's own
predicted features of the step before ("training-time test", EAGLE-3), with
the attention each drafted position has at inference time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, PreTrainedModel

from decoders.eagle import EagleHead
from decoders.fused import _rotate
from harness.composed_draft import SubsetHead

FORMAT = "eagle-head/1"
FILES = ("config.json", "eagle.json", "head.safetensors")


def is_eagle_head(folder: str | Path) -> bool:
    """Whether ``folder`` holds a head written by ``save_eagle_head``."""
    return (Path(folder) / "eagle.json").is_file()


def save_eagle_head(folder: str | Path, head: EagleHead, target_name: str, extra: dict | None = None) -> int:
    """Write ``head``'s own weights to ``folder``; returns the bytes of ``head.safetensors``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for prefix, module in zip(("layers", "norm", "fc"), head.own_modules(), strict=True):
        for name, value in module.state_dict().items():
            tensors[f"{prefix}.{name}"] = value.detach().to("cpu", torch.bfloat16).contiguous()
    tensors["target_probe"] = head.target_probe.float().contiguous()
    subset = isinstance(head.lm_head, SubsetHead)
    if subset:
        tensors["head_tokens"] = head.lm_head.index.to("cpu", torch.int32).contiguous()
    save_file(tensors, folder / "head.safetensors")
    config = head.config.to_dict()
    config.update(dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    meta = {"format": FORMAT, "target": target_name, "target_layers": head.target_layers,
            "layers": head.config.num_hidden_layers,
            "head_tokens": int(head.lm_head.index.numel()) if subset else None, **(extra or {})}
    (folder / "eagle.json").write_text(json.dumps(meta, indent=2) + "\n")
    return (folder / "head.safetensors").stat().st_size


def load_eagle_head(folder: str | Path, target: PreTrainedModel) -> EagleHead:
    """The head in ``folder`` on ``target`` (sharing its tensors), on its device and dtype.

    Raises:
        FileNotFoundError: the folder holds no head.
        ValueError: another format, or a head trained for another target.
    """
    folder = Path(folder)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} holds no EAGLE head (missing {', '.join(missing)})")
    meta = json.loads((folder / "eagle.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder}/eagle.json has format {meta.get('format')!r}; this version reads {FORMAT!r}")
    config = LlamaConfig(**json.loads((folder / "config.json").read_text()))
    stored = load_file(folder / "head.safetensors")
    probe = stored.pop("target_probe")
    head_tokens = stored.pop("head_tokens", None)
    head = EagleHead.build(target, config)
    head.target_probe, head.target_name = probe, meta.get("target") or "another target"
    head.target_layers = meta.get("target_layers")
    head.check_target(target)  # before anything else can fail on a shape
    device, dtype = target.get_input_embeddings().weight.device, target.get_input_embeddings().weight.dtype
    for prefix, module in zip(("layers", "norm", "fc"), head.own_modules(), strict=True):
        state = {k[len(prefix) + 1 :]: v.to(device, dtype) for k, v in stored.items() if k.startswith(prefix + ".")}
        module.load_state_dict(state, strict=True)
    if head_tokens is not None:
        index = head_tokens.long().to(device)
        head.lm_head = SubsetHead(target.get_output_embeddings().weight.detach()[index].clone(), index,
                                  config.vocab_size)
    return head.eval()


def unrolled_states(head: EagleHead, ids: torch.Tensor, features: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """The head's predicted features after ``1 .. depth`` drafting steps, at every position.

    Args:
        ids: ``(B, T)`` token ids.
        features: ``(B, T, hidden)`` the target's features of ``ids``.
        depth: drafting steps to unroll.

    Returns:
        ``depth`` tensors ``(B, T - 1, hidden)``. Entry ``t`` of step ``d`` is what
        the head outputs at position ``t`` when the target's features are known
        up to position ``t - d + 1`` and the steps after read the head's own:
        it predicts the feature at ``t + 1`` (and so the token at ``t + 2``), and
        is defined for ``t >= d - 1``. Step ``d`` at position ``t`` reads token
        ``x_{t+1}`` (teacher forcing) with step ``d - 1``'s output at ``t - 1``,
        and attends where inference attends: to step-1 entries up to ``t - d + 1``
        and to the entry of step ``k`` at ``t - d + k`` for ``k = 2 .. d``.
    """
    if head.config.num_hidden_layers != 1:
        raise ValueError("unrolled_states trains one-layer heads")
    inner, layer = head.model, head.model.layers[0]
    attn = layer.self_attn
    b, t_len = ids.shape
    n = t_len - 1
    heads, kv_heads = head.config.num_attention_heads, head.config.num_key_value_heads
    head_dim = head.config.head_dim
    embeds = inner.embed_tokens(ids[:, 1:])  # x_{t+1} for entry t
    cos, sin = inner.rotary_emb(embeds, torch.arange(n, device=ids.device).view(1, -1))
    cos, sin = cos[0].to(embeds.dtype), sin[0].to(embeds.dtype)
    t = torch.arange(n, device=ids.device).view(-1, 1)
    s = torch.arange(n, device=ids.device).view(1, -1)
    keys, values, outputs = [], [], []
    previous = features[:, :n]
    for d in range(1, depth + 1):
        x = inner.fuse_inputs(embeds, previous)
        h = layer.input_layernorm(x)
        q = _rotate(attn.q_proj(h).view(b, n, heads, head_dim).transpose(1, 2), cos, sin)
        keys.append(_rotate(attn.k_proj(h).view(b, n, kv_heads, head_dim).transpose(1, 2), cos, sin))
        values.append(attn.v_proj(h).view(b, n, kv_heads, head_dim).transpose(1, 2))
        blocks = [s <= t - d + 1] + [s == t - d + k for k in range(2, d + 1)]
        mask = torch.cat(blocks, dim=1)  # (n, d * n): every row allows at least its own entry
        out = F.scaled_dot_product_attention(q, torch.cat(keys, 2), torch.cat(values, 2), attn_mask=mask,
                                             enable_gqa=True)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(b, n, heads * head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        state = inner.norm(x)
        outputs.append(state)
        # Step d + 1 at t reads step d's output at t - 1 (position 0 has none: masked by the caller).
        previous = torch.cat([state.new_zeros(b, 1, state.shape[-1]), state[:, :-1]], dim=1)
    return outputs


# Later drafting steps weigh less: their tokens are accepted only after the earlier ones.
STEP_DECAY = 0.8


def training_loss(target: PreTrainedModel, head: EagleHead, ids: torch.Tensor, positions: torch.Tensor, depth: int,
                  feature_weight: float, subset: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of one batch and, per drafting step, the mean acceptance ``sum(min(p, q))``
    (a ``(depth,)`` tensor, left on the device: reading it every step would stall the GPU).

    Args:
        ids: ``(B, T)`` right-padded sequences.
        positions: flat indices into ``(B, T)`` of the positions whose next token
            is generated (those the loss counts).
        subset: the token ids of the head's ``SubsetHead``, or None for a full head.

    Per step ``d``: cross-entropy of the head's distribution against the
    target's (over the head's tokens) at the generated positions, plus
    ``feature_weight`` x smooth-L1 between predicted and true next feature,
    weighted ``STEP_DECAY ** (d - 1)``.
    """
    width = ids.shape[1]
    with torch.no_grad():
        features = target.model(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, hidden)
        flat = features.flatten(0, 1)
    # Head entry t (a (B, T - 1) grid) is judged by the target's distribution at t + 1.
    keep = positions % width >= 1
    target_at = positions[keep]
    head_at = (target_at // width) * (width - 1) + target_at % width - 1
    with torch.no_grad():
        true_next = flat.index_select(0, target_at)
        p = F.softmax(target.get_output_embeddings()(true_next).float(), -1)
        if subset is not None:
            p = p.index_select(-1, subset)
    states = unrolled_states(head, ids, features, depth)
    column = head_at % (width - 1)
    loss, alphas = features.new_zeros((), dtype=torch.float32), []
    for d, state in enumerate(states, start=1):
        valid = column >= d - 1  # entries with a step-d output
        s = state.flatten(0, 1).index_select(0, head_at[valid])
        logits = head.lm_head.subset_logits(s) if subset is not None else head.lm_head(s)
        log_q = F.log_softmax(logits.float(), -1)
        ce = -(p[valid] * log_q).sum(-1).mean()
        reg = F.smooth_l1_loss(s.float(), true_next[valid].float())
        loss = loss + STEP_DECAY ** (d - 1) * (ce + feature_weight * reg)
        alphas.append(torch.minimum(p[valid], log_q.detach().exp()).sum(-1).mean())
    return loss, torch.stack(alphas)
