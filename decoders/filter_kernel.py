"""``probs.filtered_probs`` with top-k as three Triton kernels instead of about fifteen.

Why: at temperature > 0 every draft step and every verification turns a vocabulary
of up to 150k logits into filtered probabilities. In PyTorch that is a top-k, a
masked softmax, a gather, a cumulative sum and four more masks and reductions,
each a launch of a few microseconds inside the captured graph: about 0.15 ms a
step (a 0.5B draft step 0.90 against 0.75 ms greedy, H100,
benchmarks/loop_profile.py), so at T=1 an assisted decoder paid it gamma + 1
times an iteration (a graph replay of the filter on a 151,936-token vocabulary: 155 us in
PyTorch, 24.5 us here; H100, benchmarks/filter_cost.py). Here, over chunks of the vocabulary:

1. ``_chunk_top_kernel``: each chunk's k largest scaled logits (with multiplicity);
2. ``_chunk_mass_kernel``: every program merges the chunks' candidates into the
   row's k largest (the k-th is the top-k threshold, the first the softmax's
   maximum), then sums its chunk's ``exp(l - max)`` and counts its tokens at or
   above the threshold;
3. ``_write_kernel``: merges again, takes the softmax's normaliser from the
   chunks' sums, runs top-p over the k sorted probabilities (tokens tied with the
   k-th beyond the k counted in), and writes the row's probabilities.

The result is ``probs.filtered_probs_torch``'s, to float32 rounding: the same
threshold on the same scaled logits (ties with the k-th logit stay), the same
nucleus over the k sorted survivors, the same renormalisation (tests/test_filter_kernel.py).
Only top-k filters (a top-p without top-k needs a sort of the whole vocabulary)
with k at most ``MAX_K``; ``supports`` says which.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch filter serves
    triton = None

MAX_K = 64
# Vocabulary positions per program: 38 programs a row for a 150k vocabulary.
CHUNK = 4096


def supports(logits: torch.Tensor, temperature: float, top_k: int) -> bool:
    """Whether the kernels serve this filter: float32 logits, temperature above 0 and a top-k
    of at most ``MAX_K`` below the vocabulary size (the caller checks the device: a CUDA
    tensor, or Triton's interpreter in the tests)."""
    return (triton is not None and logits.dtype == torch.float32 and temperature > 0
            and 0 < top_k <= MAX_K and top_k < logits.shape[-1])


if triton is not None:

    @triton.jit
    def _k_largest(vals, idx, k, BLOCK_K: tl.constexpr):
        # The k largest of vals (with multiplicity; idx their positions, 0..len-1), in
        # descending order in the first k places of a BLOCK_K vector (-inf after), one
        # maximum at a time.
        j = tl.arange(0, BLOCK_K)
        top = tl.full((BLOCK_K,), float("-inf"), tl.float32)
        for i in range(k):
            best, at = tl.max(vals, 0, return_indices=True, return_indices_tie_break_left=True)
            top = tl.where(j == i, best, top)
            vals = tl.where(idx == at, float("-inf"), vals)
        return top

    @triton.jit
    def _scaled_chunk(logits_ptr, row, c, vocab, inv_temperature, CHUNK: tl.constexpr):
        # Chunk c of a row's logits times 1 / T (-inf past the vocabulary), and their positions.
        p = c * CHUNK + tl.arange(0, CHUNK)
        vals = tl.load(logits_ptr + row * vocab + p, mask=p < vocab, other=float("-inf")) * inv_temperature
        return vals, p

    @triton.jit
    def _row_top(cand_ptr, row, chunks, k, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
        # The row's k largest scaled logits, merged from its chunks' candidates, with the
        # first of them (the softmax's maximum) and the k-th (the top-k threshold).
        idx = tl.arange(0, BLOCK_C * BLOCK_K)
        vals = tl.load(cand_ptr + row * BLOCK_C * BLOCK_K + idx, mask=idx // BLOCK_K < chunks,
                       other=float("-inf"))
        top = _k_largest(vals, idx, k, BLOCK_K)
        high = tl.max(top, 0)
        kth = tl.min(tl.where(tl.arange(0, BLOCK_K) < k, top, float("inf")), 0)
        return top, high, kth

    @triton.jit
    def _chunk_top_kernel(logits_ptr, cand_ptr, vocab, inv_temperature, k,
                          BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1)
        vals, _ = _scaled_chunk(logits_ptr, row, c, vocab, inv_temperature, CHUNK)
        top = _k_largest(vals, tl.arange(0, CHUNK), k, BLOCK_K)
        tl.store(cand_ptr + (row * BLOCK_C + c) * BLOCK_K + tl.arange(0, BLOCK_K), top)

    @triton.jit
    def _chunk_mass_kernel(logits_ptr, cand_ptr, mass_ptr, count_ptr, vocab, inv_temperature, k, chunks,
                           BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1)
        _, high, kth = _row_top(cand_ptr, row, chunks, k, BLOCK_C, BLOCK_K)
        vals, _ = _scaled_chunk(logits_ptr, row, c, vocab, inv_temperature, CHUNK)
        kept = vals >= kth
        tl.store(mass_ptr + row * BLOCK_C + c, tl.sum(tl.where(kept, tl.exp(vals - high), 0.0), 0))
        tl.store(count_ptr + row * BLOCK_C + c, tl.sum(kept.to(tl.int32), 0))

    @triton.jit
    def _write_kernel(logits_ptr, cand_ptr, mass_ptr, count_ptr, out_ptr, vocab, inv_temperature, k, chunks,
                      top_p, NUCLEUS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                      CHUNK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1)
        top, high, kth = _row_top(cand_ptr, row, chunks, k, BLOCK_C, BLOCK_K)
        in_k = tl.arange(0, BLOCK_K) < k
        cs = tl.arange(0, BLOCK_C)
        total = tl.sum(tl.load(mass_ptr + row * BLOCK_C + cs, mask=cs < chunks, other=0.0), 0)
        vals, p = _scaled_chunk(logits_ptr, row, c, vocab, inv_temperature, CHUNK)
        probs = tl.where(vals >= kth, tl.exp(vals - high) / total, 0.0)
        if NUCLEUS:
            # The nucleus over the k sorted survivors (as the PyTorch filter gathers them): a
            # token stays while the mass before it is below top_p; the cut is the smallest
            # survivor kept, and every token at or above it stays.
            # The cut is taken as a logit, and tokens are kept by comparing logits: the
            # compiler may fuse a product into the exponent's subtraction (an FMA) in one
            # place and not another, so a probability recomputed here need not equal the
            # sorted one bit for bit, and the token at the cut could fall out of the write
            # while its mass stays in the normaliser. The scaled logits are rounded once,
            # the same everywhere; probabilities are monotone in them.
            sorted_probs = tl.where(in_k, tl.exp(top - high) / total, 0.0)
            before = tl.cumsum(sorted_probs, 0) - sorted_probs
            cut = tl.min(tl.where(in_k & (before < top_p), top, float("inf")), 0)
            # What survives, renormalised: the k survivors at or above the cut, and the
            # tokens tied with the k-th beyond the k (all of the k-th's probability).
            ties = tl.sum(tl.load(count_ptr + row * BLOCK_C + cs, mask=cs < chunks, other=0), 0) - k
            p_kth = tl.exp(kth - high) / total
            kept_mass = tl.sum(tl.where(in_k & (top >= cut), sorted_probs, 0.0), 0)
            kept_mass += tl.where(kth >= cut, ties.to(tl.float32) * p_kth, 0.0)
            probs = tl.where(vals >= cut, probs, 0.0) / kept_mass
        tl.store(out_ptr + row * vocab + p, probs, mask=p < vocab)


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """``probs.filtered_probs`` for a filter ``supports`` accepts; ``logits`` ``(..., V)`` float32."""
    shape = logits.shape
    vocab = shape[-1]
    flat = logits.reshape(-1, vocab).contiguous()
    rows = flat.shape[0]
    chunks = triton.cdiv(vocab, CHUNK)
    block_c = triton.next_power_of_2(chunks)
    block_k = triton.next_power_of_2(top_k)
    cand = torch.empty((rows, block_c, block_k), dtype=torch.float32, device=logits.device)
    mass = torch.empty((rows, block_c), dtype=torch.float32, device=logits.device)
    count = torch.empty((rows, block_c), dtype=torch.int32, device=logits.device)
    out = torch.empty_like(flat)
    grid = (rows, chunks)
    # The reciprocal as PyTorch's CUDA division by a scalar takes it (1 / T in float32, then a
    # product), so that the scaled logits, and the ties among them, are the PyTorch filter's.
    inv_t = (torch.tensor(1.0) / torch.tensor(temperature, dtype=torch.float32)).item()
    common = dict(BLOCK_C=block_c, BLOCK_K=block_k, CHUNK=CHUNK)
    _chunk_top_kernel[grid](flat, cand, vocab, inv_t, top_k, **common)
    _chunk_mass_kernel[grid](flat, cand, mass, count, vocab, inv_t, top_k, chunks, **common)
    _write_kernel[grid](flat, cand, mass, count, out, vocab, inv_t, top_k, chunks, top_p, NUCLEUS=top_p < 1.0,
                        **common)
    return out.view(shape)
