"""Next-token distributions and sampling, shared by all decoders.

Every decoder filters logits the same way (temperature, then top-k, then top-p,
then renormalise) so that ``p_i`` and ``q_i`` in the algorithms are comparable.
Sampling uses the exponential race (``argmax p / E`` with ``E ~ Exp(1)``), which
draws exactly from ``p`` without a host synchronisation, and whose top-k gives
sampling without replacement.
"""

from __future__ import annotations

import torch

from decoders import filter_kernel


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Turn logits ``(..., V)`` into filtered probabilities ``(..., V)`` (float32).

    Temperature 0 gives a one-hot distribution on the argmax. On a GPU a top-k
    filter runs as three kernels (``decoders.filter_kernel``), the same result.
    """
    logits = logits.float()
    if logits.is_cuda and filter_kernel.supports(logits, temperature, top_k):
        return filter_kernel.filtered_probs(logits, temperature, top_k, top_p)
    return filtered_probs_torch(logits, temperature, top_k, top_p)


def filtered_probs_torch(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """``filtered_probs`` in PyTorch operations: the reference, and every filter on a CPU."""
    logits = logits.float()
    if temperature == 0:
        # scatter, not one_hot: one_hot checks its indices on the host, a device
        # synchronisation per call that would stall every queued decode step.
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / temperature
    index = None
    if 0 < top_k < logits.shape[-1]:
        values, index = torch.topk(logits, top_k, dim=-1)  # sorted, descending
        # Tokens tied with the k-th logit stay, as in transformers' top-k.
        logits = logits.masked_fill(logits < values[..., -1:], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p >= 1.0:
        return probs
    if index is not None:
        # Top-p over the top-k survivors only: topk already sorted them, so the
        # nucleus needs no sort of the whole vocabulary (on a 150k vocabulary
        # that sort costs more than a small model's forward).
        sorted_probs = probs.gather(-1, index)
    else:
        sorted_probs, index = torch.sort(probs, dim=-1, descending=True)
    # Drop a token once the mass before it already reaches top_p (the most likely
    # token always stays); tokens tied with the last one kept stay too.
    kept = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    cut = sorted_probs.masked_fill(~kept, float("inf")).amin(-1, keepdim=True)
    probs = probs.masked_fill(probs < cut, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def _exponential(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    # Draw on the generator's device so a CPU generator also drives CUDA decoding.
    e = torch.empty(shape, device=generator.device).exponential_(generator=generator)
    return e.clamp_min_(torch.finfo(e.dtype).tiny).to(device, non_blocking=True)


def uniform(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``U(0, 1)`` samples of ``shape`` on ``device``, drawn from ``generator``."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device, non_blocking=True)


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of ``probs`` ``(..., V)``; returns LongTensor ``(...)``."""
    return (probs / _exponential(probs.shape, generator, probs.device)).argmax(-1)


def sample_many(probs: torch.Tensor, n: int, replacement: bool, generator: torch.Generator) -> torch.Tensor:
    """``n`` indices from a 1-D distribution ``probs`` ``(V,)``.

    Without replacement this is the Gumbel-top-k trick; if fewer than ``n``
    entries are positive, the remaining picks are zero-probability indices,
    which callers must treat as dead (weight 0).
    """
    if replacement:
        race = probs.unsqueeze(0) / _exponential(torch.Size((n, probs.shape[-1])), generator, probs.device)
        return race.argmax(-1)
    race = probs / _exponential(probs.shape, generator, probs.device)
    return torch.topk(race, n, dim=-1).indices


def log_probs_of(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log probs[..., tokens]`` (``-inf`` where the probability is zero)."""
    return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).log()


def row(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for a 0-dim index tensor, without a host sync.

    Plain indexing with a 0-dim tensor converts it to a Python int first, which
    waits for the device; ``index_select`` keeps the index on the device.
    """
    return table.index_select(0, index.view(1)).squeeze(0)
