"""A compact decode forward for Llama-family models (Llama, SmolLM2, Qwen2, Mistral).

Why: with CUDA graphs the host is out of the way, and what is left of a small
model's decode step is its kernel count. transformers' Llama layer runs about 40
kernels (separate q/k/v and gate/up matmuls, a rotary embedding of half a dozen
elementwise ops, the static cache's bookkeeping, mask handling), each a few
microseconds however small its work; a 30-layer model then costs about 3.5 ms a
step where its bytes would need 0.06 (SmolLM2-135M) to 0.8 ms (Qwen2.5-1.5B).
This forward computes the same function with the fewest kernels plain PyTorch
gives: one matmul for q, k and v together and one for gate and up (the weights
concatenated once), rotary tables computed once per cache, grouped-query
attention without repeating the keys, and one K and one V tensor for all layers
(so a beam reorder is two copies). ``torch.compile`` of one layer
(``compiled_layer``) then fuses the elementwise rest; compiling a layer rather
than the model takes seconds, not minutes, because every layer reuses it.

It reads the model's own parameters: the concatenated projections are the only
copies, made once per model and dropped with it; where the device has no room
for them (``room_for_copies``), the model's own forward runs instead.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from decoders import decode_kernels

# Architectures whose decoder layer is exactly: RMSNorm, attention (rotary,
# optional q/k/v bias), residual, RMSNorm, SiLU-gated MLP, residual.
_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM",
                  "EagleHead")  # decoders.eagle: Llama layers fed fused token and feature inputs
# Rotary variants whose tables depend only on the position (not on the sequence
# length seen so far, as "dynamic" and "longrope" do).
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def supports(model: PreTrainedModel) -> bool:
    """True when ``model``'s forward is the one this module computes."""
    config = model.config
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    return (
        type(model).__name__ in _ARCHITECTURES
        and getattr(config, "hidden_act", None) == "silu"
        and rope in _STATIC_ROPE
        and not getattr(config, "pretraining_tp", 1) > 1
        and hasattr(model, "model") and hasattr(model.model, "rotary_emb")
    )


