"""Load the transformer whose residual stream an MLSAE reads: one entry point, two backends.

* ``bridge`` (default; :mod:`mlsae_lens.bridge`): TransformerLens' ``TransformerBridge`` around
  the Hugging Face model itself. Takes the embedded SmolLM2, a local directory holding any
  Hugging Face causal LM the bridge supports, or a hub id. It is the path TransformerLens 4 keeps.
* ``hooked`` (:mod:`mlsae_lens.hooked`): TransformerLens 3's ``HookedTransformer``, for the
  embedded model and TransformerLens model names. Removed in TransformerLens 4.

Both give ``blocks.{l}.hook_resid_post`` equal to the Hugging Face hidden states (the last layer
before the final norm) and the same logits; ``benchmarks/results.md`` compares their speed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import torch

from mlsae_lens.errors import MLSAEError
from mlsae_lens.sources import (
    CACHE_ENV_VAR,
    EMBEDDED_MODEL_NAME,
    check_device,
    embedded_gguf_path,
    hub_unavailable,
    is_embedded_name,
)

__all__ = [
    "CACHE_ENV_VAR",
    "DEFAULT_BACKEND",
    "EMBEDDED_MODEL_NAME",
    "LanguageModel",
    "MODEL_BACKENDS",
    "hub_unavailable",
    "is_embedded_name",
    "load_model",
    "model_provenance",
]

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge

    LanguageModel: TypeAlias = HookedTransformer | TransformerBridge
else:
    # Nothing outside mlsae_lens.hooked imports HookedTransformer at run time: TransformerLens 4
    # removed it, and this alias must not be what breaks the import.
    LanguageModel = Any

ModelBackend = Literal["bridge", "hooked"]
MODEL_BACKENDS: tuple[str, ...] = ("bridge", "hooked")
# Measured on the embedded SmolLM2 (benchmarks/results.md): the bridge equals transformers
# exactly, loads faster and survives TransformerLens 4.
DEFAULT_BACKEND: ModelBackend = "bridge"

_SOURCE_ATTR = "_mlsae_lens_source"


def _looks_like_path(name: str) -> bool:
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or "\\" in name


def load_model(
    name: str = EMBEDDED_MODEL_NAME,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: ModelBackend | str | None = None,
    sae_transformer: bool = False,
) -> Any:
    """Load a model whose ``blocks.{l}.hook_resid_post`` equals the Hugging Face hidden states.

    Args:
        name: ``SmolLM2-135M-Instruct`` (aliases ``smollm2``, ``embedded``; works offline, cached
            on disk after the first load), a local directory holding a Hugging Face causal LM
            (``config.json``, weights, tokenizer; bridge only), a hub id (bridge) or a
            TransformerLens model name (hooked).
        device: torch device for the model.
        dtype: parameter dtype (weights are loaded in float32 first, then cast).
        backend: ``bridge`` (``TransformerBridge``) or ``hooked`` (``HookedTransformer``);
            ``None`` picks :data:`DEFAULT_BACKEND`.
        sae_transformer: return SAELens' SAE-aware subclass (``SAETransformerBridge`` or
            ``HookedSAETransformer``), whose ``run_with_saes`` takes ``MultiLayerSAE.layer_view``.

    Raises:
        MLSAEError: bad backend or device, a directory that is not a supported causal LM,
            hub unreachable, or the embedded model not installed.
    """
    backend = backend or DEFAULT_BACKEND
    if backend not in MODEL_BACKENDS:
        raise MLSAEError(f"unknown model backend {backend!r}; use one of {', '.join(MODEL_BACKENDS)}")
    check_device(device)
    local = not is_embedded_name(name) and _looks_like_path(name)
    if local and not Path(name).expanduser().is_dir():
        raise MLSAEError(
            f"{name} is not a directory; pass a directory written by save_pretrained "
            f"(config.json, weights, tokenizer), a hub id, or {EMBEDDED_MODEL_NAME}"
        )
    if backend == "bridge":
        from mlsae_lens import bridge

        if is_embedded_name(name):
            model, source = bridge.load_embedded(device, dtype, sae_transformer), str(embedded_gguf_path())
        elif local:
            path = Path(name).expanduser().resolve()
            model, source = bridge.load_local(path, device, dtype, sae_transformer), str(path)
        else:
            model, source = bridge.load_hub(name, device, dtype, sae_transformer), f"hf-hub:{name}"
    else:
        from mlsae_lens import hooked

        if local:
            raise MLSAEError(
                f"{name} is a local directory, which only --model-backend bridge loads; "
                "drop --model-backend hooked"
            )
        if is_embedded_name(name):
            model, source = hooked.load_embedded(device, dtype, sae_transformer), str(embedded_gguf_path())
        else:
            model, official = hooked.load_from_hub(name, device, dtype, sae_transformer)
            source = f"hf-hub:{official}"
    setattr(model, _SOURCE_ATTR, source)
    return model


def model_sizes_without_loading(name: str) -> tuple[int, int] | None:
    """``(d_model, n_ctx)`` of a model read from its files without building it, so flags can be
    checked against it before the (slow) load: the embedded model's GGUF header, or a local
    directory's ``config.json``. ``None`` where that is not possible (hub ids, odd configs)."""
    if is_embedded_name(name):
        import gguf

        fields = gguf.GGUFReader(embedded_gguf_path()).fields

        def field(key: str) -> int:
            f = fields[key]
            return int(f.parts[f.data[0]][0])

        return field("llama.embedding_length"), field("llama.context_length")
    config_file = Path(name).expanduser() / "config.json"
    if not config_file.is_file():
        return None
    import json

    config = json.loads(config_file.read_text())
    config = config.get("text_config", config)
    d_model = next((config[k] for k in ("hidden_size", "n_embd", "d_model") if k in config), None)
    n_ctx = next((config[k] for k in ("max_position_embeddings", "n_positions", "n_ctx") if k in config), None)
    if not isinstance(d_model, int) or not isinstance(n_ctx, int):
        return None
    return d_model, n_ctx


def model_backend(model: Any) -> str:
    """``bridge`` or ``hooked``: which backend built ``model`` (by its class)."""
    from mlsae_lens.bridge import is_bridge

    return "bridge" if is_bridge(model) else "hooked"


def model_provenance(model: Any) -> dict[str, Any]:
    """JSON-able description of where a model came from, for run metadata."""
    cfg = model.cfg
    return {
        "model_name": cfg.model_name,
        "backend": model_backend(model),
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "source": getattr(model, _SOURCE_ATTR, "unknown"),
        "dtype": str(cfg.dtype).removeprefix("torch."),
    }
