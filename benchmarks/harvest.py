"""All-layer harvest (``harvest_resid_post``) against a plain forward on the same tokens, for
both model backends (TransformerBridge and HookedTransformer)."""

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformerConfig

from mlsae_lens.activations import harvest_resid_post
from mlsae_lens.bridge import is_bridge

logger = logging.getLogger(__name__)


def random_smollm2_shaped_pair(n_layers: int = 30, d_model: int = 576, device: str = "cpu") -> dict[str, Any]:
    """The same random Llama (SmolLM2-135M's shape) through both backends: a transformers model
    wrapped by TransformerBridge, and its TransformerLens conversion."""
    from tokenizers import Tokenizer, models
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from mlsae_lens import bridge, hooked

    n_heads = max(1, d_model // 64)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=49152, hidden_size=d_model, intermediate_size=int(d_model * 8 / 3),
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=max(1, n_heads // 3),
        max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True,
    )).eval()
    cfg = HookedTransformerConfig.from_dict({**hooked._smollm2_config_dict(hf.config), "device": device})
    with torch.no_grad():
        hooked_model = hooked.hooked_transformer_from_state_dict(cfg, convert_llama_weights(hf, cfg))
    with tempfile.TemporaryDirectory() as folder:  # the bridge reads its tokenizer from a directory
        PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<eos>": 0}, unk_token="<eos>")),
                                eos_token="<eos>").save_pretrained(folder)
        bridge_model = bridge._boot("random-llama", hf, bridge._load_tokenizer(Path(folder)),
                                    device, torch.float32, sae_transformer=False)
    return {"bridge": bridge_model, "hooked": hooked_model}


def load_benchmark_models(embedded: bool, shape: tuple[int, int], device: str = "cpu") -> tuple[dict[str, Any], str]:
    """The embedded SmolLM2 through both backends if asked for and loadable, else a random model
    of the given shape (through both)."""
    if embedded:
        try:
            from mlsae_lens.models import load_model

            return ({b: load_model(device=device, backend=b) for b in ("bridge", "hooked")},
                    "SmolLM2-135M-Instruct (embedded, mlsae_lens.models.load_model)")
        except Exception as err:  # noqa: BLE001 - any failure falls back to the random model
            logger.warning("embedded model unavailable (%s); using a random SmolLM2-shaped model", err)
    return (random_smollm2_shaped_pair(*shape, device=device),
            f"random Llama of SmolLM2-135M's architecture ({shape[0]} layers, d {shape[1]})")


def harvest_pair(model: Any, batch: int, seq: int) -> dict[str, Callable[[], object]]:
    """Harvest, a forward through the blocks only (the same compute) and a full forward.

    TransformerBridge's ``stop_at_layer`` still runs the final norm and unembedding, so its
    forward through the blocks ends the way the harvest does, by an exception from the last
    block's hook, but without writing any activation.
    """
    from mlsae_lens.activations import _StopForward

    tokens = torch.randint(0, model.cfg.d_vocab, (batch, seq), device=model.cfg.device)
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"

    def stop(act: torch.Tensor, hook: Any) -> None:
        raise _StopForward

    @torch.inference_mode()
    def forward_blocks() -> object:
        if not is_bridge(model):
            return model(tokens, stop_at_layer=model.cfg.n_layers)
        with model.hooks(fwd_hooks=[(last, stop)]):
            try:
                model(tokens)
            except _StopForward:
                return None
        raise RuntimeError(f"the hook {last} did not run")

    @torch.inference_mode()
    def forward_logits() -> object:
        return model(tokens)

    return {
        "harvest": lambda: harvest_resid_post(model, tokens),
        "forward_blocks": forward_blocks,
        "forward_logits": forward_logits,
    }