class _Weights:
    """The model's parameters arranged for this forward: per layer, the flat tensor
    arguments of ``decoder_layer`` (shared with the model, except concatenations)."""

    def __init__(self, model: PreTrainedModel) -> None:
        inner = model.model
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv_w, qkv_b = _concatenate([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up_w, gate_up_b = _concatenate([mlp.gate_proj, mlp.up_proj])
            self.layers.append((layer.input_layernorm.weight, qkv_w, qkv_b, attn.o_proj.weight, attn.o_proj.bias,
                                layer.post_attention_layernorm.weight, gate_up_w, gate_up_b,
                                mlp.down_proj.weight, mlp.down_proj.bias))
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        # How a model that takes a second input per position (features) forms its layer input.
        self.fuse = getattr(inner, "fuse_inputs", None)
        # The head as the model's own module: a draft's may be more than a Linear
        # (a head over a token subset that scatters to the full vocabulary).
        self.head = model.get_output_embeddings()
        self._sources = identity(model)

    def current(self, model: PreTrainedModel) -> bool:
        """False once the model's parameters were replaced (``.to(dtype)``) or
        changed in place (``load_state_dict``, training): the copies are stale."""
        return self._sources == identity(model)


def identity(model: PreTrainedModel) -> list[tuple[int, int]]:
    """Storage address and in-place version counter of every parameter (inference
    tensors have no counter: they cannot change outside inference mode)."""
    return [(p.data_ptr(), 0 if p.is_inference() else p._version) for p in model.parameters()]


def _concatenate(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linear maps of the same input: one matmul."""
    weight = torch.cat([lin.weight for lin in linears])
    if all(lin.bias is None for lin in linears):
        return weight, None
    return weight, torch.cat([lin.weight.new_zeros(lin.weight.shape[0]) if lin.bias is None else lin.bias
                              for lin in linears])


def room_for_copies(model: PreTrainedModel) -> bool:
    """Whether the concatenated projections (about the size of the layers) fit beside the
    model; True once they exist, so every cache of a model takes the same path."""
    device = next(model.parameters()).device
    current = _WEIGHTS.get(model)
    if device.type != "cuda" or (current is not None and current.current(model)):
        return True
    free, _ = torch.cuda.mem_get_info(device)
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
    return free > 1.5 * layer_bytes


_WEIGHTS: weakref.WeakKeyDictionary[PreTrainedModel, _Weights] = weakref.WeakKeyDictionary()


def weights_of(model: PreTrainedModel) -> _Weights:
    weights = _WEIGHTS.get(model)
    if weights is None or not weights.current(model):
        weights = _WEIGHTS[model] = _Weights(model)
    return weights


def decoder_layer(x, cos, sin, mask, keys, values, positions, ln1, qkv_w, qkv_b, o_w, o_b, ln2, gate_up_w,
                  gate_up_b, down_w, down_b, *, heads: int, kv_heads: int, eps: float, regions=None):
    """One decoder layer on ``x`` ``(rows, n, hidden)``; writes this layer's K/V at ``positions``.

    ``keys``/``values`` ``(rows, kv_heads, max_length, head_dim)``; ``mask``
    ``(groups * n, max_length)`` float32, the additive mask repeated for each
    query head of a group. Only tensors and constants as arguments, so one
    compilation serves every layer of a model (and every model of its shape).
    ``regions`` are the three parts below, compiled (``compiled_layer``) or not.
    """
    attention, mlp_up, mlp_down = regions or (attention_block, mlp_in, mlp_out)
    x, h = attention(x, cos, sin, mask, keys, values, positions, ln1, qkv_w, qkv_b, o_w, o_b, ln2,
                     heads=heads, kv_heads=kv_heads, eps=eps)
    return mlp_down(x, mlp_up(h, gate_up_w, gate_up_b), down_w, down_b)


def attention_block(x, cos, sin, mask, keys, values, positions, ln1, qkv_w, qkv_b, o_w, o_b, ln2, *,
                    heads: int, kv_heads: int, eps: float):
    """Attention with its residual; returns ``x`` and the MLP's normed input."""
    rows, n, _ = x.shape
    head_dim = keys.shape[-1]
    q, k, v = F.linear(_rms_norm(x, ln1, eps), qkv_w, qkv_b).split(
        [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = _rotate(q.view(rows, n, heads, head_dim).transpose(1, 2), cos, sin)
    keys.index_copy_(2, positions, _rotate(k.view(rows, n, kv_heads, head_dim).transpose(1, 2), cos, sin))
    values.index_copy_(2, positions, v.view(rows, n, kv_heads, head_dim).transpose(1, 2))
    # Grouped-query attention with the heads of a group stacked as queries: no
    # copy of the keys per head; softmax in float32 as transformers does.
    q = q.reshape(rows, kv_heads, (heads // kv_heads) * n, head_dim)
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * head_dim**-0.5 + mask
    attn = torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), values)
    attn = attn.view(rows, heads, n, head_dim).transpose(1, 2).reshape(rows, n, heads * head_dim)
    x = x + F.linear(attn, o_w, o_b)
    return x, _rms_norm(x, ln2, eps)


def mlp_in(h, gate_up_w, gate_up_b):
    gate, up = F.linear(h, gate_up_w, gate_up_b).chunk(2, dim=-1)
    return F.silu(gate) * up


def mlp_out(x, act, down_w, down_b):
    return x + F.linear(act, down_w, down_b)


# Steps of at most this many rows (tokens fed x cache rows) run decode_kernels: a
# draft step, a verification of gamma + 1 tokens, a few beams. One row, and two or three
# rows of a small matrix, take the row kernel, the rest the tensor-core kernel
# (decode_kernels.takes_row_kernel); per matrix the latter is slower than cuBLAS
# (5 rows of Qwen2.5-1.5B's gate/up 27.9 against 18.4 us, benchmarks/gemv_configs.py),
# but the whole 5-token step is faster than the compiled layer's, its norms, rotary
# and attention being fused: 1.97 against 2.06 ms (Qwen2.5-1.5B), 1.11 against 1.24
# (Qwen2.5-0.5B), 0.91 against 1.20 (SmolLM2-135M), H200, benchmarks/step_profile.py
# --tokens 5. Longer steps (prompts) keep the compiled layer and cuBLAS.
KERNEL_ROWS = 16

_compiled_layer = None


def compiled_layer():
    """``decoder_layer`` with its three regions under ``torch.compile``, made once:
    compiling one layer (not the whole model) takes seconds, and every layer reuses it.

    Why three regions and not one: compiled whole, inductor turns each batch-1
    matmul into a reduction and fuses what comes before it into that reduction,
    so each of its programs recomputes the norm (before gate/up) or the SiLU gate
    (before down) over the whole input. Region boundaries make each one small
    kernel, computed once. Measured on an H200 (benchmarks/step_profile.py): the
    down projection 14.9 -> 11.5 us per layer, gate/up unchanged (inductor's plain
    batch-1 reduction reads at ~3 TB/s of 4.2): a tie on Qwen2.5-1.5B, 1.17x on
    SmolLM2-135M.
    """
    global _compiled_layer
    if _compiled_layer is None:
        regions = tuple(torch.compile(f, dynamic=None, fullgraph=True)
                        for f in (attention_block, mlp_in, mlp_out))
        _compiled_layer = functools.partial(decoder_layer, regions=regions)
    return _compiled_layer


# Share of the device's L2 each layer fills, from its attention on, with the weights its
# products read next (decode_kernels.L2_PREFETCH says how and why). Off by default. At a
# quarter of L2 the sampling loop took 2-5% less time a token on the Qwen 1.5B shape (three
# rounds, H100 and H200; at T=1 one of two pairs went the other way) at about 1% less energy
# a token, and nothing measurable on the 0.5B or SmolLM2 (benchmarks/step_profile.py
# --loop-variants no-prefetch,prefetch-25 --energy). But beside the row kernel's 2- and 3-row
# steps (decode_kernels.takes_row_kernel) it made the 0.5B's steps 1.35-1.43 ms against
# 0.87-0.97 without it (H100, --tokens 2 and 3), and the first of four processes with both
# on failed a graph capture; neither is explained. 0.25 turns it on: measure those first.
PREFETCH_L2_SHARE = 0.0


def prefetch_budget(device: torch.device) -> int:
    """Bytes a layer prefetches into L2 on ``device`` (0: none)."""
    if device.type != "cuda" or PREFETCH_L2_SHARE <= 0:
        return 0
    return int(PREFETCH_L2_SHARE * torch.cuda.get_device_properties(device).L2_cache_size)


def prefetch_ranges(o_w: torch.Tensor, gate_up_w: torch.Tensor, down_w: torch.Tensor,
                    budget: int) -> list[tuple[int, int]]:
    """``(address, bytes)`` of the first ``budget`` bytes a layer's products read after
    attention, in their order: the output projection, then gate/up (whose programs read
    a gate row and the matching up row together: both halves from their start), then down."""
    ranges = []
    for streams in ([o_w], list(gate_up_w.chunk(2)), [down_w]):
        size = sum(t.numel() * t.element_size() for t in streams)
        share = min(size, budget) // len(streams)
        ranges += [(t.data_ptr(), share) for t in streams if share]
        budget -= share * len(streams)
        if budget <= 0:
            break
    return ranges


class FusedForward:
    """The model's forward over its own KV cache of ``rows`` rows and ``max_length`` positions.

    ``keys``/``values`` are ``(layers, rows, kv_heads, max_length, head_dim)``;
    positions at or after the caller's cached length are free to overwrite.
    """

    def __init__(self, model: PreTrainedModel, rows: int, max_length: int) -> None:
        if not supports(model):
            raise ValueError(f"{type(model).__name__} is not a Llama-family model this forward computes")
        config = model.config
        self.weights = weights_of(model)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        param = self.weights.embed
        shape = (len(self.weights.layers), rows, self.kv_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=param.dtype, device=param.device)
        self.values = torch.zeros_like(self.keys)
        # The model's own rotary embedding, evaluated once for every position.
        positions = torch.arange(max_length, device=param.device).view(1, -1)
        cos, sin = model.model.rotary_emb(self.keys[0, :1, 0], positions)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()  # (max_length, head_dim)
        # Decode steps through decoders.decode_kernels (six kernels a layer) where they run, and
        # where every weight they read is dense (a model holding strided views takes the compiled layer).
        self.kernels = (decode_kernels.available(param.device) and decode_kernels.supports(param.dtype, head_dim)
                        and all(decode_kernels.dense(*layer) for layer in self.weights.layers))
        # The output head through the kernels too, unless it is more than a Linear (a draft's
        # head over a token subset) or a strided view.
        head = self.weights.head
        self._dense_head = (type(head) is torch.nn.Linear
                            and decode_kernels.dense(head.weight, head.bias, self.weights.norm))
        # The prefetcher beside each kernel step (decode_kernels.L2_PREFETCH): per layer, the
        # first bytes its products read after attention, one table for all layers.
        budget = prefetch_budget(param.device) if self.kernels else 0
        tables = [decode_kernels.prefetch_table(prefetch_ranges(o_w, gate_up_w, down_w, budget), param.device)
                  for _, _, _, o_w, _, _, gate_up_w, _, down_w, _ in self.weights.layers] if budget else []
        self._prefetcher = None
        if tables and all(t is not None for t in tables):
            starts = torch.tensor([0] + [t.shape[0] for t in tables]).cumsum(0)
            self._prefetcher = (torch.cat(tables), starts.to(param.device),
                                torch.zeros(2, dtype=torch.int32, device=param.device),
                                torch.cuda.Stream(device=param.device))

    @torch.no_grad()  # the model's parameters require grad; a decode step never does
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, keep: int,
                 compiled: bool = False, features: torch.Tensor | None = None, hidden: bool = False):
        """Logits ``(rows, keep, V)`` in the model's dtype for ``tokens`` ``(rows, n)`` at ``positions`` ``(n,)``.

        ``mask`` is the additive attention mask ``(n, max_length)`` over the cache: the
        causal one (``positions`` consecutive, each token seeing the cache up to itself);
        None for a step that ``takes_kernels``.
        ``compiled``: the fast form of a decode step, for graph capture: the layers
        through ``decode_kernels`` where ``self.kernels`` (fp16/bf16 on a GPU) and the
        step is at most ``KERNEL_ROWS`` rows (they compute the causal mask from
        ``positions``), else through ``compiled_layer()`` (each shape compiles once).
        ``features`` ``(rows, n, hidden)`` go to a model that takes them
        (``fuse_inputs``); ``hidden`` also returns the final normed hidden states of
        all ``n`` positions, as ``(logits, states)``.
        """
        w = self.weights
        x = F.embedding(tokens, w.embed)
        if features is not None:
            x = w.fuse(x, features)
        elif w.fuse is not None:
            raise ValueError("this model fuses features with its tokens: pass features=...")
        kernels = self.takes_kernels(x.shape[0] * x.shape[1], compiled)
        with self._prefetching(kernels and self._prefetcher is not None):
            if kernels:
                x = self._kernel_layers(x, positions)
            else:
                layer_fn = compiled_layer() if compiled else decoder_layer
                cos, sin = self.cos[positions], self.sin[positions]  # (n, head_dim)
                mask = mask.float().repeat(self.heads // self.kv_heads, 1)
                for i, params in enumerate(w.layers):
                    x = layer_fn(x, cos, sin, mask, self.keys[i], self.values[i], positions, *params,
                                 heads=self.heads, kv_heads=self.kv_heads, eps=self.eps)
            # The final norm over every position (as transformers' own forward does), so a
            # step that also returns the hidden states (an EAGLE target's) gives the logits a
            # step of the same shape without them gives.
            # On the kernels the head's launch normalises its rows itself (its norm prologue):
            # the same rounding, and four launches fewer a step; the states are normed apart
            # only for a step that returns them, and the logits do not depend on that.
            head_kernel = kernels and self._dense_head
            states = _rms_norm(x, w.norm, self.eps) if hidden or not head_kernel else None
            if head_kernel:
                rows = x.shape[0]
                logits = decode_kernels.gemv(x[:, -keep:].reshape(rows * keep, -1), w.head.weight, w.head.bias,
                                             norm=w.norm, eps=self.eps)
                logits = logits.view(rows, keep, -1)
            else:
                logits = w.head(states[:, -keep:])
        return (logits, states) if hidden else logits

    @contextlib.contextmanager
    def _prefetching(self, on: bool):
        """Inside: the L2 prefetcher runs beside the step's launches on its own stream
        (decode_kernels.L2_PREFETCH), joined on the way out, an exception included (an
        unjoined stream would fail a graph capture with an error that hides the real one)."""
        if not on:
            yield
            return
        table, starts, flag, stream = self._prefetcher
        main = torch.cuda.current_stream(flag.device)
        # Zeroed by the step, not by the prefetcher: a step whose prefetcher gave up
        # waiting (a first step that compiles kernels) leaves no stale flag to the next.
        flag.zero_()
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            decode_kernels.prefetcher(table, starts, flag)
        try:
            yield
        finally:
            main.wait_stream(stream)

    def takes_kernels(self, rows: int, compiled: bool) -> bool:
        """Whether a step of ``rows`` rows (tokens fed x cache rows) runs ``decode_kernels``
        (which need no ``mask``)."""
        return compiled and self.kernels and rows <= KERNEL_ROWS

    def _kernel_layers(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The layers through ``decode_kernels``: six launches a layer."""
        rows, n, width = x.shape
        x = x.reshape(rows * n, width)
        flag = self._prefetcher[2] if self._prefetcher is not None else None
        for i, (ln1, qkv_w, qkv_b, o_w, o_b, ln2, gate_up_w, gate_up_b, down_w, down_b) in enumerate(
                self.weights.layers):
            qkv = decode_kernels.gemv(x, qkv_w, qkv_b, norm=ln1, eps=self.eps)
            attn = decode_kernels.attention(qkv, self.keys[i], self.values[i], self.cos, self.sin, positions,
                                            heads=self.heads, kv_heads=self.kv_heads,
                                            signal=None if flag is None else (flag, i + 1))
            x = decode_kernels.gemv(attn, o_w, o_b, residual=x)
            act = decode_kernels.gemv(x, gate_up_w, gate_up_b, norm=ln2, eps=self.eps, gated=True)
            x = decode_kernels.gemv(act, down_w, down_b, residual=x)
        return x.view(rows, n, width)

    def select(self, index: torch.Tensor) -> None:
        """Row ``r`` of the cache becomes row ``index[r]`` (in place: graphs read these tensors)."""
        self.keys.copy_(self.keys.index_select(1, index))
        self.values.copy_(self.values.index_select(1, index))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers: normalise in float32, round to the model's dtype, then scale.
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` ``(rows, heads, n, head_dim)`` (the rotate-half form)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
