"""Distributions of MLSAE latents over layers and the variance ratios of Eqs. 10-12.

Lawson et al. (2024, arXiv 2409.04185, sec. 4.3) treat the layer ``L``, token ``T`` and
latent ``J`` as random variables. For a token ``t`` where latent ``j`` is active at some layer,

    P(L=l | T=t, J=j) = h_j(x_{t,l}) / sum_l' h_j(x_{t,l'})                         (Eq. 10)

``P(T | J=j)`` is uniform over the tokens where ``j`` is active and ``P(J)`` is uniform over
latents that are active at least once. The ratios

    E[Var(L|J)] / Var(L)                                                            (Eq. 11)
    E[Var(L|J,T)] / E[Var(L|J)]                                                     (Eq. 12)

say how spread over layers latents are when aggregating over tokens, and how much of that spread
remains for a single token. Everything follows from per-latent sums over tokens, so
:class:`LayerDistributionStats` streams any number of tokens in float64 with memory
``O(n_latents * n_layers)``. Layer indices are 0-based (only ``E[L|J]`` depends on that).

The published reference code (tim-lawson/mlsae) estimates these differently; for comparison with
its figures mlsae-lens also offers ``weighting="activation_mass"`` (its heatmaps) and
:func:`~mlsae_lens.analysis.reference_ratios.reference_per_batch_ratios` (its ratios). The paper's
definitions are the default. This module holds the streaming accumulator; its result is
:class:`~mlsae_lens.analysis.layer_result.LayerDistributionResult`.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from mlsae_lens.analysis.layer_result import LayerDistributionResult, item_or_nan, ratio_or_nan
from mlsae_lens.analysis.stats_files import read_safetensors, write_safetensors
from mlsae_lens.errors import MLSAEError

Weighting = Literal["uniform_tokens", "activation_mass"]
WEIGHTINGS: tuple[str, ...] = ("uniform_tokens", "activation_mass")

_FORMAT = "mlsae_lens.LayerDistributionStats/1"

SPARSE_CHUNK_ENTRIES = 1 << 16
"""(token, layer, slot) entries per piece of :meth:`LayerDistributionStats.update_sparse`:
its temporaries stay below ~16 MiB whatever the batch size (CPU only; see there)."""


class LayerDistributionStats:
    """Streaming sufficient statistics for :class:`~mlsae_lens.analysis.layer_result.LayerDistributionResult`.

    Per latent ``j`` and token ``t`` where ``j`` is active, with token weight ``w_tj``:
    ``sum_p[j, l] = sum_t w_tj P(l|t,j)``, ``sum_expected_sq[j] = sum_t w_tj E[L|t,j]^2``,
    ``sum_var[j] = sum_t w_tj Var(L|t,j)`` and ``weight_sum[j] = sum_t w_tj``. These are plain sums,
    so streaming and merging are exact up to float64 rounding.

    Args:
        n_layers: Number of layers the MLSAE reads.
        n_latents: The SAE's ``d_sae``.
        device: Where the accumulators live; inputs are moved there.
        weighting: ``"uniform_tokens"`` (default, the paper: ``w_tj = 1``, P(T|J) uniform over
            active tokens) or ``"activation_mass"`` (for comparison with published figures: the
            reference heatmaps use P(L=l|J=j) proportional to sum_t h_j(x_{t,l}), which is
            ``w_tj = sum_l h_j(x_{t,l})``; the per-token quantities are weighted the same way so
            the law of total variance still ties them together). The reference sums pre-ReLU
            top-k values; these statistics only see the post-ReLU values they are given.
    """

    def __init__(
        self,
        n_layers: int,
        n_latents: int,
        device: torch.device | str = "cpu",
        weighting: Weighting = "uniform_tokens",
    ) -> None:
        if n_layers < 1 or n_latents < 1:
            raise MLSAEError(
                f"LayerDistributionStats needs n_layers >= 1 and n_latents >= 1, got "
                f"n_layers={n_layers}, n_latents={n_latents}: pass the MLSAE's sizes."
            )
        if weighting not in WEIGHTINGS:
            raise MLSAEError(
                f"Unknown weighting {weighting!r}: use one of {', '.join(WEIGHTINGS)}."
            )
        self.n_layers = n_layers
        self.n_latents = n_latents
        self.weighting: Weighting = weighting
        self.device = torch.device(device)
        zeros = functools.partial(torch.zeros, dtype=torch.float64, device=self.device)
        self.sum_p = zeros(n_latents, n_layers)
        self.sum_expected_sq = zeros(n_latents)
        self.sum_var = zeros(n_latents)
        self.weight_sum = zeros(n_latents)
        self.active_token_counts = torch.zeros(n_latents, dtype=torch.int64, device=self.device)
        self.n_tokens = 0

    # ------------------------------------------------------------------ updates

    def update(
        self,
        latent_acts: Tensor,
        mask: Tensor | None = None,
    ) -> None:
        """Add a batch of dense latent activations.

        Args:
            latent_acts: ``[tokens, n_layers, n_latents]``, >= 0; zeros mean inactive.
            mask: ``[tokens]`` bool, False for tokens to skip (e.g. special tokens).
        """
        if latent_acts.ndim != 3 or latent_acts.shape[1:] != (self.n_layers, self.n_latents):
            raise MLSAEError(
                f"latent_acts has shape {tuple(latent_acts.shape)}; expected "
                f"[tokens, {self.n_layers}, {self.n_latents}] (tokens, layers, latents)."
            )
        acts = latent_acts.to(self.device)
        keep = self._valid_entries(acts, mask)
        token, layer, latent = keep.nonzero(as_tuple=True)
        self._accumulate(token, layer, latent, acts[token, layer, latent])

    def update_sparse(
        self,
        indices: Tensor,
        values: Tensor,
        mask: Tensor | None = None,
    ) -> None:
        """Add a batch of top-k SAE outputs without ever building a dense tensor.

        Cost is ``O(tokens * n_layers * k)`` (one sort of the active (token, latent) keys plus
        a few ``index_add_``), independent of ``n_latents``. Zero values mean inactive; a latent
        index must not repeat within one (token, layer) row (true of top-k).

        Args:
            indices: ``[tokens, n_layers, k]`` integer latent indices.
            values: ``[tokens, n_layers, k]`` post-ReLU activations, >= 0.
            mask: ``[tokens]`` bool, False for tokens to skip (e.g. special tokens).
        """
        if indices.ndim != 3 or indices.shape != values.shape or indices.shape[1] != self.n_layers:
            raise MLSAEError(
                f"indices {tuple(indices.shape)} and values {tuple(values.shape)} must both be "
                f"[tokens, {self.n_layers}, k]: pass the SAE's top-k output for every layer."
            )
        if indices.dtype.is_floating_point:
            raise MLSAEError(
                "indices must be an integer tensor: pass the top-k indices, not values."
            )
        idx = indices.to(self.device, torch.int64)
        vals = values.to(self.device)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n_latents):
            raise MLSAEError(
                f"latent indices must lie in [0, {self.n_latents}); got "
                f"[{int(idx.min())}, {int(idx.max())}]: check n_latents (d_sae)."
            )
        keep = self._valid_entries(vals, mask)
        # Whole tokens at a time, so a pair (token, latent) never straddles two pieces and the
        # sums see their terms in the same order as in one piece (the result is bitwise the
        # same). The temporaries (keys, sort, moments: ~200 B per entry) then have one bounded
        # size whatever the batch, which keeps the heap from growing with varying batch sizes.
        # On CUDA one piece: the caching allocator does not fragment that way, and each piece
        # costs kernel launches and a host sync (nonzero) — pieces made an H100 update 5x slower.
        n_layers, k = idx.shape[1], idx.shape[2]
        on_cpu = idx.device.type == "cpu"
        step = max(1, SPARSE_CHUNK_ENTRIES // max(1, n_layers * k)) if on_cpu else max(1, idx.shape[0])
        for start in range(0, idx.shape[0], step):
            stop = start + step
            entry = keep[start:stop].reshape(-1).nonzero().squeeze(1)  # flat (token, layer, slot)
            token = entry // (n_layers * k)
            layer = entry // k % n_layers
            self._accumulate(
                token, layer, idx[start:stop].reshape(-1)[entry], vals[start:stop].reshape(-1)[entry]
            )

    def _valid_entries(self, acts: Tensor, mask: Tensor | None) -> Tensor:
        """Boolean [tokens, n_layers, *] of active entries of valid tokens; counts the tokens."""
        if acts.numel() and bool((acts < 0).any()):
            raise MLSAEError(
                "latent activations must be >= 0 (post-ReLU); got negative values: pass the "
                "SAE's activations after its ReLU, not pre-activations."
            )
        keep = acts > 0
        if mask is None:
            self.n_tokens += acts.shape[0]
            return keep
        if mask.shape != (acts.shape[0],):
            raise MLSAEError(
                f"mask has shape {tuple(mask.shape)}; expected [{acts.shape[0]}], "
                "one bool per token."
            )
        mask = mask.to(self.device, torch.bool)
        self.n_tokens += int(mask.sum())
        return keep & mask[:, None, None]

    def _accumulate(self, token: Tensor, layer: Tensor, latent: Tensor, value: Tensor) -> None:
        """Add active entries given as flat (token, layer, latent, value) lists."""
        if token.numel() == 0:
            return
        value = value.to(torch.float64)
        ell = layer.to(torch.float64)
        # One row per active (token, latent) pair; `inverse` maps entries to their pair.
        pair_key, inverse = torch.unique(token * self.n_latents + latent, return_inverse=True)
        pair_latent = pair_key % self.n_latents
        moments = torch.zeros(pair_key.shape[0], 3, dtype=torch.float64, device=self.device)
        moments.index_add_(0, inverse, torch.stack([value, value * ell, value * ell * ell], 1))
        total = moments[:, 0]  # sum_l h_j(x_{t,l}) > 0, the denominator of Eq. 10
        expected = moments[:, 1] / total  # E[L | t, j]
        var = (moments[:, 2] / total - expected.square()).clamp_min(0.0)  # Var(L | t, j)
        if self.weighting == "uniform_tokens":
            weight = torch.ones_like(total)
            p = value / total[inverse]  # Eq. 10, each pair's row sums to 1
        else:
            weight = total
            p = value  # weight * P(l|t,j) = h_j(x_{t,l})
        self.sum_p.view(-1).index_add_(0, latent * self.n_layers + layer, p)
        self.sum_expected_sq.index_add_(0, pair_latent, weight * expected.square())
        self.sum_var.index_add_(0, pair_latent, weight * var)
        self.weight_sum.index_add_(0, pair_latent, weight)
        self.active_token_counts += torch.bincount(pair_latent, minlength=self.n_latents)

    # ------------------------------------------------------------------ merge and I/O

    def merge(self, other: LayerDistributionStats) -> LayerDistributionStats:
        """Add another accumulator's statistics into this one (exact: all fields are sums)."""
        mine = (self.n_layers, self.n_latents, self.weighting)
        theirs = (other.n_layers, other.n_latents, other.weighting)
        if mine != theirs:
            raise MLSAEError(
                f"Cannot merge LayerDistributionStats with (n_layers, n_latents, weighting) "
                f"{theirs} into {mine}: merge only statistics of the same MLSAE and weighting."
            )
        for name in _TENSORS:
            getattr(self, name).add_(getattr(other, name).to(self.device))
        self.n_tokens += other.n_tokens
        return self

    @classmethod
    def merged(cls, parts: Sequence[LayerDistributionStats]) -> LayerDistributionStats:
        """A new accumulator holding the sum of ``parts`` (which are left unchanged)."""
        if not parts:
            raise MLSAEError("LayerDistributionStats.merged needs at least one part to merge.")
        first = parts[0]
        out = cls(first.n_layers, first.n_latents, first.device, first.weighting)
        for part in parts:
            out.merge(part)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Tensors and sizes; round-trips through :meth:`load_state_dict`."""
        state: dict[str, Any] = {name: getattr(self, name).clone() for name in _TENSORS}
        state.update(_meta(self))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this accumulator's statistics with ``state`` (sizes must match)."""
        expected = _meta(self)
        for key in ("n_layers", "n_latents", "weighting"):
            if state.get(key) != expected[key]:
                raise MLSAEError(
                    f"State has {key}={state.get(key)!r} but this LayerDistributionStats has "
                    f"{expected[key]!r}: build it with the saved sizes, or use "
                    "LayerDistributionStats.load(path)."
                )
        for name in _TENSORS:
            setattr(self, name, state[name].to(self.device, getattr(self, name).dtype).clone())
        self.n_tokens = int(state["n_tokens_seen"])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the statistics to a safetensors file (atomically) with JSON metadata."""
        state = self.state_dict()
        tensors = {name: state.pop(name) for name in _TENSORS}
        write_safetensors(path, tensors, _FORMAT, state)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], device: torch.device | str = "cpu"
    ) -> LayerDistributionStats:
        """Read statistics written by :meth:`save`."""
        tensors, meta = read_safetensors(path, _FORMAT)
        stats = cls(meta["n_layers"], meta["n_latents"], device, meta["weighting"])
        stats.load_state_dict({**tensors, **meta})
        return stats

    # ------------------------------------------------------------------ results

    def compute(self) -> LayerDistributionResult:
        """Distributions, variances and the Eq. 11-12 ratios of everything seen so far."""
        counts = self.active_token_counts.cpu()
        active = counts > 0
        layers = torch.arange(self.n_layers, dtype=torch.float64)
        weight = self.weight_sum.cpu().clone()
        weight[~active] = math.nan  # dead latents give NaN rows, not 0/0 warnings
        p_layer = self.sum_p.cpu() / weight[:, None]
        expected = p_layer @ layers
        var_given_latent = (p_layer * (layers - expected[:, None]).square()).sum(1)
        var_token = self.sum_var.cpu() / weight
        var_token_expected = (self.sum_expected_sq.cpu() / weight - expected.square()).clamp_min(0)

        active_idx = active.nonzero().squeeze(1)
        order = active_idx[torch.argsort(expected[active_idx], stable=True)]
        marginal = p_layer[active].mean(0)  # P(J) uniform over active latents
        mean_layer = marginal @ layers
        var_layer = item_or_nan((marginal * (layers - mean_layer).square()).sum())
        mean_var_given_latent = item_or_nan(var_given_latent[active].mean())
        mean_var_token = item_or_nan(var_token[active].mean())
        return LayerDistributionResult(
            weighting=self.weighting,
            layer_given_latent=p_layer,
            expected_layer=expected,
            var_layer_given_latent=var_given_latent,
            var_given_latent_token=var_token,
            var_token_expected_layer=var_token_expected,
            latent_order=order,
            layer_marginal=marginal,
            var_layer=var_layer,
            mean_var_given_latent=mean_var_given_latent,
            var_expected_layer=item_or_nan((expected[active] - mean_layer).square().mean()),
            mean_var_given_latent_token=mean_var_token,
            mean_var_token_expected_layer=item_or_nan(var_token_expected[active].mean()),
            latent_ratio=ratio_or_nan(mean_var_given_latent, var_layer),
            token_ratio=ratio_or_nan(mean_var_token, mean_var_given_latent),
            active_token_counts=counts.clone(),
            n_active_latents=int(active.sum()),
            n_dead_latents=int((~active).sum()),
            n_tokens=self.n_tokens,
        )


_TENSORS = ("sum_p", "sum_expected_sq", "sum_var", "weight_sum", "active_token_counts")


def variance_ratios(
    latent_acts: Tensor,
    mask: Tensor | None = None,
    weighting: Weighting = "uniform_tokens",
) -> LayerDistributionResult:
    """One-shot :class:`LayerDistributionStats` over dense ``[tokens, n_layers, n_latents]``."""
    if latent_acts.ndim != 3:
        raise MLSAEError(
            f"latent_acts has shape {tuple(latent_acts.shape)}; "
            "expected [tokens, n_layers, n_latents]."
        )
    _, n_layers, n_latents = latent_acts.shape
    stats = LayerDistributionStats(n_layers, n_latents, latent_acts.device, weighting)
    stats.update(latent_acts, mask)
    return stats.compute()


# ---------------------------------------------------------------------- helpers


def _meta(stats: LayerDistributionStats) -> dict[str, Any]:
    return {
        "n_layers": stats.n_layers,
        "n_latents": stats.n_latents,
        "weighting": stats.weighting,
        "n_tokens_seen": stats.n_tokens,
    }
