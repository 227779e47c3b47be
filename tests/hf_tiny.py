"""Tiny random Hugging Face causal LMs saved to a directory, as a user's own model would be.

``transformers`` builds the model from a config (random weights, seeded), ``tokenizers`` trains
a small BPE tokenizer on a few sentences, and both are written with ``save_pretrained``: the
directory then loads offline exactly like a downloaded checkpoint.
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

CORPUS_LINES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A small model reads every layer of its residual stream one token at a time.",
    "Sparse autoencoders find directions that many layers of a transformer share.",
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "Numbers like 12, 345 and 6789 appear in text as often as words do.",
    "She sells sea shells by the sea shore while the tide comes in slowly.",
]
VOCAB_SIZE = 320


def corpus_text(repeats: int = 20) -> str:
    """A few hundred lines of English: the training corpus of the tiny-model tests."""
    return "\n".join(CORPUS_LINES[(i * 5) % len(CORPUS_LINES)] for i in range(repeats * len(CORPUS_LINES)))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ``VOCAB_SIZE`` entries and ``<eos>`` (id 0)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS_LINES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def save_tiny_causal_lm(kind: str, path: Path, n_layers: int = 2, d_model: int = 16) -> Path:
    """Save a seeded random ``llama`` or ``gpt_neox`` causal LM with its tokenizer to ``path``."""
    tokenizer = tiny_tokenizer()
    common = dict(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model,
        num_hidden_layers=n_layers, num_attention_heads=4, max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common))
    elif kind == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**common))
    else:
        raise ValueError(f"unknown kind {kind!r}")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
