"""A tiny random target/draft pair with a character tokenizer, built offline.

Used by smoke profiles, the demo and the tests: it exercises every code path
(save, load, tokenize, decode) in seconds on a CPU with nothing downloaded.
The draft reuses the target's embeddings, first layer, final norm and head, so
the two agree often enough for assisted decoding to accept some drafts.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
#: Bump when the construction changes, so cached copies are rebuilt.
TINY_VERSION = 1


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII plus newline."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(vocab_size: int, layers: int, hidden: int = 64) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_tiny_pair(seed: int = 0, target_layers: int = 2) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """Random target and a 1-layer draft derived from it (deterministic in ``seed``)."""
    vocab = len(SPECIAL_TOKENS) + len(CHARACTERS)
    # Model constructors draw from the global RNG; fork it so callers' state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        target = LlamaForCausalLM(tiny_config(vocab, target_layers)).eval()
        draft = LlamaForCausalLM(tiny_config(vocab, 1)).eval()
    draft_state = {k: v for k, v in target.state_dict().items() if not k.startswith("model.layers.")}
    draft_state.update({k: v for k, v in target.state_dict().items() if k.startswith("model.layers.0.")})
    draft.load_state_dict(draft_state)
    return target, draft


def write_tiny_pair(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Save the tiny pair and its tokenizer as two local model folders."""
    target, draft = build_tiny_pair(seed)
    tok = char_tokenizer()
    paths = []
    for name, model in (("target", target), ("draft", draft)):
        path = Path(folder) / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]
