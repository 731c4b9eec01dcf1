"""Triton kernels for a decode step: a few rows against each layer's weights.

Why: a decode step feeds 1-32 tokens, so every matmul is a matrix-vector
product whose time is the bytes of its weight, and everything else in a layer
(norms, rotary, cache writes, attention over a short cache) is a few
microseconds of launch latency each. Measured on an H200 with the layer under
``torch.compile`` (benchmarks/step_profile.py): a Qwen2.5-1.5B layer ran 12-13
kernels in 54 us where its bytes need 22; inductor's batch-1 reductions read
the MLP weights at 1.8-3.1 TB/s of 4.2, and the other ten kernels were latency.
Here a layer is six kernels, each doing all the work between two points where
a whole row must be complete:

1. ``gemv`` with the RMS norm in its prologue and the bias in its epilogue: q, k, v;
2. ``attention``: rotary of q and the new k, their write into the cache, and
   attention over the cache in chunks (each chunk one program; every chunk of the
   cache's capacity is launched, since a graph replays at any position, but one
   past the new tokens returns at once and is not merged), then a small kernel
   that combines the chunks' partial softmaxes;
3. ``gemv`` with the residual add in its epilogue: the output projection;
4. ``gemv`` with the norm in its prologue and SiLU(gate) * up in its epilogue
   (each program computes matching gate and up columns);
5. ``gemv`` with the residual add: the down projection.

Numerics follow transformers' order of rounding where it is observable (the norm
in float32, rounded, then scaled; matmul outputs rounded before the residual or
the activation), with float32 accumulation throughout. Results are
deterministic (a split reduction sums its splits in a fixed order), and on the
tensor-core kernel (steps of up to 16 rows share one 16-row tile; two or three rows
of a small matrix take the row kernel instead, ``takes_row_kernel``) a row's result
does not depend on how many rows are fed with it.

Only the shapes of a decode step: at most ``MAX_ROWS`` rows, fp16/bf16 weights,
a power-of-two head size. ``supports`` says whether a model fits; the caller
(``decoders.fused``) runs its other forward otherwise, and for steps of more than
``fused.KERNEL_ROWS`` rows. On a machine without a
GPU the kernels still run under Triton's interpreter (``TRITON_INTERPRET=1``),
which is how the CPU tests check them.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the fused forward's other paths serve
    triton = None
try:  # grid dependency control (Triton 3.4+); without it, kernels launch one after another
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

# Rows (tokens fed x cache rows) one launch covers; more (a prompt) goes to cuBLAS.
MAX_ROWS = 64
# Cache positions per attention program.
CHUNK = 64


def supports(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether these kernels can run a model of this dtype and head size."""
    return (triton is not None and dtype in (torch.float16, torch.bfloat16)
            and head_dim >= 16 and head_dim & (head_dim - 1) == 0)


def dense(*tensors: torch.Tensor | None) -> bool:
    """Whether every given tensor is contiguous: the kernels address a weight as a dense
    row-major ``(N, K)`` matrix (and a norm or bias as a dense vector), so a strided view
    (a transposed or sliced parameter) would be read wrong."""
    return all(t is None or t.is_contiguous() for t in tensors)


def available(device: torch.device) -> bool:
    """Compiled kernels need a CUDA device (the interpreter serves tests only)."""
    return triton is not None and device.type == "cuda"


# Programmatic dependent launch (Hopper and later) for the row kernel and the two
# attention kernels: each may start while the one before it finishes, and waits for it
# before reading anything a kernel of the step wrote; the chunk kernel loads the cache
# before this step's positions first, the combine the position. A decode step is
# ~150-200 small launches whose own latency is most of their time, so overlapping each
# launch with the tail of the last pays: SmolLM2-135M's step 0.64 -> 0.53 ms, 3% on the
# larger shapes (benchmarks/step_profile.py, variant ``no-pdl``, H200). The tensor-core
# kernel measured slower with it and is launched plainly. False turns it off; the
# interpreter never uses it.
PDL = True
# The row kernel reads its first weight tile before it waits (PDL): no kernel of a step
# writes a weight, so that read's latency can overlap the tail of the kernel before; only
# for a matrix of at most WEIGHTS_FIRST_MAX weights (0: never). One tile in registers at a
# time (a first form that also read the next tile during each K block held two, spilled,
# and cost time: the 1.5B's step 1.71 ms, the 7B's 6.0 against 4.4, H200). H100,
# benchmarks/step_profile.py, ms per one-token replay, this kernel waiting first -> reading
# first: Qwen2.5-1.5B 1.52-1.54 -> 1.44-1.45, 0.5B 0.71-0.74 -> 0.66-0.67, SmolLM2-135M
# 0.49-0.50 -> 0.44-0.45, Llama-2-7B 5.05-5.07 -> 5.02-5.03. Larger matrices lose with it
# (every matrix first: the 1.5B 1.64-1.65, whose gate/up has 27.5M weights; the 7B
# 5.55-5.62); why is not yet measured.
WEIGHTS_FIRST_MAX = 2**24


