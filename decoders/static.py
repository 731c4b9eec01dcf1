"""The fast path: a static KV cache whose decode-sized forwards replay CUDA graphs.

On a GPU, a small-batch decode step of an eager transformers model is bound by
the host: Python and ~40 kernel launches per layer cost far more than the
kernels themselves. ``StaticCachedModel`` removes that overhead:

- the KV cache is transformers' ``StaticCache``: fixed tensors, updated in
  place, so every forward of a given shape touches the same addresses;
- the first forward of each decode shape ``(tokens fed, logits kept)`` runs
  eagerly, then is captured into a CUDA graph; later forwards of that shape copy
  their inputs into the graph's buffers and replay it (one launch);
- positions and the attention mask are computed *inside* the graph from one
  device scalar (the cached length), so a replay needs no host arithmetic and no
  synchronisation, and a rejected draft is dropped by moving that scalar back.

It offers the same small interface as ``kv.CachedModel`` (call, ``length``,
``crop``, ``repeat``, ``select``, ``forwards``), so the decoders do not know
which one they drive. Beams use a fixed number of cache rows: while the caller
feeds one row, the same tokens go to every row (free for a memory-bound model),
which turns ``repeat`` into a no-op and ``select`` into in-place row copies.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
from transformers import PreTrainedModel, StaticCache

from decoders import fused as fused_forward
from decoders import probs as P
from decoders.kv import cache_kwarg, device_of, model_outputs

# Forwards of at most this many new tokens are graphed; longer ones (prompts)
# run eagerly, since each shape gets its own graph and prompts vary in length.
MAX_GRAPHED_TOKENS = 32
# Cache lengths are rounded up to this, so nearby requests share one cache.
LENGTH_BUCKET = 256


def supports_static_cache(model: PreTrainedModel) -> bool:
    """True for decoder-only models on one device with full attention everywhere.

    Sliding-window layers keep a rolling cache whose positions the mask below
    does not model, and attention kernels other than SDPA/eager ignore a custom
    4-D mask; such models (and models split over devices) take the plain path.
    """
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if getattr(config, "sliding_window", None) or getattr(config, "use_sliding_window", False):
        return False
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return False
    return len({p.device for p in model.parameters()}) == 1


class StaticCachedModel:
    """A causal LM over a ``StaticCache`` of ``rows`` rows and ``max_length`` positions.

    Args:
        model: a transformers causal LM (see ``supports_static_cache``).
        rows: physical batch size of the cache (1, or the beam width).
        max_length: positions the cache holds; feeding past it raises.
        graphs: capture and replay CUDA graphs for decode-sized forwards (needs
            a CUDA model); False runs every forward eagerly over the same cache,
            which is how the CPU tests check this class.
        compile: run decode-sized forwards through ``torch.compile`` (fused
            norms, rotary and activations; fewer kernels per layer) before
            capturing them. Costs a compilation per shape on first use. None:
            compile only the fused forward's layer (seconds, not minutes).
        fused: for a Llama-family model, run ``decoders.fused.FusedForward``
            (the same function in far fewer kernels, over its own KV tensors)
            instead of the model's forward over a transformers ``StaticCache``.
    """

    def __init__(self, model: PreTrainedModel, rows: int, max_length: int, graphs: bool,
                 compile: bool | None = False, fused: bool = True) -> None:
        # Weak: the per-model pool below must not keep the model it is keyed by alive.
        self._model = weakref.ref(model)
        self.device = device_of(model)
        if graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {self.device}")
        self.rows = rows
        self.max_length = max_length
        self.graphs = graphs
        self.compile_setting = compile  # as asked (acquire matches on it)
        self.source = fused_forward.identity(model)  # what the cache was built over (see acquire)
        self.engine = None
        if fused and fused_forward.supports(model) and fused_forward.room_for_copies(model):
            self.engine = fused_forward.FusedForward(model, rows, max_length)
        else:
            self.cache = StaticCache(config=model.config, max_cache_len=max_length)
            self._cache_kwarg = cache_kwarg(model)
        if compile is None:
            compile = self.engine is not None
        self.compiled = compile
        self._compiled_forward = None
        if compile:
            # Every step shape (and model shape) is one more compiled version of
            # the same function; past dynamo's limit (8) it would silently run eagerly.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            # Fused: one compiled layer serves all layers (seconds per step shape);
            # otherwise the model's whole forward is compiled.
            if self.engine is None:
                self._compiled_model_logits = torch.compile(self._model_logits, dynamic=False)
            self._compiled_forward = functools.partial(self._forward, compiled=True)
        self._dtype = next(model.parameters()).dtype
        # The one piece of state a forward reads: how many positions are cached.
        self._start = torch.zeros((), dtype=torch.long, device=self.device)
        self._kv_index = torch.arange(max_length, device=self.device)
        self._graphed: dict[tuple, _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if graphs else None
        self.reset()

    @property
    def model(self) -> PreTrainedModel:
        return self._model()

    def reset(self) -> None:
        """Start a new sequence (the old cache contents are simply overwritten)."""
        self._length = 0
        self._width = 1  # rows the caller sees: 1, or ``rows`` between repeat() and select() of one
        self.forwards = 0
        self.replays = 0  # forwards served by a graph replay

    @property
    def length(self) -> int:
        """Number of tokens currently held in the cache (tracked on the host)."""
        return self._length

    def __call__(self, tokens: torch.Tensor, keep: int | None = None, features: torch.Tensor | None = None,
                 hidden: bool = False):
        """Feed ``tokens`` ``(batch, n)`` after the cached prefix; see ``CachedModel``."""
        return self._run(tokens, keep, None, features, hidden)

    def probs(self, tokens: torch.Tensor, keep: int, filters: tuple[float, int, float],
              features: torch.Tensor | None = None, hidden: bool = False):
        """``probs.filtered_probs`` of the logits, computed inside the captured graph.

        The filter (softmax, top-k, top-p over a vocabulary of up to 150k) is a
        dozen small kernels; replayed with the forward it costs no launches.
        """
        return self._run(tokens, keep, tuple(filters), features, hidden)

    def _run(self, tokens: torch.Tensor, keep: int | None, filters: tuple | None,
             features: torch.Tensor | None = None, hidden: bool = False):
        batch, n = tokens.shape
        keep = n if keep is None else keep
        if batch != self._width:
            raise ValueError(f"fed {batch} rows to a cache holding {self._width}")
        if self._length + n > self.max_length:
            raise ValueError(f"cache of {self.max_length} positions cannot take {n} more after {self._length}")
        self._start.fill_(self._length)
        inputs = (tokens,) if features is None else (tokens, features)
        if self.graphs and n <= MAX_GRAPHED_TOKENS and self._length > 0:
            key = _graph_key(n, keep, filters, len(inputs), hidden)
            graph = self._graphed.get(key)
            if graph is None:
                graph = self._graphed[key] = _Graph(self, inputs, keep, filters, hidden)
                out, graph.first_out = graph.first_out, None
            else:
                out = graph.replay(inputs)
                self.replays += 1
        else:
            out = self._forward(inputs, keep, filters=filters, hidden=hidden)
        self._length += n
        self.forwards += 1
        if hidden:
            return out[0][: self._width], out[1][: self._width]
        return out[: self._width]

    def prepare(self, sizes, filters: tuple[float, int, float] | None = None, hidden: bool = False,
                keep: int | None = None, feature_size: int = 0) -> None:
        """Capture now the graph of each ``n``-token forward for ``n`` in ``sizes``, where none is
        captured yet: the shapes a caller will feed, with the arguments it will pass (``keep``
        logits, all ``n`` when None; ``filters``/``hidden`` as in ``probs``; ``feature_size`` > 0
        for a model fed features of that width beside its tokens).

        A shape's first forward captures its graph (and compiles its kernels): about a
        second, once per process. A caller that knows which shapes it will feed warms
        them all up front, so a shape first seen late (a draft budget shrinking near
        ``max_new_tokens``, a proposer drafting fewer, a block accepted whole) is not
        captured inside a measured sweep. The forwards write past the cached length
        (past position 0 on an empty cache), where positions are free, and count in
        neither ``forwards`` nor ``replays``.
        """
        if not self.graphs:
            return
        length, forwards = self._length, self.forwards
        for key in self.graph_keys(sizes, filters, hidden, keep, feature_size):
            n = key[0]
            at = max(length, 1)  # a forward at position 0 is a prompt's: it runs eagerly, never graphed
            if key not in self._graphed and at + n <= self.max_length:
                self._length = at
                tokens = torch.zeros((self._width, n), dtype=torch.long, device=self.device)
                features = (torch.zeros((self._width, n, feature_size), dtype=self._dtype, device=self.device)
                            if feature_size else None)
                self._run(tokens, key[1], key[2], features, hidden)
        self._length, self.forwards = length, forwards

    @staticmethod
    def graph_keys(sizes, filters: tuple[float, int, float] | None = None, hidden: bool = False,
                   keep: int | None = None, feature_size: int = 0) -> list[tuple]:
        """The graphs ``prepare`` with these arguments captures (shapes of more than
        ``MAX_GRAPHED_TOKENS`` tokens run eagerly and have none)."""
        filters = None if filters is None else tuple(filters)
        inputs = 2 if feature_size else 1
        return [_graph_key(n, n if keep is None else keep, filters, inputs, hidden)
                for n in sizes if n <= MAX_GRAPHED_TOKENS]

    def _forward(self, inputs: tuple[torch.Tensor, ...], keep: int, compiled: bool = False,
                 filters: tuple | None = None, hidden: bool = False):
        """One forward at positions ``start .. start + n``; returns float32 logits ``(rows, keep, V)``,
        or their ``filtered_probs`` under ``filters``; with ``hidden``, also the final
        hidden states ``(rows, n, hidden)``. ``inputs`` are the tokens and, for a
        model that takes them, the features.

        Everything here is device work driven by ``self._start``, so the same
        code runs eagerly and inside a graph capture.
        """
        tokens, features = inputs[0], (inputs[1] if len(inputs) > 1 else None)
        n = tokens.shape[1]
        tokens = tokens.expand(self.rows, n)
        if features is not None:
            features = features.expand(self.rows, *features.shape[1:])
        positions = self._start + self._kv_index[:n]
        mask = None  # the decode kernels find the causal mask from the positions themselves
        if self.engine is None or not self.engine.takes_kernels(self.rows * n, compiled):
            visible = self._kv_index.view(1, -1) <= positions.view(-1, 1)  # (n, max_length)
            mask = torch.zeros(visible.shape, dtype=self._dtype, device=self.device)
            mask = mask.masked_fill(~visible, torch.finfo(self._dtype).min)
        if self.engine is not None:
            out = self.engine(tokens, positions, mask, keep, compiled, features=features, hidden=hidden)
        else:
            model_logits = self._compiled_model_logits if compiled else self._model_logits
            out = model_logits(tokens, positions, mask, keep, features=features, hidden=hidden)
        logits, states = out if hidden else (out, None)
        # The filter stays out of any compiled function (a new setting would recompile
        # the model) but inside the captured graph.
        logits = logits.float()
        logits = logits if filters is None else P.filtered_probs(logits, *filters)
        return (logits, states) if hidden else logits

    def _model_logits(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                      keep: int, features: torch.Tensor | None = None, hidden: bool = False):
        """The model's own forward over transformers' ``StaticCache``."""
        n = tokens.shape[1]
        # StaticCache writes at its own per-layer counters: point them at start.
        counters = [layer.cumulative_length for layer in self.cache.layers if layer.is_initialized]
        if counters:
            torch._foreach_copy_(counters, [self._start] * len(counters))
        out = model_outputs(
            self.model, tokens, keep, features, hidden,
            attention_mask=mask.expand(self.rows, 1, n, self.max_length),
            position_ids=positions.expand(self.rows, n),
            use_cache=True,
            **{self._cache_kwarg: self.cache},
        )
        if hidden:
            return out[0].to(self.device), out[1].to(self.device)
        return out.to(self.device)

    def crop(self, length: int) -> None:
        """Drop cached positions from ``length`` on: later forwards overwrite them."""
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot crop a cache of {self._length} tokens to {length}")
        self._length = length

    def repeat(self, times: int) -> None:
        """One row per beam: every row already holds the prefix, so just widen."""
        if self._width != 1 or times != self.rows:
            raise ValueError(f"cache has {self.rows} rows, {self._width} in use; cannot repeat {times} times")
        self._width = times

    def select(self, rows: torch.Tensor) -> None:
        """Keep rows ``rows``: all beams reordered, or one beam copied to every row."""
        if rows.numel() not in (1, self.rows):
            raise ValueError(f"select() takes 1 or {self.rows} rows, got {rows.numel()}")
        if self.rows > 1 and self.engine is not None:
            self.engine.select(rows.view(-1).expand(self.rows))
        elif self.rows > 1:
            index = rows.view(-1).expand(self.rows)
            for layer in self.cache.layers:
                if layer.is_initialized:
                    # In place: graphs captured earlier read these exact tensors.
                    layer.keys.copy_(layer.keys.index_select(0, index))
                    layer.values.copy_(layer.values.index_select(0, index))
        self._width = rows.numel()


class _Graph:
    """One captured forward of ``n`` tokens keeping ``keep`` logits, with its buffers.

    Built on the first forward of its shape, with that forward's real inputs:
    the eager warm-up PyTorch asks for before a capture is that forward (its
    output is ``first_out``), and the capture itself computes nothing.
    """

    def __init__(self, owner: StaticCachedModel, inputs: tuple[torch.Tensor, ...], keep: int,
                 filters: tuple | None, hidden: bool) -> None:
        self.inputs = tuple(t.expand(owner.rows, *t.shape[1:]).clone() for t in inputs)
        self.replays = 0
        self.graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(owner.device)
        current = torch.cuda.current_stream(owner.device)
        stream.wait_stream(current)
        forward, tuning = owner._forward, contextlib.nullcontext()
        if owner._compiled_forward is not None:
            import torch._inductor.config as inductor_config

            # The first call of a compiled shape compiles it. Coordinate-descent
            # tuning lets inductor turn the batch-1 matmuls into tuned Triton
            # reductions fused with their neighbours (measured on an H100 with
            # a 7B shape: 5.7 ms per step against 6.3 ms without it).
            forward = owner._compiled_forward
            tuning = inductor_config.patch(coordinate_descent_tuning=True)
        with torch.cuda.stream(stream):
            with tuning:
                self.first_out = forward(self.inputs, keep, filters=filters, hidden=hidden)
            with torch.cuda.graph(self.graph, pool=owner._pool, stream=stream):
                self.out = forward(self.inputs, keep, filters=filters, hidden=hidden)
        current.wait_stream(stream)
        for t in _tensors(self.first_out):
            t.record_stream(current)  # made on the side stream, used on this one

    def replay(self, inputs: tuple[torch.Tensor, ...]):
        for buffer, value in zip(self.inputs, inputs, strict=True):
            buffer.copy_(value)  # broadcasts one row to every row
        self.graph.replay()
        self.replays += 1  # per shape: benchmarks weigh each shape's replay time by it
        # The next replay overwrites the output buffers; callers may keep what they got.
        out = tuple(t.clone() for t in _tensors(self.out))
        return out if isinstance(self.out, tuple) else out[0]


def _graph_key(n: int, keep: int, filters: tuple | None, inputs: int, hidden: bool) -> tuple:
    """What tells one captured forward from another (``_run`` and ``prepare`` build it alike)."""
    return n, keep, filters, inputs, hidden


def _tensors(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


# Caches are kept per model between generate() calls: building a cache and
# capturing graphs costs far more than a decode step, and a sweep reuses them.
_POOL: weakref.WeakKeyDictionary[PreTrainedModel, list[StaticCachedModel]] = weakref.WeakKeyDictionary()


def acquire(model: PreTrainedModel, rows: int, max_length: int, graphs: bool, busy: list,
            compile: bool | None = False) -> StaticCachedModel:
    """A reset static cache for ``model`` with ``rows`` rows and room for ``max_length``.

    Reuses a cache of this model that is not in ``busy`` (the caches the current
    generation already holds: a draft may be the target itself), else builds one.
    """
    caches = _POOL.setdefault(model, [])
    # A cache whose model changed since (weights loaded in place, .to(dtype)) holds
    # graphs over old addresses and, on the fused path, stale weight copies.
    identity = fused_forward.identity(model)
    caches[:] = [c for c in caches if c.source == identity]
    for i, cache in enumerate(caches):
        same_kind = (cache.rows, cache.graphs, cache.compile_setting) == (rows, graphs, compile)
        if same_kind and all(cache is not b for b in busy):
            if cache.max_length >= max_length:
                cache.reset()
                return cache
            del caches[i]  # too short: replace it (and its graphs) with a longer one
            break
    length = -(-max_length // LENGTH_BUCKET) * LENGTH_BUCKET
    cache = StaticCachedModel(model, rows, length, graphs, compile)
    caches.append(cache)
    return cache


def release_all(model: PreTrainedModel | None = None) -> None:
    """Free the kept caches and graphs (of one model, or all), e.g. before unloading."""
    if model is None:
        _POOL.clear()
    else:
        _POOL.pop(model, None)
