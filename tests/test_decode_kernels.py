"""The decode kernels (``decoders.decode_kernels``) compute what the fused layer computes.

On a machine without a GPU they run under Triton's interpreter (tests/conftest.py
sets it), in float16 (the interpreter's bfloat16 matrix products are wrong);
on a GPU in bfloat16 and float16. Each fused step is checked against the plain
PyTorch it replaces, and the whole kernel layer against ``fused.decoder_layer``
through the engine, including multi-token (verification) steps and cache rows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from decoders import decode_kernels as K
from decoders import fused, static
from tests.test_fused import build

pytestmark = pytest.mark.skipif(K.triton is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]


def _rand(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=DEVICE)


def _close(got, expected, dtype):
    # One rounding of the output in the model's dtype apart (float32 accumulation both ways).
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 20])
def test_gemv_steps_match_torch(dtype, rows):
    """Plain, bias, norm prologue, residual and SiLU-gated forms; K not a multiple of the block."""
    k, n = 96, 48
    x = _rand(rows, k, dtype=dtype, seed=0)
    w = _rand(2 * n, k, dtype=dtype, seed=1, scale=k**-0.5)
    b = _rand(2 * n, dtype=dtype, seed=2)
    ln = _rand(k, dtype=dtype, seed=3)
    res = _rand(rows, n, dtype=dtype, seed=4)
    normed = fused._rms_norm(x, ln, 1e-6)
    _close(K.gemv(x, w[:n]), F.linear(x, w[:n]), dtype)
    _close(K.gemv(x, w[:n], b[:n], residual=res), res + F.linear(x, w[:n], b[:n]), dtype)
    _close(K.gemv(x, w, b, norm=ln, eps=1e-6), F.linear(normed, w, b), dtype)
    _close(K.gemv(x, w, b, norm=ln, eps=1e-6, gated=True), fused.mlp_in(normed, w, b), dtype)


def test_gemv_rows_are_independent_and_deterministic():
    """On the tensor-core kernel (up to 16 rows, K split over programs) a row's result is
    bit-identical whatever else is fed with it, and from one launch to the next."""
    dtype = DTYPES[-1]
    x = _rand(7, 512, dtype=dtype, seed=5)
    w = _rand(2 * 64, 512, dtype=dtype, seed=6)
    ln = _rand(512, dtype=dtype, seed=7)
    block_k = K.gemv_config(64, 512, 7, gated=True, norm=True)[1]
    assert K._split_k(4, 512 // block_k, x.device) > 1  # the split path is what runs
    together = K.gemv(x, w, norm=ln, eps=1e-6, gated=True)
    assert torch.equal(K.gemv(x, w, norm=ln, eps=1e-6, gated=True), together)
    for i in (0, 3):  # four rows: fewer could take the row kernel (takes_row_kernel)
        assert not K.takes_row_kernel(4, 64, 512, gated=True)
        assert torch.equal(K.gemv(x[i:i + 4], w, norm=ln, eps=1e-6, gated=True)[0], together[i])


class _Launches:
    """Stands in for a Triton kernel: records each launch's name in ``seen`` and its keyword
    arguments (the compile-time constants) in ``keywords``, then launches it."""

    def __init__(self, kernel, name: str, seen: list[str]) -> None:
        self.kernel, self.name, self.seen = kernel, name, seen
        self.keywords: list[dict] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(self.name)
            self.keywords.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_a_few_rows_of_a_small_matrix_take_the_row_kernel(monkeypatch):
    """Up to SMALL_MATRIX_ROWS rows of a matrix of at most SMALL_MATRIX weights run the row
    kernel (there a launch is latency, and the row kernel's is the shorter); more rows, or a
    larger matrix, the tensor-core kernel. Each gives the product (with the norm, in the
    wider programs of gemv_config's rule for 2+ rows, here over outputs not a multiple of them)."""
    dtype = DTYPES[-1]
    seen: list[str] = []
    for name in ("_gemv_rows_kernel", "_gemv_dot_kernel"):
        monkeypatch.setattr(K, name, _Launches(getattr(K, name), name, seen))
    n, k = 45, 96
    w = _rand(2 * n, k, dtype=dtype, seed=30, scale=k**-0.5)
    ln = _rand(k, dtype=dtype, seed=31)

    def launch(rows: int) -> str:
        x = _rand(rows, k, dtype=dtype, seed=32 + rows)
        seen.clear()
        _close(K.gemv(x, w, norm=ln, eps=1e-6, gated=True), fused.mlp_in(fused._rms_norm(x, ln, 1e-6), w, None),
               dtype)
        (kernel,) = seen
        return kernel

    assert [launch(rows) for rows in (1, 2, 3, 4)] == ["_gemv_rows_kernel"] * 3 + ["_gemv_dot_kernel"]
    monkeypatch.setattr(K, "SMALL_MATRIX", 2 * n * k - 1)  # gate and up together: one weight too many
    assert [launch(rows) for rows in (1, 2)] == ["_gemv_rows_kernel", "_gemv_dot_kernel"]


@pytest.mark.parametrize("rows", [1, 3])
def test_row_kernel_first_tile_early_up_to_the_bound(monkeypatch, rows):
    """The row kernel is launched to read its first weight tile before its wait for a matrix
    of at most WEIGHTS_FIRST_MAX weights (gate and up counted together), after it for a larger
    one. Both forms give the product, bit for bit alike, over one K tile and over several (the
    first apart from the K loop, the last masked). The interpreter has no wait: the GPU tests
    run the early read under overlapped launches."""
    dtype = DTYPES[-1]
    launches = _Launches(K._gemv_rows_kernel, "_gemv_rows_kernel", [])
    monkeypatch.setattr(K, "_gemv_rows_kernel", launches)
    n, k = 45, 100
    x = _rand(rows, k, dtype=dtype, seed=40)
    w = _rand(2 * n, k, dtype=dtype, seed=41, scale=k**-0.5)
    b = _rand(2 * n, dtype=dtype, seed=42)
    ln = _rand(k, dtype=dtype, seed=43)
    expected = fused.mlp_in(fused._rms_norm(x, ln, 1e-6), w, b)
    got = {}
    for bound in (2 * n * k, 2 * n * k - 1):  # at the bound: first; one weight over: after the wait
        monkeypatch.setattr(K, "WEIGHTS_FIRST_MAX", bound)
        for block_k in (128, 32):  # one tile; four, the last holding 4 of K's 100
            got[bound, block_k] = K.gemv(x, w, b, norm=ln, eps=1e-6, gated=True, config=(4, block_k, 4, 1))
            _close(got[bound, block_k], expected, dtype)
    assert [kw["WEIGHTS_FIRST"] for kw in launches.keywords] == [True, True, False, False]
    for block_k in (128, 32):
        assert torch.equal(got[2 * n * k, block_k], got[2 * n * k - 1, block_k])


def test_gemv_takes_the_split_its_config_names():
    """A fifth number in ``config`` sets the tensor-core kernel's K split (what
    benchmarks/gemv_configs.py sweeps) in place of ``_split_k``'s; every split gives the product."""
    dtype = DTYPES[-1]
    x = _rand(5, 512, dtype=dtype, seed=8)
    w = _rand(64, 512, dtype=dtype, seed=9, scale=512**-0.5)
    res = _rand(5, 64, dtype=dtype, seed=10)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(K, "_split_k", lambda *args: pytest.fail("the configured split was not taken"))
        for split in (1, 3, 8):
            _close(K.gemv(x, w, residual=res, config=(32, 64, 4, 1, split)), res + F.linear(x, w), dtype)


def test_gemv_refuses_a_prompt():
    x = _rand(K.MAX_ROWS + 1, 32, dtype=torch.float16, seed=0)
    with pytest.raises(ValueError, match="at most"):
        K.gemv(x, _rand(16, 32, dtype=torch.float16, seed=1))


def _reference_attention(qkv, keys, values, cos, sin, start, n, heads, kv_heads):
    """``fused.attention_block``'s attention part on copies of the cache."""
    rows, _, max_length, d = keys.shape
    keys, values = keys.clone(), values.clone()
    positions = torch.arange(start, start + n, device=qkv.device)
    q, k, v = qkv.view(rows, n, -1).split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    c, s = cos[positions], sin[positions]
    q = fused._rotate(q.view(rows, n, heads, d).transpose(1, 2), c, s)
    keys.index_copy_(2, positions, fused._rotate(k.reshape(rows, n, kv_heads, d).transpose(1, 2), c, s))
    values.index_copy_(2, positions, v.reshape(rows, n, kv_heads, d).transpose(1, 2))
    visible = torch.arange(max_length, device=qkv.device).view(1, -1) <= positions.view(-1, 1)
    mask = torch.zeros(visible.shape, device=qkv.device).masked_fill(~visible, float("-inf"))
    q = q.reshape(rows, kv_heads, (heads // kv_heads) * n, d)
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * d**-0.5 + mask.repeat(heads // kv_heads, 1)
    attn = torch.matmul(torch.softmax(scores, dim=-1), values.float()).to(qkv.dtype)
    return attn.view(rows, heads, n, d).transpose(1, 2).reshape(rows * n, heads * d), keys, values


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n,start,heads,kv_heads", [
    (1, 1, 70, 4, 2),     # a decode step, the new token in the second chunk
    (1, 5, 61, 4, 2),     # a verification block across a chunk boundary
    (2, 3, 10, 4, 4),     # two cache rows (beams), no grouping
    (1, 1, 0, 6, 2),      # the first position
])
def test_attention_matches_the_layers_attention(dtype, rows, n, start, heads, kv_heads):
    d, max_length = 16, 160
    qkv = _rand(rows * n, (heads + 2 * kv_heads) * d, dtype=dtype, seed=8)
    keys = _rand(rows, kv_heads, max_length, d, dtype=dtype, seed=9)
    values = _rand(rows, kv_heads, max_length, d, dtype=dtype, seed=10)
    angles = torch.arange(max_length).view(-1, 1) * torch.rand(1, d // 2, generator=torch.Generator().manual_seed(11))
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(dtype=dtype, device=DEVICE)
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(dtype=dtype, device=DEVICE)
    expected, expected_keys, expected_values = _reference_attention(qkv, keys, values, cos, sin, start, n,
                                                                    heads, kv_heads)
    positions = torch.arange(start, start + n, device=DEVICE)
    got = K.attention(qkv, keys, values, cos, sin, positions, heads=heads, kv_heads=kv_heads)
    _close(got, expected, dtype)
    _close(keys, expected_keys, dtype)  # this step's keys rotated into the cache, the rest untouched
    assert torch.equal(values, expected_values)


def _tiny_qwen(dtype):
    """test_fused's tiny Qwen2 (biases that matter) in ``dtype`` on this machine's device."""
    return build("qwen2").to(dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("rows,n", [(1, 1), (1, 5), (3, 2)])
def test_kernel_layers_match_the_fused_layer(rows, n, monkeypatch):
    """The engine's kernel path gives the eager layer's logits and cache, at any step shape
    (the engine takes it for steps of up to ``fused.KERNEL_ROWS`` rows; raised here so that
    every shape tried takes it)."""
    monkeypatch.setattr(fused, "KERNEL_ROWS", K.MAX_ROWS)
    dtype = DTYPES[-1]
    model = _tiny_qwen(dtype)
    ids = torch.randint(0, 97, (rows, 40 + n), generator=torch.Generator().manual_seed(12)).to(DEVICE)
    with torch.inference_mode():
        cache = static.StaticCachedModel(model, rows=rows, max_length=128, graphs=False)
        engine = cache.engine
        engine.kernels = True
        cache(ids[:1, :40])  # the prompt, eagerly, into every row
        cache._width = rows
        cache._start.fill_(40)
        positions = cache._start + cache._kv_index[:n]
        mask = torch.zeros(n, 128, device=DEVICE)  # unused by the kernels (they compute the causal mask)
        keys_before = engine.keys.clone()
        got = engine(ids[:, 40:], positions, mask, keep=n, compiled=True)
        keys_kernels, engine.keys[:] = engine.keys.clone(), keys_before
        visible = cache._kv_index.view(1, -1) <= positions.view(-1, 1)
        mask = torch.zeros(visible.shape, dtype=dtype, device=DEVICE).masked_fill(~visible, torch.finfo(dtype).min)
        expected = engine(ids[:, 40:], positions, mask, keep=n, compiled=False)
    _close(got, expected, dtype)
    _close(keys_kernels, engine.keys, dtype)


def test_engine_takes_kernels_only_on_a_gpu():
    model = _tiny_qwen(DTYPES[-1])
    engine = fused.FusedForward(model, rows=1, max_length=64)
    assert engine.kernels == (DEVICE == "cuda")


def test_strided_weights_are_refused_by_gemv_and_keep_a_model_off_the_kernels(monkeypatch):
    """The kernels read a weight as a dense row-major matrix: a transposed view would be read
    as another matrix, so gemv refuses it and an engine over such a model takes the compiled
    layer."""
    dtype = DTYPES[-1]
    x = _rand(1, 32, dtype=dtype, seed=21)
    strided = _rand(32, 48, dtype=dtype, seed=22).t()  # (48, 32), not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        K.gemv(x, strided)
    _close(K.gemv(x, strided.contiguous()), F.linear(x, strided), dtype)
    monkeypatch.setattr(K, "available", lambda device: True)  # as on a GPU
    model = _tiny_qwen(dtype)
    assert fused.FusedForward(model, rows=1, max_length=64).kernels
    layer = model.model.layers[0].self_attn.o_proj
    with torch.no_grad():
        layer.weight = torch.nn.Parameter(layer.weight.t().contiguous().t())  # same values, strided
    assert not layer.weight.is_contiguous()
    assert not fused.FusedForward(model, rows=1, max_length=64).kernels


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,gated", [
    (2048, 1536, False), (1536, 1536, False), (8960, 1536, True), (1536, 8960, False), (151936, 1536, False),
    (960, 576, False), (1536, 576, True), (576, 1536, False), (49152, 576, False), (896, 4864, False),
])
@pytest.mark.parametrize("rows", [1, 2, 3, 5])
def test_gemv_default_configs_on_real_layer_shapes(n, k, gated, rows):
    """The launch configurations the decoders use (``gemv_config``) on Qwen2.5 and SmolLM2 matrices."""
    x = _rand(rows, k, dtype=torch.bfloat16, seed=15)
    w = _rand(2 * n if gated else n, k, dtype=torch.bfloat16, seed=16, scale=k**-0.5)
    ln = _rand(k, dtype=torch.bfloat16, seed=17)
    res = _rand(rows, n, dtype=torch.bfloat16, seed=18)
    normed = fused._rms_norm(x, ln, 1e-6)
    if gated:
        _close(K.gemv(x, w, norm=ln, eps=1e-6, gated=True), fused.mlp_in(normed, w, None), torch.bfloat16)
    else:
        _close(K.gemv(x, w, residual=res), res + F.linear(x, w), torch.bfloat16)


def test_split_counters_are_one_buffer_for_the_life_of_the_process():
    """Captured graphs keep the counters' address: a later, wider launch must not replace them."""
    device = torch.device(DEVICE)
    first = K._locks(device, 8)
    assert not K.takes_row_kernel(4, 4800, 64)  # a split launch of the tensor-core kernel
    K.gemv(_rand(4, 64, dtype=DTYPES[-1], seed=19), _rand(4800, 64, dtype=DTYPES[-1], seed=20))
    assert K._locks(device, K._LOCK_COUNT) is first
    with pytest.raises(ValueError, match="counters"):
        K._locks(device, K._LOCK_COUNT + 1)


def test_prefetch_ranges_follow_the_order_the_products_read():
    """Output projection first, then gate and up from the start of each half (a program
    reads a gate row with its up row), then down; cut at the budget."""
    o = torch.empty(8, 16, dtype=torch.float16)
    gate_up = torch.empty(24, 16, dtype=torch.float16)
    down = torch.empty(16, 12, dtype=torch.float16)
    o_bytes, half, down_bytes = o.numel() * 2, gate_up.numel(), down.numel() * 2
    gate, up = gate_up.data_ptr(), gate_up.data_ptr() + half
    assert fused.prefetch_ranges(o, gate_up, down, o_bytes - 32) == [(o.data_ptr(), o_bytes - 32)]
    assert fused.prefetch_ranges(o, gate_up, down, o_bytes + 64) == [(o.data_ptr(), o_bytes), (gate, 32), (up, 32)]
    assert fused.prefetch_ranges(o, gate_up, down, o_bytes + 2 * half + 48) == [
        (o.data_ptr(), o_bytes), (gate, half), (up, half), (down.data_ptr(), 48)]
    assert fused.prefetch_ranges(o, gate_up, down, 10**9)[-1] == (down.data_ptr(), down_bytes)


def test_prefetch_table_covers_each_range_in_aligned_pieces(monkeypatch):
    monkeypatch.setattr(K, "_l2_prefetch", lambda device: True)
    monkeypatch.setattr(K, "PREFETCH_PIECE", 64)
    ranges = [(1000, 200), (4096, 64), (8200, 1)]
    table = K.prefetch_table(ranges, torch.device("cpu")).tolist()
    assert all(a % 16 == 0 and 0 < size <= 64 and size % 16 == 0 for a, size in table)
    covered = {byte for a, size in table for byte in range(a, a + size)}
    wanted = {byte for a, size in ranges for byte in range(a, a + size)}
    assert wanted <= covered
    assert len(covered) == sum(size for _, size in table)  # no byte fetched twice
    assert max(covered - wanted) - max(wanted) < 16 and min(wanted) - min(covered) < 16
    monkeypatch.setattr(K, "_l2_prefetch", lambda device: False)
    assert K.prefetch_table(ranges, torch.device("cpu")) is None


@pytest.mark.gpu
def test_l2_prefetch_changes_no_result(monkeypatch):
    """The prefetcher beside a step moves bytes into L2 and nothing else: the logits and the
    cache of a run of decode steps are bit-identical with and without it, eagerly and
    replayed from a graph; every layer signalled it, and in a step that compiled nothing
    none of its programs gave up waiting (it ran beside the step, not before or after)."""
    if not K._l2_prefetch(torch.device(DEVICE)):
        pytest.skip("the L2 prefetch needs a Hopper or later GPU")
    model = _tiny_qwen(torch.bfloat16)
    tokens = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(23)).to(DEVICE)
    served = [len(model.model.layers), K.PREFETCH_PROGRAMS]
    runs = []
    for share in (0.0, 0.5):
        monkeypatch.setattr(fused, "PREFETCH_L2_SHARE", share)
        engine = fused.FusedForward(model, rows=1, max_length=128)
        assert engine.kernels and (engine._prefetcher is not None) == (share > 0)
        with torch.inference_mode():
            logits = [engine(tokens[i].view(1, 1), torch.tensor([i], device=DEVICE), None, keep=1, compiled=True)
                      for i in range(len(tokens))]
        if share:
            assert engine._prefetcher[2].tolist() == served
        runs.append((torch.cat(logits), engine.keys.clone(), engine.values.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    with torch.inference_mode():  # through the static cache's captured graphs, as the decoders run
        outs = []
        for share in (0.0, 0.5):
            monkeypatch.setattr(fused, "PREFETCH_L2_SHARE", share)
            static.release_all()
            cache = static.StaticCachedModel(model, rows=1, max_length=128, graphs=True, compile=True)
            assert (cache.engine._prefetcher is not None) == (share > 0)
            cache(tokens[:4].view(1, -1))
            outs.append(torch.cat([cache(tokens[i].view(1, 1)) for i in range(4, len(tokens))]))
            if share:
                assert cache.engine._prefetcher[2].tolist() == served
        static.release_all()
    assert torch.equal(outs[0], outs[1])