@functools.cache
def _hopper_or_later(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def _pdl(device: torch.device) -> bool:
    return PDL and gdc_wait is not None and device.type == "cuda" and _hopper_or_later(device)


# Weights fetched into L2 ahead of the products that read them, by a small kernel beside
# the step (``prefetcher``, on a stream of its own that the step joins only at its end):
# layer by layer it waits for the layer's attention kernel to raise a flag, then issues
# one bulk prefetch (``cp.async.bulk.prefetch.L2``, Hopper and later) per piece of the
# layer's table (``prefetch_table``; decoders.fused decides which weights). Why: attention
# and the small products around it leave DRAM idle for several microseconds a layer while
# the gate/up and down products after them are bound by its bandwidth; bytes moved into
# L2 meanwhile are bytes those products read from L2. Why beside the step and not inside
# it: a kernel ends only once its bulk prefetches have landed, so issued from the
# attention kernel they made it wait for them (4.7 -> 13.4 us a layer at 25 MB, and the
# same with a prefetch per 128-byte line; the 1.5B's step 1.57 -> 1.89 ms, H100,
# benchmarks/step_profile.py); a prefetch kernel forked and joined per layer paid on the
# 1.5B (1.50 ms at 12.5 MB) but its 28 forks cost the smaller models their gain. No
# weight is written by a step, so no result changes. Where launches run one after another
# (CUDA_LAUNCH_BLOCKING=1, a kernel profiler that serialises them) the prefetcher waits
# out its whole spin budget (SPIN_LIMIT, about a second) every step.
# fused.PREFETCH_L2_SHARE says how much a layer prefetches (none by default: benchmarks/README.md's
# measurements say why); False here turns it off whatever the share; the interpreter
# never uses it.
L2_PREFETCH = True
# Programs of the prefetcher, and bytes one of its prefetch instructions covers (a table row).
PREFETCH_PROGRAMS = 8
PREFETCH_PIECE = 16384


def _l2_prefetch(device: torch.device) -> bool:
    return bool(L2_PREFETCH) and triton is not None and device.type == "cuda" and _hopper_or_later(device)


def prefetch_table(ranges: list[tuple[int, int]], device: torch.device) -> torch.Tensor | None:
    """The ``(pieces, 2)`` int64 table of ``(address, bytes)`` the prefetcher reads for byte
    ranges ``(address, bytes)`` of device memory: each range cut into pieces of at
    most ``PREFETCH_PIECE`` bytes, 16-byte aligned as the bulk prefetch needs (a range's end
    rounded up within the caching allocator's 512-byte blocks). None where this device does
    not prefetch or nothing is asked."""
    if not _l2_prefetch(device):
        return None
    rows = []
    for address, size in ranges:
        start, end = address & ~15, (address + size + 15) & ~15
        rows += [(a, min(PREFETCH_PIECE, end - a)) for a in range(start, end, PREFETCH_PIECE)]
    return torch.tensor(rows, dtype=torch.int64, device=device) if rows else None


# --- matrix-vector products -------------------------------------------------------------------

# Up to this many rows a launch reduces row by row on CUDA cores; more use tensor
# cores (the row kernel took 2.8x cuBLAS for 5 rows of Qwen2.5-1.5B's gate/up, the
# tensor-core kernel 1.5x: benchmarks/gemv_configs.py --rows 5, H200).
ROW_KERNEL_ROWS = 1
# A small matrix stays on the row kernel up to SMALL_MATRIX_ROWS rows: its launch is
# latency, and the row kernel's (launched to overlap the one before, no split-K partials)
# is the shorter. H100, the row kernel at 2 and 3 rows (benchmarks/gemv_configs.py --rows
# 2,3 --row-kernel-rows 3) against the tensor-core kernel's best at 5 rows (it reads one
# 16-row tile whatever the rows; --rows 5): every matrix of at most 2**22 weights was
# faster on the row kernel (Qwen2.5-1.5B's o 4.6 against 6.2 us, SmolLM2's q/k/v 3.4
# against 5.5), every larger one slower (Qwen2.5-0.5B's down, 4.4M weights: 9.0 against
# 7.6; the 1.5B's gate/up 35 against 25). Whole 2-token steps (benchmarks/step_profile.py
# --tokens 2 --variants default,tensor-core): the 0.5B's 0.87-0.89 ms against 0.98, the
# 1.5B's 1.75-1.76 against 1.87; SmolLM2's 0.69-0.71 against 0.87 with every product on
# the row kernel (--variants default,row-kernel, before this rule).
# At 5 rows the row kernel lost (step_profile --tokens 5 --variants small-matrix-rows, H100: the
# 1.5B's step 1.908-1.974 against 1.896-1.951 ms, SmolLM2's 0.92-0.97 against 0.85-0.88).
SMALL_MATRIX_ROWS = 3
SMALL_MATRIX = 2**22


def takes_row_kernel(rows: int, n: int, k: int, gated: bool = False) -> bool:
    """Whether a launch of ``rows`` rows over an ``(n, k)`` product (``gated``: gate and
    up, ``2n`` outputs) runs the CUDA-core row kernel, else the tensor-core kernel."""
    weights = (2 if gated else 1) * n * k
    return rows <= ROW_KERNEL_ROWS or (rows <= SMALL_MATRIX_ROWS and weights <= SMALL_MATRIX)


def weights_first(n: int, k: int, gated: bool = False) -> bool:
    """Whether the row kernel reads its first weight tile of an ``(n, k)`` product before
    waiting for the kernel before it (``WEIGHTS_FIRST_MAX``)."""
    return (2 if gated else 1) * n * k <= WEIGHTS_FIRST_MAX


def row_block_m(rows: int) -> int:
    """The row kernel's BLOCK_M for ``rows`` rows (it holds every row's sums): 8, the kernel
    as measured (the decoders feed it at most SMALL_MATRIX_ROWS rows), more only where a
    benchmark raises ROW_KERNEL_ROWS."""
    return max(8, triton.next_power_of_2(rows))


def gemv_config(n: int, k: int, rows: int = 1, gated: bool = False,
                norm: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for an ``n``-output, ``k``-input product.

    Row kernel, from benchmarks/gemv_configs.py on an H200 (one row; each rule
    within 10% of the best configuration of every layer matrix of SmolLM2-135M
    and Qwen2.5-0.5B/1.5B): a K block of 2,048 (the whole row where K is 1,024
    or less), one or two output columns per program for a narrow output (so a
    896-wide product is 896 programs: a batch-1 product is bound by the bytes in
    flight), eight for a wide gate/up or an output head. ``norm``: the product
    normalises its rows first (the tensor-core kernel's K block depends on it).
    """
    # Which kernel is part of the cache key, so that setting ROW_KERNEL_ROWS or the small-
    # matrix bounds (benchmarks, tests) takes effect without clearing the cache.
    return _launch_config(n, k, rows, gated, norm, takes_row_kernel(rows, n, k, gated))


@functools.cache
def _launch_config(n: int, k: int, rows: int, gated: bool, norm: bool,
                   row_kernel: bool) -> tuple[int, int, int, int]:
    if row_kernel:
        if n >= 32768:  # an output head
            return 8, (512 if k % 512 == 0 else 256), 4, 1
        block_k = 2048 if k > 1024 else triton.next_power_of_2(k)
        if norm and rows > 1:
            # Every program normalises every row first: fewer, wider programs repeat it less
            # (q/k/v at 2-3 rows, H100: 6.1 against 8.1 us on the 1.5B, 3.4 against 5.2 on SmolLM2).
            return 8, block_k, (8 if k <= 1024 else 4), 1
        if gated:
            block_n = 8 if n >= 4096 else 4
        else:
            block_n = 2 if n * k >= 2**21 and k <= 2048 else 1
        return block_n, block_k, 4, 1
    # Tensor-core kernel, from benchmarks/gemv_configs.py --rows 5 on an H100 (about 40
    # configurations a matrix): 32 outputs a tile (64 on an output head), K blocks of 64
    # where the norm runs in the prologue and 128 elsewhere. Every product of Qwen2.5-0.5B
    # and 1.5B within 7% of its best and up to 20% faster than the rule before (16-32
    # outputs, the largest K block dividing K); SmolLM2's within 10% except its head (15%:
    # K = 576 leaves half of the last block masked), its 5-token step 3% faster all the same.
    return (64 if n >= 32768 else 32), (64 if norm else 128), 4, 3


if triton is not None:

    @triton.jit
    def _row_rstd(x_ptr, rm, M, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        # 1 / RMS of each row of x over all of K, in float32 (x is a few KB: read twice, from cache).
        rk = tl.arange(0, BLOCK_K)
        squares = tl.zeros((BLOCK_M,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ok = (rm < M)[:, None] & ((k0 + rk) < K)[None, :]
            xs = tl.load(x_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=ok, other=0.0).to(tl.float32)
            squares += tl.sum(xs * xs, axis=1)
        return tl.rsqrt(squares / K + eps)

    @triton.jit
    def _rstd_by_row(x_ptr, rm, M, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        # The same, one row at a time: a (BLOCK_K,) piece in registers instead of a
        # (BLOCK_M, BLOCK_K) tile whose rows past M are padding (the row kernel feeds 1-3 rows).
        rk = tl.arange(0, BLOCK_K)
        rstd = tl.zeros((BLOCK_M,), tl.float32)
        for m in range(M):
            squares = 0.0
            for k0 in range(0, K, BLOCK_K):
                xs = tl.load(x_ptr + m * K + k0 + rk, mask=(k0 + rk) < K, other=0.0).to(tl.float32)
                squares += tl.sum(xs * xs)
            rstd = tl.where(rm == m, tl.rsqrt(squares / K + eps), rstd)
        return rstd

    @triton.jit
    def _normed(xs, rstd, g, dtype: tl.constexpr):
        # transformers' RMSNorm: normalise in float32, round to the model's dtype, then scale (rounded).
        return ((xs.to(tl.float32) * rstd).to(dtype).to(tl.float32) * g).to(dtype)

    @triton.jit
    def _epilogue(acc, acc_up, rm, rn, M, N, y_ptr, bias_ptr, res_ptr,
                  BIAS: tl.constexpr, RESIDUAL: tl.constexpr, GATED: tl.constexpr, dtype: tl.constexpr):
        # Bias, rounding to the model's dtype, SiLU(gate) * up, residual, as transformers rounds them.
        m_ok = rm < M
        n_ok = rn < N
        if BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = acc.to(dtype)
        if GATED:
            if BIAS:
                acc_up += tl.load(bias_ptr + N + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            gate = out.to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype)
            out = (silu.to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype)
        y_off = rm[:, None] * N + rn[None, :]
        y_ok = m_ok[:, None] & n_ok[None, :]
        if RESIDUAL:
            res = tl.load(res_ptr + y_off, mask=y_ok, other=0.0)
            out = (res.to(tl.float32) + out.to(tl.float32)).to(dtype)
        tl.store(y_ptr + y_off, out, mask=y_ok)

    @triton.jit
    def _weight_tile(w_ptr, rn, n_ok, N, K, k0, rk, GATED: tl.constexpr):
        # Columns k0 .. k0 + BLOCK_K of the program's weight rows (and of the matching up
        # rows), in the weight's dtype.
        w_ok = n_ok[:, None] & ((k0 + rk) < K)[None, :]
        ws = tl.load(w_ptr + rn[:, None] * K + (k0 + rk)[None, :], mask=w_ok, other=0.0)
        wu = ws
        if GATED:
            wu = tl.load(w_ptr + (rn + N)[:, None] * K + (k0 + rk)[None, :], mask=w_ok, other=0.0)
        return ws, wu

    @triton.jit
    def _rows_times_tile(acc, acc_up, ws, wu, x_ptr, norm_ptr, rstd, rm, M, K, k0, rk,
                         NORM: tl.constexpr, GATED: tl.constexpr, dtype: tl.constexpr):
        # acc[m, :] += prologue(x)[m, k0:k0 + BLOCK_K] . ws (and acc_up with wu), row by row.
        k_ok = (k0 + rk) < K
        wf = ws.to(tl.float32)
        wuf = wu.to(tl.float32)
        if NORM:
            g = tl.load(norm_ptr + k0 + rk, mask=k_ok, other=0.0).to(tl.float32)
        for m in range(M):
            xs = tl.load(x_ptr + m * K + k0 + rk, mask=k_ok, other=0.0)
            if NORM:
                xs = _normed(xs, tl.sum(tl.where(rm == m, rstd, 0.0)), g, dtype)
            xs = xs.to(tl.float32)[None, :]
            row = (rm == m)[:, None]
            acc = tl.where(row, acc + tl.sum(wf * xs, axis=1)[None, :], acc)
            if GATED:
                acc_up = tl.where(row, acc_up + tl.sum(wuf * xs, axis=1)[None, :], acc_up)
        return acc, acc_up

    @triton.jit
    def _gemv_rows_kernel(x_ptr, w_ptr, y_ptr, norm_ptr, bias_ptr, res_ptr, M, N, K, eps,
                          NORM: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, GATED: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PDL: tl.constexpr, WEIGHTS_FIRST: tl.constexpr):
        # y[m, n] = epilogue(sum_k prologue(x)[m, k] * w[n, k]) for M <= BLOCK_M rows: each weight
        # tile is read once and reduced against every row in turn (CUDA cores, float32).
        rm = tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        dtype = w_ptr.dtype.element_ty
        if WEIGHTS_FIRST:  # no kernel writes a weight: the first tile may come before the wait
            ws, wu = _weight_tile(w_ptr, rn, n_ok, N, K, 0, rk, GATED)
        if PDL:  # x and the residual come from the kernels before
            gdc_launch_dependents()
            gdc_wait()
        if not WEIGHTS_FIRST:
            ws, wu = _weight_tile(w_ptr, rn, n_ok, N, K, 0, rk, GATED)
        rstd = tl.zeros((BLOCK_M,), tl.float32)
        if NORM:
            rstd = _rstd_by_row(x_ptr, rm, M, K, eps, BLOCK_M, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        # The first tile apart (no tile carried through the loop: that cost registers).
        acc, acc_up = _rows_times_tile(acc, acc_up, ws, wu, x_ptr, norm_ptr, rstd, rm, M, K, 0, rk,
                                       NORM, GATED, dtype)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            ws, wu = _weight_tile(w_ptr, rn, n_ok, N, K, k0, rk, GATED)
            acc, acc_up = _rows_times_tile(acc, acc_up, ws, wu, x_ptr, norm_ptr, rstd, rm, M, K, k0, rk,
                                           NORM, GATED, dtype)
        _epilogue(acc, acc_up, rm, rn, M, N, y_ptr, bias_ptr, res_ptr, BIAS, RESIDUAL, GATED, dtype)

    @triton.jit
    def _gemv_dot_kernel(x_ptr, w_ptr, y_ptr, norm_ptr, bias_ptr, res_ptr, part_ptr, lock_ptr, M, N, K, eps,
                         NORM: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, GATED: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SPLIT_K: tl.constexpr):
        # The same for a block of BLOCK_M rows on tensor cores (float32 accumulation), K split
        # over SPLIT_K programs so that a narrow output still fills the GPU. Each split stores
        # its float32 partial; the last to arrive at the tile's counter sums them in split
        # order (deterministic: no float atomics), applies the epilogue and resets the counter.
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        dtype = w_ptr.dtype.element_ty
        if NORM:
            rstd = _row_rstd(x_ptr, rm, M, K, eps, BLOCK_M, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_end = tl.minimum((pid_k + 1) * k_per_split, K)
        for k0 in range(pid_k * k_per_split, k_end, BLOCK_K):
            k_ok = (k0 + rk) < K
            xs = tl.load(x_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=m_ok[:, None] & k_ok[None, :],
                         other=0.0)
            if NORM:
                g = tl.load(norm_ptr + k0 + rk, mask=k_ok, other=0.0).to(tl.float32)
                xs = _normed(xs, rstd[:, None], g[None, :], dtype)
            w_ok = n_ok[:, None] & k_ok[None, :]
            ws = tl.load(w_ptr + rn[:, None] * K + (k0 + rk)[None, :], mask=w_ok, other=0.0)
            acc += tl.dot(xs, tl.trans(ws))
            if GATED:
                ws = tl.load(w_ptr + (rn + N)[:, None] * K + (k0 + rk)[None, :], mask=w_ok, other=0.0)
                acc_up += tl.dot(xs, tl.trans(ws))
        if SPLIT_K == 1:
            _epilogue(acc, acc_up, rm, rn, M, N, y_ptr, bias_ptr, res_ptr, BIAS, RESIDUAL, GATED, dtype)
        else:
            rows_padded = tl.num_programs(1) * BLOCK_M
            tile_ok = m_ok[:, None] & n_ok[None, :]
            tile = rm[:, None] * N + rn[None, :]
            split_size = rows_padded * N
            tl.store(part_ptr + pid_k * split_size + tile, acc, mask=tile_ok)
            if GATED:
                tl.store(part_ptr + (SPLIT_K + pid_k) * split_size + tile, acc_up, mask=tile_ok)
            tl.debug_barrier()  # every thread's partial is written before the counter moves
            lock = lock_ptr + pid_m * tl.num_programs(0) + pid_n
            if tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
                acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
                acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
                for split in range(SPLIT_K):
                    acc += tl.load(part_ptr + split * split_size + tile, mask=tile_ok, other=0.0,
                                   cache_modifier=".cg")
                    if GATED:
                        acc_up += tl.load(part_ptr + (SPLIT_K + split) * split_size + tile, mask=tile_ok,
                                          other=0.0, cache_modifier=".cg")
                _epilogue(acc, acc_up, rm, rn, M, N, y_ptr, bias_ptr, res_ptr, BIAS, RESIDUAL, GATED, dtype)
                tl.atomic_xchg(lock, 0)  # ready for the next launch (and the next graph replay)


# Tile counters of split-K launches, per device, made once and never replaced (captured
# graphs hold their address): every launch leaves them at zero, so launches in one
# stream and graph replays share them. Not for concurrent streams. A split launch
# has fewer tiles than twice the multiprocessors (``_split_k``), far below the size.
_LOCK_COUNT = 4096
_LOCKS: dict[torch.device, torch.Tensor] = {}


def _locks(device: torch.device, tiles: int) -> torch.Tensor:
    if tiles > _LOCK_COUNT:
        raise ValueError(f"a split-K launch of {tiles} tiles needs more than {_LOCK_COUNT} counters")
    if device not in _LOCKS:
        _LOCKS[device] = torch.zeros(_LOCK_COUNT, dtype=torch.int32, device=device)
    return _LOCKS[device]


def _split_k(tiles: int, k_blocks: int, device: torch.device) -> int:
    """How many programs share each tile's K on ``device`` (``split_for`` its SM count)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return split_for(tiles, k_blocks, sms)


def split_for(tiles: int, k_blocks: int, sms: int) -> int:
    """How many programs share each tile's K on ``sms`` multiprocessors: about two programs
    per multiprocessor in all, at most one per K block and 16."""
    return max(1, min(k_blocks, -(-2 * sms // tiles), 16))


def tensor_core_launch(m: int, n: int, k: int, config: tuple[int, ...],
                       device: torch.device) -> tuple[int, tuple[int, int], int]:
    """How the tensor-core kernel is launched for ``m`` rows of ``(n, k)`` under ``config``:
    ``(block_m, tiles, split)``, its rows per tile, its grid of output tiles and its K split
    (``config``'s fifth number, else ``_split_k``'s on this device). One place, so that the
    benchmark reports the split the launch takes."""
    block_n, block_k = config[:2]
    block_m = max(16, triton.next_power_of_2(m))
    tiles = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    split = config[4] if len(config) > 4 else _split_k(tiles[0] * tiles[1], triton.cdiv(k, block_k), device)
    return block_m, tiles, split


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         norm: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None,
         gated: bool = False, config: tuple[int, ...] | None = None) -> torch.Tensor:
    """``F.linear`` of ``x`` ``(M, K)`` with ``weight`` ``(N, K)``, with optional fused steps.

    ``norm``: RMS-normalise each row of ``x`` first (weight ``(K,)``, ``eps``).
    ``gated``: ``weight`` is ``[gate; up]`` ``(2N, K)`` and the result is
    ``silu(x @ gate.T) * (x @ up.T)`` ``(M, N)``. ``residual`` ``(M, N)`` is added
    last. ``config`` overrides ``gemv_config`` (benchmarks/gemv_configs.py); on the
    tensor-core kernel a fifth number, if given, sets the K split instead of ``_split_k``.
    """
    m, k = x.shape
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {m}")
    if not dense(weight, bias, norm):
        raise ValueError("gemv reads its weight, bias and norm as dense tensors; pass contiguous ones "
                         "(.contiguous() makes a copy)")
    x = x.contiguous()
    y = torch.empty((m, n), dtype=weight.dtype, device=x.device)
    config = config or gemv_config(n, k, m, gated, norm is not None)
    block_n, block_k, warps, stages = config[:4]
    dummy = weight  # pointer arguments a disabled step never reads
    args = (x, weight, y, norm if norm is not None else dummy, bias if bias is not None else dummy,
            residual.contiguous() if residual is not None else dummy)
    flags = dict(NORM=norm is not None, BIAS=bias is not None, RESIDUAL=residual is not None, GATED=gated,
                 BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    if takes_row_kernel(m, n, k, gated):
        pdl = _pdl(x.device)
        _gemv_rows_kernel[(triton.cdiv(n, block_n),)](*args, m, n, k, eps, BLOCK_M=row_block_m(m), PDL=pdl,
                                                      WEIGHTS_FIRST=weights_first(n, k, gated), launch_pdl=pdl,
                                                      **flags)
        return y
    block_m, tiles, split = tensor_core_launch(m, n, k, config, x.device)
    if split > 1:
        parts = torch.empty((2 if gated else 1) * split * tiles[1] * block_m * n, dtype=torch.float32,
                            device=x.device)
        locks = _locks(x.device, tiles[0] * tiles[1])
    else:
        parts = locks = y  # unread without a split
    _gemv_dot_kernel[(*tiles, split)](*args, parts, locks, m, n, k, eps, BLOCK_M=block_m, SPLIT_K=split,
                                      **flags)
    return y


# --- attention ---------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _prefetch_l2(table_ptr, count, program, programs, THREADS: tl.constexpr):
        # Rows program, program + programs, ... of the (address, bytes) table, one per thread:
        # each a bulk prefetch into L2, issued and not waited for.
        for first in range(program * THREADS, count, programs * THREADS):
            i = first + tl.arange(0, THREADS)
            ok = i < count
            address = tl.load(table_ptr + 2 * i, mask=ok, other=0)
            size = tl.load(table_ptr + 2 * i + 1, mask=ok, other=0).to(tl.int32)
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; "
                "mov.u32 $0, 0; }", "=r,l,r", [address, size], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _prefetcher_kernel(table_ptr, starts_ptr, layers, flag_ptr, THREADS: tl.constexpr,
                           SPIN_LIMIT: tl.constexpr):
        # Beside a step, on a stream nothing waits for until the step's end: layer by layer,
        # waits until the layer's attention kernel has raised flag[0] past it, then prefetches
        # that layer's rows of the table. The step zeroes flag[0] and flag[1] before launching
        # it; flag[1] ends as the count of programs that never gave up waiting.
        program = tl.program_id(0)
        programs = tl.num_programs(0)
        # Bounded over the whole step: a step cut off before its last attention (an exception
        # between launches), or a device that runs this kernel before the step's instead of
        # beside them, must not leave it spinning; it gives up after about a second.
        spins = 0
        for layer in range(layers):
            while (tl.atomic_add(flag_ptr, 0, sem="acquire") <= layer) & (spins < SPIN_LIMIT):
                spins += 1
            first = tl.load(starts_ptr + layer)
            _prefetch_l2(table_ptr + 2 * first, tl.load(starts_ptr + layer + 1) - first, program, programs,
                         THREADS)
        tl.atomic_add(flag_ptr + 1, (spins < SPIN_LIMIT).to(tl.int32))  # programs that never gave up

    @triton.jit
    def _rotary_rows(ptr, row_stride, rows, cols_base, pos, cos_ptr, sin_ptr, mask,
                     D: tl.constexpr):
        # Rows of a (rows, D) head slice rotated by the rotate-half rule at positions ``pos``,
        # in float32: x * cos + [-x[D/2:], x[:D/2]] * sin.
        d = tl.arange(0, D)
        partner = (d + D // 2) % D
        sign = tl.where(d < D // 2, -1.0, 1.0)
        base = ptr + rows[:, None] * row_stride + cols_base[:, None]
        xs = tl.load(base + d[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
        xp = tl.load(base + partner[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + pos[:, None] * D + d[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + pos[:, None] * D + d[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
        return xs * cos + sign[None, :] * xp * sin

    @triton.jit(do_not_specialize=["signal"])  # one compiled kernel for every layer's value
    def _attention_chunk_kernel(qkv_ptr, keys_ptr, values_ptr, cos_ptr, sin_ptr, positions_ptr,
                                part_acc_ptr, part_max_ptr, part_sum_ptr, signal_ptr, signal,
                                n, max_length, chunks, scale,
                                HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr,
                                BLOCK_Q: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr,
                                SIGNAL: tl.constexpr):
        # One program: cache row r, KV head h, cache positions [c * CHUNK, (c + 1) * CHUNK).
        # Its queries are the G = HEADS / KV_HEADS query heads of h times the n new tokens,
        # as query row i = g * n + t (head h * G + g, token t). A chunk past the new tokens
        # does nothing (the combine reads only the chunks up to them).
        G: tl.constexpr = HEADS // KV_HEADS
        QKV: tl.constexpr = (HEADS + 2 * KV_HEADS) * D
        r = tl.program_id(0) // KV_HEADS
        h = tl.program_id(0) % KV_HEADS
        c = tl.program_id(1)
        # The prefetcher may start on this layer's weights (q/k/v's are read by now or soon).
        # Raised before the PDL wait, so it may start while the layer before still reads
        # its down projection; after the wait is untried.
        if SIGNAL:
            if (tl.program_id(0) == 0) & (c == 0):
                tl.atomic_xchg(signal_ptr, signal, sem="release")
        start = tl.load(positions_ptr)  # the new tokens sit at start .. start + n - 1
        if c * CHUNK < start + n:
            d = tl.arange(0, D)
            p = c * CHUNK + tl.arange(0, CHUNK)
            old = p < start
            new = (p >= start) & (p < start + n) & (p < max_length)
            cache_off = ((r * KV_HEADS + h) * max_length + p)[:, None] * D + d[None, :]
            # The cached keys and values first: no kernel of this step writes them, so with
            # PDL their loads overlap the q/k/v projection's tail.
            k_old = tl.load(keys_ptr + cache_off, mask=old[:, None], other=0.0)
            v_old = tl.load(values_ptr + cache_off, mask=old[:, None], other=0.0)
            if PDL:
                gdc_launch_dependents()
                gdc_wait()
            i = tl.arange(0, BLOCK_Q)
            q_ok = i < G * n
            t = i % n
            q = _rotary_rows(qkv_ptr, QKV, r * n + t, (h * G + i // n) * D, start + t, cos_ptr, sin_ptr, q_ok, D)
            # This step's keys from q/k/v, rotated, and its values, written to the cache.
            new_rows = r * n + (p - start)
            k_new = _rotary_rows(qkv_ptr, QKV, new_rows, tl.zeros_like(p) + (HEADS + h) * D, p,
                                 cos_ptr, sin_ptr, new, D).to(keys_ptr.dtype.element_ty)
            tl.store(keys_ptr + cache_off, k_new, mask=new[:, None])
            k = tl.where(new[:, None], k_new, k_old)
            v_new = tl.load(qkv_ptr + new_rows[:, None] * QKV + (HEADS + KV_HEADS + h) * D + d[None, :],
                            mask=new[:, None], other=0.0)
            tl.store(values_ptr + cache_off, v_new, mask=new[:, None])
            v = tl.where(new[:, None], v_new, v_old)

            scores = tl.dot(q.to(k.dtype), tl.trans(k)) * scale  # (BLOCK_Q, CHUNK), float32
            visible = (p[None, :] <= (start + t)[:, None]) & q_ok[:, None]
            scores = tl.where(visible, scores, float("-inf"))
            row_max = tl.max(scores, axis=1)
            safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # a chunk this row sees nothing of
            weights = tl.exp(scores - safe_max[:, None])
            acc = tl.dot(weights.to(v.dtype), v)  # (BLOCK_Q, D)
            part = ((r * KV_HEADS + h) * chunks + c) * BLOCK_Q + i
            tl.store(part_acc_ptr + part[:, None] * D + d[None, :], acc)
            tl.store(part_max_ptr + part, row_max)
            tl.store(part_sum_ptr + part, tl.sum(weights, axis=1))
        # A skipped program neither waits nor writes (its exit lets the next kernel start);
        # chunk 0 always runs and waits, so this kernel still ends after the one before.

    @triton.jit
    def _attention_combine_kernel(part_acc_ptr, part_max_ptr, part_sum_ptr, positions_ptr, out_ptr, n, chunks,
                                  HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr,
                                  BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, CHUNK: tl.constexpr,
                                  PDL: tl.constexpr):
        # One query row's partial softmaxes over the chunks holding positions up to the new
        # tokens merged (BLOCK_C chunks a load, with a running maximum); out is
        # (rows * n, HEADS * D). Rows past G * n are padding.
        G: tl.constexpr = HEADS // KV_HEADS
        rh = tl.program_id(0)
        i = tl.program_id(1)
        r = rh // KV_HEADS
        h = rh % KV_HEADS
        d = tl.arange(0, D)
        ci = tl.arange(0, BLOCK_C)
        used = tl.minimum(tl.cdiv(tl.load(positions_ptr) + n, CHUNK), chunks)
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        run_max = float("-inf")
        total = 0.0
        acc = tl.zeros((D,), tl.float32)
        for c0 in range(0, used, BLOCK_C):
            ok = (c0 + ci) < used
            part = (rh * chunks + c0 + ci) * BLOCK_Q + i
            maxes = tl.load(part_max_ptr + part, mask=ok, other=float("-inf"))
            new_max = tl.maximum(run_max, tl.max(maxes))
            ref = tl.where(new_max == float("-inf"), 0.0, new_max)  # nothing visible yet: all weights 0
            weights = tl.exp(maxes - ref)
            rescale = tl.exp(run_max - ref)
            total = total * rescale + tl.sum(weights * tl.load(part_sum_ptr + part, mask=ok, other=0.0))
            chunk_acc = tl.load(part_acc_ptr + part[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
            acc = acc * rescale + tl.sum(weights[:, None] * chunk_acc, axis=0)
            run_max = new_max
        out = acc / tl.where(total == 0.0, 1.0, total)
        t = i % n
        col = (h * G + i // n) * D
        tl.store(out_ptr + (r * n + t) * (HEADS * D) + col + d, out.to(out_ptr.dtype.element_ty),
                 mask=(d * 0 + i) < G * n)


def prefetcher(table: torch.Tensor, starts: torch.Tensor, flag: torch.Tensor) -> None:
    """Launch, on the current stream, the kernel that prefetches layer i's rows
    ``starts[i]:starts[i + 1]`` of ``table`` once ``flag[0]`` exceeds i (``attention``'s
    ``signal`` raises it); ``flag`` ``(2,)`` int32, zero when the kernel starts; ``flag[1]``
    ends as the number of its programs that never gave up waiting (``PREFETCH_PROGRAMS`` when
    the step ran beside it)."""
    _prefetcher_kernel[(PREFETCH_PROGRAMS,)](table, starts, starts.shape[0] - 1, flag, THREADS=128,
                                                 SPIN_LIMIT=1 << 20, num_warps=4)


# Warps of the attention's chunk kernel. Eight spill less (472 bytes a thread on the 1.5B's
# 128-wide heads against 2,216; none on the 0.5B's against 464: benchmarks/kernel_resources.py)
# but measured within the spread of four (H100, step_profile's attention-warps-8: the 1.5B's
# one-token step 1.478-1.484 against 1.487-1.505 ms, SmolLM2's 0.453-0.457 against 0.442-0.453).
ATTENTION_WARPS = 4


def attention_launch(n: int, heads: int, kv_heads: int, head_dim: int, max_length: int,
                     pdl: bool, signal: bool = False) -> tuple[dict, dict]:
    """The compile-time constants and warps of ``attention``'s two kernels for ``n`` new
    tokens over a cache of ``max_length`` positions: ``(chunk kernel's, merge kernel's)``.
    One place, so that benchmarks/kernel_resources.py compiles what the step launches."""
    block_q = max(16, triton.next_power_of_2(heads // kv_heads * n))
    shared = dict(HEADS=heads, KV_HEADS=kv_heads, D=head_dim, BLOCK_Q=block_q, CHUNK=CHUNK, PDL=pdl)
    block_c = min(32, triton.next_power_of_2(triton.cdiv(max_length, CHUNK)))
    return dict(shared, SIGNAL=signal, num_warps=ATTENTION_WARPS), dict(shared, BLOCK_C=block_c, num_warps=2)


def attention(qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor, positions: torch.Tensor, *, heads: int, kv_heads: int,
              signal: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """Causal attention of the new tokens over the cache, writing their keys and values.

    ``qkv`` ``(rows * n, (heads + 2 * kv_heads) * head_dim)``: this step's
    projections, before rotary. ``keys``/``values`` ``(rows, kv_heads,
    max_length, head_dim)``; ``cos``/``sin`` ``(max_length, head_dim)``, the
    rotary tables by position; ``positions`` ``(n,)`` consecutive, on the device
    (so a graph replays at whatever position ``positions[0]`` holds): token t
    sits at ``positions[0] + t`` and sees every cached position up to its own.
    Returns ``(rows * n, heads * head_dim)``, ready for the output projection.
    ``signal`` ``(flag, value)``: the chunk kernel stores ``value`` in the int32 ``flag``
    as it starts (``prefetcher`` waits for it).
    """
    rows, _, max_length, head_dim = keys.shape
    n = positions.shape[0]
    pdl = _pdl(qkv.device)
    chunk, merge = attention_launch(n, heads, kv_heads, head_dim, max_length, pdl, signal is not None)
    chunks, block_q = triton.cdiv(max_length, CHUNK), chunk["BLOCK_Q"]
    parts = rows * kv_heads * chunks * block_q
    part_acc = torch.empty((parts, head_dim), dtype=torch.float32, device=qkv.device)
    part_max = torch.empty(parts, dtype=torch.float32, device=qkv.device)
    part_sum = torch.empty_like(part_max)
    out = torch.empty((rows * n, heads * head_dim), dtype=qkv.dtype, device=qkv.device)
    qkv = qkv.contiguous()
    _attention_chunk_kernel[(rows * kv_heads, chunks)](
        qkv, keys, values, cos, sin, positions, part_acc, part_max, part_sum,
        *(signal if signal is not None else (positions, 0)),
        n, max_length, chunks, head_dim**-0.5, **chunk, launch_pdl=pdl)
    _attention_combine_kernel[(rows * kv_heads, block_q)](
        part_acc, part_max, part_sum, positions, out, n, chunks, **merge, launch_pdl=pdl)
    return out
