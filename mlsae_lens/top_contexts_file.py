"""The explorer's data file, ``top_contexts.safetensors``: saved mid-analysis, completed at its end.

``mlsae-lens analyze`` collects, for every (latent, layer) pair, the top-N activating test tokens,
a uniform sample of its active tokens and a histogram of its activations in its streaming pass
(:class:`~mlsae_lens.activation_samples.LatentContexts`) and saves them to
``top_contexts.safetensors`` beside ``stats.safetensors``, with the same progress, so
``--resume`` continues both. When the pass ends the file is completed with what the explorer
needs to stand alone, without the model or the corpus:

* the test contexts that hold a collected or sampled token (token ids), so windows can be cut
  at any width;
* each decoder row's logit effects through the model's final norm (top 10 positive and
  negative tokens with values; :func:`~mlsae_lens.topk_contexts.decoder_logit_lens`);
* the strings of every token id it mentions.

:mod:`mlsae_lens.explorer` reads it; this module only writes and reads the file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import Tensor

from mlsae_lens.activation_samples import LatentContexts
from mlsae_lens.analysis.layer_stats import read_safetensors, write_safetensors
from mlsae_lens.errors import MLSAEError
from mlsae_lens.run_dir import TOP_CONTEXTS_FILE
from mlsae_lens.topk_contexts import EMPTY_POSITION, decoder_logit_lens

if TYPE_CHECKING:
    from mlsae_lens.models import LanguageModel
    from mlsae_lens.sae import MultiLayerMixin

logger = logging.getLogger(__name__)

_FORMAT = "mlsae_lens.TopContexts/1"
_IDENTITY = ("test_sha256", "sae_sha256", "tokens_target")
LOGIT_LENS_TOKENS = 10
SAMPLES_PER_LAYER = 8
"""Quantile samples kept per (latent, layer) (:mod:`mlsae_lens.activation_samples`)."""
LOGIT_EFFECTS = (
    "(ln_final(d_j) - ln_final(0)) @ W_U minus its mean over the vocabulary, "
    "for the unit decoder row d_j (the logits of a unit-RMS residual along d_j, through the "
    "model's final norm; the same for folded and unfolded norms)"
)


def _read_meta(path: Path) -> dict[str, Any] | None:
    """The JSON metadata of a top-contexts file, or ``None`` if absent or not one."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception:  # a damaged file is rewritten or reported by its reader
        return None
    if header.get("format") != _FORMAT:
        return None
    return json.loads(header["meta"])


def _top_meta(
    contexts: LatentContexts, progress: dict[str, Any], complete: bool
) -> dict[str, Any]:
    return {
        **contexts.meta(),
        "identity": {key: progress.get(key) for key in _IDENTITY},
        "complete": complete,
    }


def save_partial_top_contexts(
    path: Path, contexts: LatentContexts, progress: dict[str, Any]
) -> None:
    """Save the tables mid-analysis (called with every save of ``stats.safetensors``).

    Nothing is written when the file already holds these tokens (the centered pass saves the
    statistics again but leaves the tables alone), so a completed file is never downgraded.
    """
    meta = _read_meta(path)
    if meta is not None and meta.get("n_tokens") == contexts.n_tokens:
        return
    write_safetensors(path, contexts.tensors(), _FORMAT, _top_meta(contexts, progress, False))


_TABLES = (
    "values", "positions", "sample_priority", "sample_positions", "sample_values", "hist_counts"
)


def load_top_contexts(path: Path) -> tuple[LatentContexts, dict[str, Tensor], dict[str, Any]]:
    """The tables, the other tensors of a completed file, and the metadata."""
    try:
        tensors, meta = read_safetensors(path, _FORMAT)
        contexts = LatentContexts.from_saved(tensors, meta)
    except MLSAEError:
        raise
    except Exception as exc:  # safetensors / json raise their own types
        raise MLSAEError(
            f"{path} is damaged ({type(exc).__name__}: {exc}); rerun `mlsae-lens analyze` with "
            "--overwrite"
        ) from exc
    extra = {k: v for k, v in tensors.items() if k not in _TABLES}
    return contexts, extra, meta


def _token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    if tokenizer is None:
        return [f"<{i}>" for i in ids]
    if hasattr(tokenizer, "batch_decode"):
        return list(tokenizer.batch_decode([[i] for i in ids]))
    return [tokenizer.decode([i]) for i in ids]


@torch.inference_mode()
def finalize_top_contexts(
    run_dir: Path,
    contexts: LatentContexts,
    progress: dict[str, Any],
    model: LanguageModel,
    sae: MultiLayerMixin,
    test: Tensor,
) -> Path:
    """Complete ``top_contexts.safetensors`` so the explorer needs neither model nor corpus:
    add the referenced test contexts, the logit effects and the token strings."""
    path = run_dir / TOP_CONTEXTS_FILE
    meta = _read_meta(path)
    top = contexts.top
    if meta is not None and meta.get("complete") and meta.get("n_tokens") == top.n_tokens:
        return path
    positions = top.positions.cpu().reshape(-1)
    if contexts.samples is not None:
        positions = torch.cat([positions, contexts.samples.positions.cpu().reshape(-1)])
    context_size = test.shape[1]
    context_ids = torch.unique(positions[positions != EMPTY_POSITION] // context_size)
    context_tokens = test[context_ids].to(torch.int32)
    lens = decoder_logit_lens(
        sae.W_dec.detach(), model.W_U.detach(), LOGIT_LENS_TOKENS, final_norm=model.ln_final
    )
    vocab_ids = torch.unique(
        torch.cat([context_tokens.reshape(-1).long(), lens[0].reshape(-1), lens[2].reshape(-1)])
    )
    strings = _token_strings(model.tokenizer, vocab_ids.tolist())
    tensors = {
        **contexts.tensors(),
        "context_ids": context_ids,
        "context_tokens": context_tokens,
        "lens_top_ids": lens[0].to(torch.int32),
        "lens_top_values": lens[1],
        "lens_bottom_ids": lens[2].to(torch.int32),
        "lens_bottom_values": lens[3],
        "vocab_ids": vocab_ids,
    }
    meta = {
        **_top_meta(contexts, progress, True),
        "context_size": context_size,
        "vocab_strings": strings,
        "logit_lens": LOGIT_EFFECTS,
    }
    write_safetensors(path, tensors, _FORMAT, meta)
    logger.info("saved the top %d contexts of every latent and layer to %s", top.top_n, path)
    return path


__all__ = [
    "LOGIT_EFFECTS",
    "LOGIT_LENS_TOKENS",
    "SAMPLES_PER_LAYER",
    "finalize_top_contexts",
    "load_top_contexts",
    "save_partial_top_contexts",
]
