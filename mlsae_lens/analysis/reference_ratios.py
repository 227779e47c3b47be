"""The reference code's per-batch Eq. 11/12 estimator, streamed through an analysis.

The paper defines the ratios over the whole token set (:class:`LayerDistributionStats`); the
published reference code (tim-lawson/mlsae) forms them per batch of 2,048 tokens and averages
the per-batch ratios (:func:`~mlsae_lens.analysis.layer_stats.reference_per_batch_ratios`).
:class:`ReferenceRatioStats` cuts a token stream into such fixed batches whatever the model
batches are, so the run report can show both estimators side by side. Memory: one batch's
``[d_sae, n_layers]`` float64 sums plus two floats per finished batch. Its state round-trips
through :meth:`ReferenceRatioStats.state_dict`, so a resumed analysis gives the same numbers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mlsae_lens.analysis.layer_stats import LayerDistributionStats, reference_batch_ratios
from mlsae_lens.errors import MLSAEError

REFERENCE_BATCH_TOKENS = 2048
"""Tokens per batch of the reference code's evaluation."""


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
