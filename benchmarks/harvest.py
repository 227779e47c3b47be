"""All-layer harvest (``harvest_resid_post``) against a plain forward on the same tokens."""

import logging
from collections.abc import Callable

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mlsae_lens.activations import harvest_resid_post

logger = logging.getLogger(__name__)


def random_smollm2_shaped(n_layers: int = 30, d_model: int = 576, device: str = "cpu") -> HookedTransformer:
    """A randomly initialised Llama-style model with SmolLM2-135M's shape (no download)."""
    n_heads = max(1, d_model // 64)
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, d_head=64, n_heads=n_heads,
        n_key_value_heads=max(1, n_heads // 3), d_mlp=int(d_model * 8 / 3), d_vocab=49152, n_ctx=2048,
        act_fn="silu", normalization_type="RMS", final_rms=True, gated_mlp=True,
        positional_embedding_type="rotary", rotary_dim=64, rotary_base=100000.0, seed=0, device=device,
    )
    return HookedTransformer(cfg).eval()


def load_benchmark_model(embedded: bool, device: str = "cpu") -> tuple[HookedTransformer, str]:
    """The embedded SmolLM2 if asked for and loadable, else a random model of its shape."""
    if embedded:
        try:
            from mlsae_lens.models import load_model

            return load_model(device=device), "SmolLM2-135M-Instruct (embedded, mlsae_lens.models.load_model)"
        except Exception as err:  # noqa: BLE001 - any failure falls back to the random model
            logger.warning("embedded model unavailable (%s); using a random SmolLM2-shaped model", err)
    return random_smollm2_shaped(device=device), "random TransformerLens model of SmolLM2-135M's shape (30 layers, d 576)"


def harvest_pair(model: HookedTransformer, batch: int, seq: int) -> dict[str, Callable[[], object]]:
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, seq), device=model.cfg.device)

    @torch.inference_mode()
    def forward_blocks() -> object:
        return model(tokens, stop_at_layer=model.cfg.n_layers)

    @torch.inference_mode()
    def forward_logits() -> object:
        return model(tokens)

    return {
        "harvest": lambda: harvest_resid_post(model, tokens),
        "forward_blocks": forward_blocks,
        "forward_logits": forward_logits,
    }
