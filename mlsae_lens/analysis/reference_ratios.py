"""The reference code's per-batch Eq. 11/12 estimator: one-shot and streamed through an analysis.

The paper defines the ratios over the whole token set (:class:`LayerDistributionStats`); the
published reference code (tim-lawson/mlsae) forms them per batch of 2,048 tokens and averages
the per-batch ratios (:func:`reference_per_batch_ratios`, over batches given at once).
:class:`ReferenceRatioStats` cuts a token stream into such fixed batches whatever the model
batches are, so the run report can show both estimators side by side. Memory: one batch's
``[d_sae, n_layers]`` float64 sums plus two floats per finished batch. Its state round-trips
through :meth:`ReferenceRatioStats.state_dict`, so a resumed analysis gives the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from mlsae_lens.analysis.layer_result import item_or_nan, ratio_or_nan
from mlsae_lens.analysis.layer_stats import LayerDistributionStats
from mlsae_lens.errors import MLSAEError

REFERENCE_BATCH_TOKENS = 2048
"""Tokens per batch of the reference code's evaluation."""


def reference_per_batch_ratios(
    latent_acts_batches: Iterable[Tensor | tuple[Tensor, Tensor]],
    n_latents: int | None = None,
) -> dict[str, Any]:
    """Eq. 11-12 ratios as the published reference code estimates them, for comparison.

    This is the most literal reading of a description of what the reference (tim-lawson/mlsae)
    does, not checked line by line against its source; use it only to compare with published
    figures. For each batch (theirs hold 2048 tokens, special tokens
    included) with ``N`` tokens and ``J`` latents:

    * ``p_tj(l)`` is Eq. 10 for active (token, latent) pairs and 0 for inactive ones (NaN -> 0);
    * ``q_j(l) = (1/N) sum_t p_tj(l)`` over *all* tokens, so it sums to the fraction of tokens
      where ``j`` is active rather than to 1, and ``q(l) = (1/J) sum_j q_j(l)`` over *all*
      latents, dead ones included;
    * every variance is ``sum_l l^2 r(l) - (sum_l l r(l))^2`` of the un-renormalised ``r``
      (0-based ``l``; unlike a true variance this depends on the layer offset);
    * Var(L) from ``q``; E[Var(L|J)] the mean over all latents of that of ``q_j``;
      E[Var(L|J,T)] the mean over all (token, latent) pairs of that of ``p_tj`` (0 if inactive);
    * the two ratios are formed per batch and then averaged over batches (a ratio of means
      would weigh batches differently).

    Args:
        latent_acts_batches: Dense ``[tokens, n_layers, n_latents]`` tensors, or top-k
            ``(indices, values)`` pairs of ``[tokens, n_layers, k]`` tensors.
        n_latents: The SAE's ``d_sae``; needed for top-k pairs, which do not show it.

    Returns:
        ``latent_ratio`` and ``token_ratio`` (means over batches), their per-batch lists
        ``latent_ratios`` and ``token_ratios``, and ``n_batches``.
    """
    latent_ratios: list[float] = []
    token_ratios: list[float] = []
    for batch in latent_acts_batches:
        if isinstance(batch, Tensor):
            if batch.ndim != 3:
                raise MLSAEError(
                    f"A batch has shape {tuple(batch.shape)}; "
                    "expected [tokens, n_layers, n_latents]."
                )
            stats = LayerDistributionStats(batch.shape[1], batch.shape[2], batch.device)
            stats.update(batch)
        else:
            indices, values = batch
            if n_latents is None:
                raise MLSAEError(
                    "reference_per_batch_ratios got top-k (indices, values) batches without "
                    "n_latents: pass n_latents=d_sae (the reference averages over every latent)."
                )
            stats = LayerDistributionStats(indices.shape[1], n_latents, indices.device)
            stats.update_sparse(indices, values)
        latent_ratio, token_ratio = reference_batch_ratios(stats)
        latent_ratios.append(latent_ratio)
        token_ratios.append(token_ratio)
    if not latent_ratios:
        raise MLSAEError("reference_per_batch_ratios got no batches: pass at least one batch.")
    return {
        "latent_ratio": sum(latent_ratios) / len(latent_ratios),
        "token_ratio": sum(token_ratios) / len(token_ratios),
        "latent_ratios": latent_ratios,
        "token_ratios": token_ratios,
        "n_batches": len(latent_ratios),
    }


