"""Prompt sets: read from a profile, tokenised once for every decoder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from harness import scorers
from harness.profile_spec import PromptsSpec


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    text: str
    input_ids: torch.Tensor  # (1, n) on CPU


def read_prompt_texts(spec: PromptsSpec, base_dir: str) -> list[tuple[str, str]]:
    """``(prompt_id, text)`` pairs from the profile's list or JSONL file."""
    if spec.items:
        pairs = [(f"p{i:04d}", text) for i, text in enumerate(spec.items)]
    elif spec.source:
        pairs = scorers.source_prompts(spec)
    else:
        path = Path(base_dir) / spec.file
        pairs = []
        with path.open() as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({err})") from None
                if spec.field not in row:
                    raise ValueError(f"{path}:{line_no}: no field {spec.field!r} (fields: {', '.join(row)})")
                pid = str(row[spec.id_field]) if spec.id_field else f"p{len(pairs):04d}"
                pairs.append((pid, str(row[spec.field])))
    if spec.limit is not None:
        pairs = pairs[: spec.limit]
    ids = [pid for pid, _ in pairs]
    if len(set(ids)) != len(ids):
        raise ValueError("prompt ids must be unique; check prompts.id_field")
    return pairs


def tokenize_prompts(spec: PromptsSpec, base_dir: str, tokenizer: PreTrainedTokenizerBase) -> list[Prompt]:
    """Tokenise every prompt, through the chat template when the profile asks for it."""
    if spec.chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompts.chat_template is true but the tokenizer has no chat template")
    prompts = []
    for pid, text in read_prompt_texts(spec, base_dir):
        if spec.chat_template:
            messages = ([{"role": "system", "content": spec.system}] if spec.system else []) + [
                {"role": "user", "content": text}
            ]
            rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            # The template already holds the special tokens; don't add a second BOS.
            ids = tokenizer(rendered, add_special_tokens=False).input_ids
        else:
            ids = tokenizer(text).input_ids
        if not ids:
            raise ValueError(f"prompt {pid} tokenises to nothing")
        prompts.append(Prompt(pid, text, torch.tensor([ids], dtype=torch.long)))
    return prompts


def context_length(model) -> int | None:
    """Positions ``model`` was built for (``max_position_embeddings``), or None if its config says none."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_context_length(prompts: list[Prompt], max_new_tokens: int, models: dict[str, object]) -> None:
    """Refuse prompts that, with ``max_new_tokens`` new tokens, do not fit a model's positions.

    Decoders never draft past ``max_new_tokens``, so a generation needs at most
    ``prompt tokens + max_new_tokens`` positions of the target and of the draft.

    Args:
        prompts: the tokenised prompts.
        max_new_tokens: the profile's ``generation.max_new_tokens``.
        models: model spec -> loaded model, for every model that decodes.

    Raises:
        ValueError: naming the longest prompt that does not fit (and how many do not).
    """
    for spec, model in models.items():
        limit = context_length(model)
        if limit is None:
            continue
        too_long = [p for p in prompts if p.input_ids.shape[1] + max_new_tokens > limit]
        if not too_long:
            continue
        worst = max(too_long, key=lambda p: p.input_ids.shape[1])
        n = worst.input_ids.shape[1]
        ids = ", ".join(p.prompt_id for p in too_long[:5]) + (", ..." if len(too_long) > 5 else "")
        others = f" ({len(too_long)} prompts do not fit: {ids})" if len(too_long) > 1 else ""
        fix = "shorten or drop it" + (
            f", or lower generation.max_new_tokens to at most {limit - n}" if limit - n >= 1 else "")
        raise ValueError(
            f"prompt {worst.prompt_id} has {n} tokens and with generation.max_new_tokens={max_new_tokens} needs "
            f"{n + max_new_tokens} positions, but {spec} has max_position_embeddings {limit}{others}; {fix}"
        )


def stop_check(tokenizer: PreTrainedTokenizerBase, stops: list[str] | tuple[str, ...]):
    """A decoder ``should_stop`` that ends generation once any of ``stops`` appears in the new text.

    ``None`` without stop strings. Decoding a short tail after each step is enough
    to see a stop string that just appeared; the step's tokens are kept whole.
    """
    stops = [s for s in stops if s]
    if not stops:
        return None
    longest = max(len(s) for s in stops)

    def should_stop(tokens: list[int]) -> bool:
        tail = tokenizer.decode(tokens[-(longest + 8):], skip_special_tokens=False)
        return any(s in tail for s in stops)

    return should_stop
