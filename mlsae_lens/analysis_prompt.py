"""One prompt through the MLSAE: P(L|J) over its tokens and the strongest latent per token.

The report's single-prompt heatmap and per-token view (the paper's IOI prompt by default) come
from here; :func:`tokenize_prompt` also lets ``analyze`` refuse a bad ``--prompt`` before its
long pass over the test split.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mlsae_lens.activations import check_finite, harvest_resid_post
from mlsae_lens.analysis.layer_stats import LayerDistributionStats, Weighting
from mlsae_lens.errors import MLSAEError
from mlsae_lens.models import LanguageModel
from mlsae_lens.sae import MultiLayerMixin

DEFAULT_PROMPT = "When John and Mary went to the store, John gave"
"""The IOI prompt of the paper's single-prompt heatmaps (Wang et al. 2022)."""


def tokenize_prompt(model: LanguageModel, text: str) -> tuple[Tensor, list[str]]:
    """Token ids ``[pos]`` and their strings, with BOS only where the model expects one.

    Raises :class:`MLSAEError` for an empty prompt or one longer than the model's context.
    """
    if not text.strip():
        raise MLSAEError(f"--prompt is empty; pass some text, e.g. {DEFAULT_PROMPT!r}")
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise MLSAEError("the model has no tokenizer, so a text prompt cannot be tokenized")
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    bos = getattr(tokenizer, "bos_token_id", None)
    if model.cfg.default_prepend_bos and bos is not None:
        ids = [int(bos), *ids]
    if len(ids) > model.cfg.n_ctx:
        raise MLSAEError(
            f"--prompt has {len(ids)} tokens but the model's context holds at most "
            f"{model.cfg.n_ctx}; shorten it"
        )
    return torch.tensor(ids, dtype=torch.long), [tokenizer.decode([i]) for i in ids]


@torch.inference_mode()
def analyze_prompt(
    sae: MultiLayerMixin,
    model: LanguageModel,
    text: str,
    weighting: Weighting = "uniform_tokens",
) -> dict[str, Any]:
    """P(L|J) over one prompt's (non-special) tokens and the strongest latent per token.

    Returns a JSON-able dict: ``tokens`` (strings), ``token_ids``, ``latents`` (active on the
    prompt, sorted by the prompt's E[L|J]), ``layer_given_latent`` (one row per listed latent),
    ``expected_layer``, ``top_latent`` (largest total activation over the prompt) and
    ``top_latent_activations`` ``[tokens][layers]``, plus the prompt's own Eq. 11/12 ratios.
    """
    from mlsae_lens.data import special_token_mask

    ids, strings = tokenize_prompt(model, text)
    keep = ~special_token_mask(ids, model.tokenizer)
    if not bool(keep.any()):
        raise MLSAEError(f"--prompt {text!r} holds only special tokens; pass some ordinary text")
    acts = harvest_resid_post(model, ids[None])[0]  # [pos, n_layers, d]
    check_finite(acts, "the prompt")
    topk = sae.encode_topk(acts[keep.to(acts.device)].to(sae.W_enc.device))
    values, indices = topk.values.double().cpu(), topk.indices.cpu()
    stats = LayerDistributionStats(sae.cfg.n_layers, sae.cfg.d_sae, "cpu", weighting)
    stats.update_sparse(indices, values)
    result = stats.compute()
    order = result.latent_order
    totals = torch.zeros(sae.cfg.d_sae, dtype=torch.float64).index_add_(
        0, indices.reshape(-1), values.reshape(-1)
    )
    top = int(totals.argmax())
    top_acts = (values * (indices == top)).sum(-1)  # [tokens, n_layers]
    p_layer = result.layer_given_latent[order]
    row, layer = p_layer.nonzero(as_tuple=True)  # at most tokens * n_layers * k entries
    return {
        "text": text,
        "token_ids": ids[keep].tolist(),
        "tokens": [s for s, k in zip(strings, keep.tolist(), strict=True) if k],
        "n_special_tokens_dropped": int((~keep).sum()),
        "weighting": weighting,
        "latents": order.tolist(),
        "layer_given_latent": {
            "shape": list(p_layer.shape),
            "row": row.tolist(),
            "layer": layer.tolist(),
            "value": p_layer[row, layer].tolist(),
        },
        "expected_layer": result.expected_layer[order].tolist(),
        "top_latent": top,
        "top_latent_total_activation": float(totals[top]),
        "top_latent_activations": top_acts.tolist(),
        "latent_ratio": _json_float(result.latent_ratio),
        "token_ratio": _json_float(result.token_ratio),
    }


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


__all__ = ["DEFAULT_PROMPT", "analyze_prompt", "tokenize_prompt"]
