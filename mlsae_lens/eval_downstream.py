"""Downstream metrics: next-token CE and KL with a reconstruction spliced into one layer.

Splicing: the reconstruction replaces ``blocks.{l}.hook_resid_post`` at non-special positions
(special positions keep the clean activation), and the rest of the model runs from there with
``model(resid, start_at_layer=l + 1)``, so layers 0..l are not recomputed. CE and KL are
averaged over the positions whose input and target tokens are both non-special, the same
positions for the clean and every spliced run. Names follow ``sae_lens.evals``.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mlsae_lens.activations import resid_post_hook_names
from mlsae_lens.errors import MLSAEError
from mlsae_lens.models import LanguageModel

ZERO_ABLATION = "zero_ablation"
MEAN_ABLATION = "mean_ablation"


def prediction_mask(special_mask: Tensor) -> Tensor:
    """``[batch, pos]`` special mask → ``[batch, pos - 1]``: position t predicts token t + 1 and
    counts only where neither the input t nor the target t + 1 is special."""
    return ~special_mask[:, :-1] & ~special_mask[:, 1:]


def next_token_log_probs(logits: Tensor) -> Tensor:
    """Log-probabilities of the next token at every position but the last, in float32."""
    return logits[:, :-1].float().log_softmax(-1)


def cross_entropy(log_probs: Tensor, tokens: Tensor) -> Tensor:
    """Per-position next-token CE ``[batch, pos - 1]`` from :func:`next_token_log_probs`."""
    return -log_probs.gather(-1, tokens[:, 1:, None].to(log_probs.device)).squeeze(-1)


def kl_divergence(clean_log_probs: Tensor, log_probs: Tensor) -> Tensor:
    """KL(clean ‖ spliced) per position (summed over the vocabulary), ``[batch, pos - 1]``."""
    return (clean_log_probs.exp() * (clean_log_probs - log_probs)).sum(-1)


def splice(clean: Tensor, replacement: Tensor, special_mask: Tensor) -> Tensor:
    """``replacement`` at non-special positions, ``clean`` at special ones (``[batch, pos, d]``)."""
    return torch.where(special_mask[..., None].to(clean.device), clean, replacement.to(clean.dtype))


@torch.inference_mode()
def logits_from_layer(model: Any, resid: Tensor, layer: int, tokens: Tensor | None = None) -> Tensor:
    """Logits of the model run from ``blocks.{layer}.hook_resid_post`` = ``resid`` onwards.

    ``HookedTransformer`` starts at block ``layer + 1`` (``start_at_layer``). TransformerBridge
    has no ``start_at_layer`` (it runs the Hugging Face forward as a whole), so there the
    forward reruns from ``tokens`` and a hook replaces the layer's output with ``resid``.
    """
    from mlsae_lens.bridge import is_bridge

    if not is_bridge(model):
        return model(resid.to(model.cfg.device), start_at_layer=layer + 1)
    if tokens is None:
        raise MLSAEError("logits_from_layer needs the tokens for a TransformerBridge model")
    resid = resid.to(model.cfg.device)
    hook = (f"blocks.{layer}.hook_resid_post", lambda act, hook: resid.to(act.dtype))
    return model.run_with_hooks(tokens.to(model.cfg.device), fwd_hooks=[hook])


@torch.inference_mode()
def spliced_losses(
    model: LanguageModel,
    tokens: Tensor,
    clean_log_probs: Tensor,
    resid: Tensor,
    layer: int,
) -> tuple[Tensor, Tensor]:
    """Per-position CE and KL(clean ‖ spliced) ``[batch, pos - 1]`` with ``resid`` (already
    spliced) as layer ``layer``'s residual stream; mask them with :func:`prediction_mask`."""
    log_probs = next_token_log_probs(logits_from_layer(model, resid, layer, tokens))
    return cross_entropy(log_probs, tokens), kl_divergence(clean_log_probs, log_probs)


@torch.inference_mode()
def clean_run(model: LanguageModel, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Clean logits ``[batch, pos, vocab]`` and every layer's ``hook_resid_post``
    ``[batch, pos, n_layers, d]`` from one forward pass."""
    names = resid_post_hook_names(model.cfg.n_layers)
    logits, cache = model.run_with_cache(
        tokens.to(model.cfg.device), names_filter=lambda name: name in names
    )
    return logits, torch.stack([cache[name] for name in names], dim=2).float()


class DownstreamStats:
    """Sums of CE and KL over predicted positions, per method and evaluated layer."""

    def __init__(self, methods: Sequence[str], n_layers: int):
        self.n = 0
        self.clean_ce = 0.0
        self.ce = {m: torch.zeros(n_layers, dtype=torch.float64) for m in methods}
        self.kl = {m: torch.zeros(n_layers, dtype=torch.float64) for m in methods}

    def add_clean(self, ce: Tensor, mask: Tensor) -> None:
        self.n += int(mask.sum())
        self.clean_ce += float(ce[mask].double().sum())

    def add(self, method: str, index: int, ce: Tensor, kl: Tensor, mask: Tensor) -> None:
        self.ce[method][index] += ce[mask].double().sum().cpu()
        self.kl[method][index] += kl[mask].double().sum().cpu()

    def mean(self, method: str) -> tuple[Tensor, Tensor]:
        n = max(self.n, 1)
        return self.ce[method] / n, self.kl[method] / n


def downstream_scores(stats: DownstreamStats, method: str) -> dict[str, Tensor]:
    """SAELens' downstream metrics for one method, per evaluated layer.

    ``ce_loss_score`` = (CE_zero − CE_method) / (CE_zero − CE_clean) (fraction of loss recovered
    relative to zero-ablation, as in ``sae_lens.evals``); ``*_mean_ablation`` relative to
    replacing the layer by its dataset mean; ``kl_div_score`` = (KL_zero − KL_method) / KL_zero.
    """
    ce, kl = stats.mean(method)
    clean = stats.clean_ce / max(stats.n, 1)
    ce_zero, kl_zero = stats.mean(ZERO_ABLATION)
    ce_mean, kl_mean = stats.mean(MEAN_ABLATION)
    return {
        "ce_loss_with_sae": ce,
        "delta_ce": ce - clean,
        "kl_div_with_sae": kl,
        "ce_loss_score": (ce_zero - ce) / (ce_zero - clean),
        "ce_loss_score_mean_ablation": (ce_mean - ce) / (ce_mean - clean),
        "kl_div_score": (kl_zero - kl) / kl_zero,
        "kl_div_score_mean_ablation": (kl_mean - kl) / kl_mean,
    }



__all__ = [
    "MEAN_ABLATION",
    "ZERO_ABLATION",
    "DownstreamStats",
    "clean_run",
    "cross_entropy",
    "downstream_scores",
    "kl_divergence",
    "logits_from_layer",
    "next_token_log_probs",
    "prediction_mask",
    "splice",
    "spliced_losses",
]
