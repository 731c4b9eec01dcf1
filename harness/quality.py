"""Output quality under the target model."""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel


@torch.inference_mode()
def output_perplexity(target: PreTrainedModel, prompt_ids: torch.Tensor, new_tokens: torch.Tensor) -> float:
    """``exp(-mean_j log p(y_j | y_<j))`` over the generated tokens.

    Uses the UNFILTERED target (plain log-softmax, no temperature/top-k/top-p),
    in one forward over prompt + output, so every decoder is judged alike.
    """
    device = target.get_input_embeddings().weight.device
    seq = torch.cat([prompt_ids[0].cpu(), new_tokens.cpu()]).to(device).view(1, -1)
    n_prompt, n_new = prompt_ids.shape[1], new_tokens.shape[0]
    logits = target(input_ids=seq, use_cache=False, logits_to_keep=n_new + 1).logits[0, :n_new].float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, seq[0, n_prompt:].view(-1, 1))
    return math.exp(-float(logp.mean()))
