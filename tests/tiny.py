"""The tiny random TransformerLens model and token splits that many tests train on.

One definition, so every test file builds the same model from the same seed.
"""

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mlsae_lens.data import TokenSplits

EOS = 0


class EosTokenizer:
    """Just enough of a tokenizer for special-token masking (TransformerLens reads padding_side)."""

    eos_token_id = EOS
    bos_token_id = None
    pad_token_id = None
    unk_token_id = None
    padding_side = "right"


def tiny_transformer(
    n_layers: int = 3, d_model: int = 16, n_ctx: int = 32, tokenizer: object | None = None
) -> HookedTransformer:
    """A seeded random GELU/LayerNorm transformer with a 64-token vocabulary."""
    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, n_ctx=n_ctx, d_head=4, n_heads=4, d_mlp=32,
        d_vocab=64, act_fn="gelu", normalization_type="LN", device="cpu",
    ))
    if tokenizer is not None:
        model.tokenizer = tokenizer
    return model


def tiny_token_splits() -> TokenSplits:
    """40 random contexts of 16 tokens, an EOS at position 7 of each; the last 8 are the test."""
    tokens = torch.randint(1, 64, (40, 16), generator=torch.Generator().manual_seed(1))
    tokens[:, 7] = EOS  # a document separator in every context
    return TokenSplits(train=tokens[:32], test=tokens[32:], provenance={"source": "random"})


def crash_runner_at(runner, step: int) -> None:
    """Make ``runner`` raise ``RuntimeError("simulated crash")`` when it reaches ``step``, as a
    crash between checkpoints would (the runner's ``step`` is patched on this instance only)."""
    original = runner.trainer.step

    def crashing_step(batch):
        if runner.trainer.n_training_steps == step:
            raise RuntimeError("simulated crash")
        return original(batch)

    runner.trainer.step = crashing_step