def reference_batch_ratios(stats: LayerDistributionStats) -> tuple[float, float]:
    """The reference's ``(Eq. 11, Eq. 12)`` ratios of one batch accumulated in ``stats``
    (uniform weighting), as :func:`reference_per_batch_ratios` describes; NaN if undefined."""
    layers = torch.arange(stats.n_layers, dtype=torch.float64, device=stats.device)
    q_latent = stats.sum_p / max(stats.n_tokens, 1)  # [J, L], rows sum to the active fraction
    q = q_latent.mean(0)
    var_layer = _raw_var(q, layers)
    mean_var_latent = _raw_var(q_latent, layers).mean()
    mean_var_token = stats.sum_var.sum() / (max(stats.n_tokens, 1) * stats.n_latents)
    return (
        ratio_or_nan(item_or_nan(mean_var_latent), item_or_nan(var_layer)),
        ratio_or_nan(item_or_nan(mean_var_token), item_or_nan(mean_var_latent)),
    )


def _raw_var(r: Tensor, layers: Tensor) -> Tensor:
    """``E[l^2] - E[l]^2`` of a possibly unnormalised distribution over the last dim."""
    return r @ layers.square() - (r @ layers).square()


class ReferenceRatioStats:
    """Eq. 11/12 as the reference estimates them, over consecutive batches of a token stream.

    Args:
        n_layers: Layers the MLSAE reads.
        n_latents: The SAE's ``d_sae`` (the reference averages over every latent).
        batch_tokens: Tokens per batch (2,048 in the reference).
        device: Where the current batch's sums live.
    """

    def __init__(
        self,
        n_layers: int,
        n_latents: int,
        batch_tokens: int = REFERENCE_BATCH_TOKENS,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_tokens < 1:
            raise MLSAEError(f"batch_tokens must be positive, got {batch_tokens}")
        self.batch_tokens = batch_tokens
        self.current = LayerDistributionStats(n_layers, n_latents, device)
        self.latent_ratios: list[float] = []
        self.token_ratios: list[float] = []

    def update_sparse(self, indices: Tensor, values: Tensor) -> None:
        """Add top-k codes ``[tokens, n_layers, k]``, closing a batch at every
        ``batch_tokens`` tokens of the stream."""
        start = 0
        while start < indices.shape[0]:
            take = min(indices.shape[0] - start, self.batch_tokens - self.current.n_tokens)
            self.current.update_sparse(indices[start : start + take], values[start : start + take])
            start += take
            if self.current.n_tokens == self.batch_tokens:
                self._close_batch()

    def _close_batch(self) -> None:
        latent_ratio, token_ratio = reference_batch_ratios(self.current)
        self.latent_ratios.append(latent_ratio)
        self.token_ratios.append(token_ratio)
        cur = self.current
        self.current = LayerDistributionStats(cur.n_layers, cur.n_latents, cur.device)

    def compute(self) -> dict[str, Any]:
        """Means of the per-batch ratios (a final partial batch counts as one batch, so a
        stream shorter than one batch still gets numbers); ``None`` where undefined."""
        latent, token = list(self.latent_ratios), list(self.token_ratios)
        if self.current.n_tokens:
            last = reference_batch_ratios(self.current)
            latent.append(last[0])
            token.append(last[1])
        n = len(latent)

        def mean(xs: list[float]) -> float | None:
            value = sum(xs) / n if n else math.nan
            return None if math.isnan(value) else value

        return {
            "latent_ratio": mean(latent),
            "token_ratio": mean(token),
            "n_batches": n,
            "batch_tokens": self.batch_tokens,
            "last_batch_tokens": self.current.n_tokens or (self.batch_tokens if n else 0),
        }

    def state_dict(self) -> dict[str, Any]:
        """The current batch's tensors plus the finished batches' ratios (JSON-able)."""
        return {
            **self.current.state_dict(),
            "batch_tokens": self.batch_tokens,
            "latent_ratios": list(self.latent_ratios),
            "token_ratios": list(self.token_ratios),
        }

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], device: torch.device | str = "cpu"
    ) -> ReferenceRatioStats:
        """Rebuild what :meth:`state_dict` saved."""
        out = cls(state["n_layers"], state["n_latents"], int(state["batch_tokens"]), device)
        out.current.load_state_dict(state)
        out.latent_ratios = [float(x) for x in state["latent_ratios"]]
        out.token_ratios = [float(x) for x in state["token_ratios"]]
        return out


__all__ = ["REFERENCE_BATCH_TOKENS", "ReferenceRatioStats"]
