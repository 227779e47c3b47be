"""What Eqs. 10-12 give for one MLSAE: the result of :class:`~mlsae_lens.analysis.layer_stats.LayerDistributionStats`.

:class:`LayerDistributionResult` holds the per-latent distributions over layers, the variances the
law of total variance ties together, and the Eq. 11/12 ratios (definitions in
:mod:`mlsae_lens.analysis.layer_stats`); the small NaN-aware helpers here are shared with the
reference estimator (:mod:`mlsae_lens.analysis.reference_ratios`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass
class LayerDistributionResult:
    """Distributions over layers and the variances tied by the law of total variance.

    Per-latent tensors are float64 on the CPU and NaN for never-active ("dead") latents. Scalars
    are Python floats, NaN when undefined (no active latents, or a zero denominator, e.g. with a
    single layer every variance is 0 and both ratios are NaN). Variances are in units of
    layers squared and lie in ``[0, ((n_layers - 1) / 2) ** 2]``; the ratios lie in ``[0, 1]``.
    """

    weighting: str
    """``"uniform_tokens"`` (the paper) or ``"activation_mass"`` (the reference code)."""
    layer_given_latent: Tensor  # [n_latents, n_layers]
    """P(L | J=j): each active row sums to 1."""
    expected_layer: Tensor  # [n_latents]
    """E[L | J=j] with 0-based layers: the heatmaps' sort key."""
    var_layer_given_latent: Tensor  # [n_latents]
    """Var(L | J=j): 0 for a latent that is only ever active at one layer."""
    var_given_latent_token: Tensor  # [n_latents]
    """E_T[Var(L | J=j, T)]: the spread left within single tokens."""
    var_token_expected_layer: Tensor  # [n_latents]
    """Var_T(E[L | J=j, T]): the spread explained by which token it is."""
    latent_order: Tensor  # [n_active]
    """Indices of active latents sorted by E[L|J] ascending (stable: ties keep index order)."""
    layer_marginal: Tensor  # [n_layers]
    """P(L): the mean over active latents of P(L | J)."""
    var_layer: float
    """Var(L)."""
    mean_var_given_latent: float
    """E[Var(L | J)]."""
    var_expected_layer: float
    """Var(E[L | J]) over active latents."""
    mean_var_given_latent_token: float
    """E[Var(L | J, T)] = mean over active latents of E_T[Var(L | J=j, T)]."""
    mean_var_token_expected_layer: float
    """E_J[Var_T(E[L | J, T])]."""
    latent_ratio: float
    """Eq. 11: E[Var(L|J)] / Var(L)."""
    token_ratio: float
    """Eq. 12: E[Var(L|J,T)] / E[Var(L|J)]."""
    active_token_counts: Tensor  # [n_latents]
    """Number of valid tokens where each latent is active at some layer."""
    n_active_latents: int
    n_dead_latents: int
    """Latents never active on the tokens seen; they are left out of P(J)."""
    n_tokens: int
    """Valid (unmasked) tokens seen, whether or not any latent was active."""

    @property
    def total_variance_identity_lhs(self) -> float:
        """Var(L), which equals :attr:`total_variance_identity_rhs` by the law of total variance."""
        return self.var_layer

    @property
    def total_variance_identity_rhs(self) -> float:
        """E[Var(L|J)] + Var(E[L|J])."""
        return self.mean_var_given_latent + self.var_expected_layer

    @property
    def within_latent_identity_lhs(self) -> float:
        """E_J[Var(L|J)]: the within-latent identity averaged over latents."""
        return self.mean_var_given_latent

    @property
    def within_latent_identity_rhs(self) -> float:
        """E_J[E_T[Var(L|J,T)] + Var_T(E[L|J,T])], which should equal the lhs."""
        return self.mean_var_given_latent_token + self.mean_var_token_expected_layer

    def to_dict(self) -> dict[str, Any]:
        """Scalar metrics as JSON-able values (NaN becomes ``None``, which JSON can carry)."""
        names = (
            "var_layer",
            "mean_var_given_latent",
            "var_expected_layer",
            "mean_var_given_latent_token",
            "mean_var_token_expected_layer",
            "latent_ratio",
            "token_ratio",
            "total_variance_identity_lhs",
            "total_variance_identity_rhs",
            "within_latent_identity_lhs",
            "within_latent_identity_rhs",
        )
        out: dict[str, Any] = {name: json_float(getattr(self, name)) for name in names}
        out.update(
            weighting=self.weighting,
            n_layers=int(self.layer_marginal.shape[0]),
            n_latents=int(self.active_token_counts.shape[0]),
            n_active_latents=self.n_active_latents,
            n_dead_latents=self.n_dead_latents,
            n_tokens=self.n_tokens,
        )
        return out


def item_or_nan(x: Tensor) -> float:
    """A one-element tensor as a float; NaN for an empty one (a mean over no active latents)."""
    return float(x.item()) if x.numel() else math.nan


def ratio_or_nan(num: float, den: float) -> float:
    """``num / den``, NaN where the denominator is 0 or NaN (the ratio is undefined)."""
    return num / den if den > 0 else math.nan


def json_float(x: float) -> float | None:
    """NaN as ``None``, which JSON can carry."""
    return None if math.isnan(x) else float(x)
