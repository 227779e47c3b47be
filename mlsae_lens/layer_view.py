"""One layer of an MLSAE as an ordinary single-hook SAELens SAE.

SAELens tools (``HookedSAETransformer.add_sae`` / ``run_with_saes`` /
``run_with_cache_with_saes``, ``sae_lens.evals``, steering, dashboards) take one SAE at one
hook. :meth:`MultiLayerSAE.layer_view` gives them layer ``l`` of an MLSAE as a
:class:`LayerViewSAE`: hook ``blocks.{l}.hook_resid_post``, inputs ``[..., d_in]`` (no layer
axis), and exactly the MLSAE's encode/decode at that layer, normalization included.

Why a subclass of SAELens' :class:`~sae_lens.TopKSAE`: the MLSAE's math at one layer *is*
a TopK SAE (``x - b_dec → @W_enc + b_enc → TopK → ReLU → @W_dec + b_dec``) wrapped in a
normalization, and SAELens already routes normalization through
``run_time_activation_norm_fn_in/out``. Overriding those two functions (and nothing about the
TopK) keeps every tool that special-cases ``TopKSAE`` working. The view's architecture has
its own name (``multilayer_topk_layer``, registered in ``mlsae_lens/__init__.py``) because its
config carries the layer and the normalization mode, which plain ``topk`` files cannot.

The view *shares* the MLSAE's tensors: the same ``nn.Parameter`` objects and a view of
``layer_means[l]``, so in-place updates (training, ``copy_``) show through at once. Moving or
re-loading the MLSAE (``.to(...)``, ``load_state_dict(assign=True)``) replaces its tensors:
take a new view afterwards. Conversely ``view.to(...)`` moves the shared Parameters (the
MLSAE's too) but not the MLSAE's ``layer_means``: move the MLSAE, not the view.

Export (:meth:`LayerViewSAE.save_model`) writes a standalone built-in ``topk`` SAE that plain
SAELens loads without mlsae-lens:

* ``none`` — exact (same weights).
* ``center`` — exact up to float rounding: ``(x - μ_l) - b_dec = x - (b_dec + μ_l)``, so the
  layer mean folds into the bias (``b_dec' = b_dec + μ_l``).
* ``standardize`` — exact up to float rounding, through SAELens' ``normalize_activations=
  "layer_norm"``: ``(x - mean) / (std + eps)`` on the way in (unbiased std, ``eps = 1e-5``) and
  ``x̂_norm · std + mean`` on the way out, which is the MLSAE's own ``reference`` convention
  (see :mod:`mlsae_lens.normalization`). An SAE saved before the convention was recorded
  (``legacy``: multiplies back by ``std + eps``) exports only approximately: SAELens'
  reconstruction is the MLSAE's minus ``eps · x̂_norm`` (an absolute error of about ``1e-5``
  per component, a relative ``eps / std``); ``exact=True`` refuses that.

Folding the decoder norm (:meth:`LayerViewSAE.fold_W_dec_norm`, which sae-dashboard calls on
every SAE) is a no-op for an MLSAE, whose decoder rows stay at unit norm; the view checks that
instead of changing the shared weights, and refuses rows that are not unit norm.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from sae_lens import TopKSAE, TopKSAEConfig
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.saes.sae import SAEMetadata
from torch import Tensor
from transformer_lens.hook_points import HookPoint
from typing_extensions import override

from mlsae_lens import dense_ops
from mlsae_lens.checkpoint import atomic_save_file, atomic_write_json
from mlsae_lens.errors import MLSAEError
from mlsae_lens.normalization import (
    NORMALIZATION_MODES,
    STANDARDIZE_CONVENTIONS,
    STANDARDIZE_EPS,
    NormalizationMode,
    NormStats,
    StandardizeConvention,
    denormalize,
    normalize,
)

if TYPE_CHECKING:
    from mlsae_lens.sae_mixin import MultiLayerMixin

logger = logging.getLogger(__name__)

LAYER_VIEW_ARCHITECTURE = "multilayer_topk_layer"

# SAELens' name for the normalization each of our modes exports to (see module docstring).
SAELENS_NORMALIZATION: dict[str, str] = {
    "none": "none",
    "center": "none",  # the layer mean is folded into b_dec
    "standardize": "layer_norm",  # exact for the reference convention (times std on the way back)
}
EXACT_EXPORT_MODES: tuple[str, ...] = ("none", "center")
"""Modes that export exactly whatever the convention (``standardize`` does for ``reference``)."""


def unit_norm_tolerance(dtype: torch.dtype) -> float:
    """How far from 1 a decoder row's norm may be for :meth:`LayerViewSAE.fold_W_dec_norm` to
    count as a no-op: ``1e-5``, or 8 rounding steps of a coarser dtype (bfloat16: ``0.0625``)."""
    return max(1e-5, 8 * torch.finfo(dtype).eps)

_SHARED_PARAMETERS = ("W_enc", "b_enc", "W_dec", "b_dec")
# MLSAE metadata that describes all layers and does not belong on a single-hook SAE.
_MULTI_LAYER_METADATA = ("hook_names",)


def resid_post_hook_name(layer: int) -> str:
    """TransformerLens' name of the residual stream after block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


@dataclass
class LayerViewSAEConfig(TopKSAEConfig):
    """Config of one layer of an MLSAE: a TopK SAE plus the layer and its normalization."""

    layer: int = 0
    """Which layer of the MLSAE this SAE reads (hook ``blocks.{layer}.hook_resid_post``)."""
    normalization: NormalizationMode = "none"
    """The MLSAE's input normalization, applied at this layer."""
    standardize_convention: StandardizeConvention = "reference"
    """The MLSAE's way back from ``standardize`` (see :mod:`mlsae_lens.normalization`)."""

    @override
    @classmethod
    def architecture(cls) -> str:
        return LAYER_VIEW_ARCHITECTURE

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.normalization not in NORMALIZATION_MODES:
            raise MLSAEError(
                f"unknown normalization {self.normalization!r}; use one of {NORMALIZATION_MODES}"
            )
        if self.layer < 0:
            raise MLSAEError(f"layer must be non-negative, got {self.layer}")
        if self.standardize_convention not in STANDARDIZE_CONVENTIONS:
            raise MLSAEError(
                f"unknown standardize_convention {self.standardize_convention!r}; "
                f"use one of {STANDARDIZE_CONVENTIONS}"
            )


class LayerViewSAE(TopKSAE):
    """Layer ``cfg.layer`` of an MLSAE as a single-hook SAELens ``TopKSAE``.

    Build it with :meth:`MultiLayerSAE.layer_view` (shares the MLSAE's tensors). Constructed
    from a config alone (as SAELens' registry does) it is a standalone SAE with its own
    weights and a ``layer_mean`` buffer.
    """

    cfg: LayerViewSAEConfig  # type: ignore[assignment]
    layer_mean: Tensor

    def __init__(self, cfg: LayerViewSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)  # type: ignore[arg-type]
        self._pending_norm_stats: NormStats | None = None

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.register_buffer(
            "layer_mean",
            torch.zeros(self.cfg.d_in, dtype=self.dtype, device=self.device),
            persistent=True,
        )

    @classmethod
    def from_mlsae(cls, mlsae: MultiLayerMixin, layer: int) -> LayerViewSAE:
        """View of ``mlsae`` at ``layer`` (negative indices count from the last layer).

        Raises:
            MLSAEError: ``layer`` is outside the MLSAE's layers.
        """
        n_layers = mlsae.cfg.n_layers
        if not -n_layers <= layer < n_layers:
            raise MLSAEError(
                f"layer {layer} is out of range for an MLSAE of {n_layers} layers; "
                f"use 0..{n_layers - 1} (or a negative index from the end)"
            )
        layer %= n_layers
        metadata = {
            key: value
            for key, value in mlsae.cfg.metadata.to_dict().items()
            if key not in _MULTI_LAYER_METADATA
        }
        metadata.update(hook_name=resid_post_hook_name(layer), mlsae_layer=layer)
        cfg = LayerViewSAEConfig(
            d_in=mlsae.cfg.d_in,
            d_sae=mlsae.cfg.d_sae,
            k=mlsae.cfg.k,
            dtype=mlsae.cfg.dtype,
            device="meta",  # no throwaway weights: the real ones are the MLSAE's
            apply_b_dec_to_input=True,
            normalize_activations=SAELENS_NORMALIZATION[mlsae.cfg.normalization],  # type: ignore
            layer=layer,
            normalization=mlsae.cfg.normalization,
            standardize_convention=mlsae.cfg.standardize_convention,
            metadata=SAEMetadata(**metadata),
        )
        view = cls(cfg)
        view.cfg.device = mlsae.cfg.device
        view.device = mlsae.W_enc.device
        for name in _SHARED_PARAMETERS:
            setattr(view, name, getattr(mlsae, name))  # the same Parameter objects
        view.layer_mean = mlsae.layer_means[layer]  # a view of the MLSAE's buffer
        # Not a submodule: the MLSAE's hooks and tensors must not appear under the view.
        view.__dict__["_mlsae"] = mlsae
        return view

    @property
    def mlsae(self) -> MultiLayerMixin | None:
        """The MLSAE this view shares its tensors with (``None`` for a standalone one)."""
        return self.__dict__.get("_mlsae")

    @property
    def matmul_dtype(self) -> torch.dtype | None:
        """The MLSAE's matmul dtype, so the view's encoder rounds exactly as the MLSAE's."""
        return getattr(self.mlsae, "matmul_dtype", None)

    # ---- normalization (SAELens' run-time normalization slots) --------------------------

    @override
    def _setup_activation_normalization(self) -> None:
        """Nothing to set up: the two ``run_time_activation_norm_fn_*`` methods below are ours."""

    @property
    def has_tuned_lens(self) -> bool:
        """Whether the MLSAE behind this view translates its inputs with a tuned lens."""
        return self.mlsae is not None and bool(getattr(self.mlsae.cfg, "tuned_lens", False))

    def to_shared_space(self, x: Tensor) -> Tensor:
        """Map this layer's residual vectors into the space the MLSAE's dictionary reads: the
        MLSAE's tuned-lens translator of layer ``cfg.layer`` (identity without a tuned lens)."""
        if not self.has_tuned_lens:
            return x
        return self.mlsae.to_lens_basis(x, layer=self.cfg.layer)  # type: ignore[union-attr]

    def from_shared_space(self, x: Tensor) -> Tensor:
        """Exact inverse of :meth:`to_shared_space` (a cached LU solve of ``I + W_l``)."""
        if not self.has_tuned_lens:
            return x
        return self.mlsae.from_lens_basis(x, layer=self.cfg.layer)  # type: ignore[union-attr]

    def norm_stats(self, x: Tensor) -> NormStats:
        """The MLSAE's normalization map at this layer for residual vectors ``x``."""
        return self.normalize(x)[1]

    def normalize(self, x: Tensor) -> tuple[Tensor, NormStats]:
        """The MLSAE's normalization at this layer (its mode, layer mean and convention)."""
        return normalize(x, self.cfg.normalization, self.layer_mean, self.cfg.standardize_convention)

    def run_time_activation_norm_fn_in(self, x: Tensor) -> Tensor:  # type: ignore[override]
        x_norm, stats = self.normalize(self.to_shared_space(x))
        self._pending_norm_stats = stats
        return x_norm

    def run_time_activation_norm_fn_out(self, x_norm: Tensor) -> Tensor:  # type: ignore[override]
        """Back to the residual stream's scale.

        ``standardize`` needs each vector's own mean and std, which only ``encode`` saw, so
        ``decode`` uses the statistics of the last ``encode`` (as SAELens' ``layer_norm`` does).
        """
        stats, self._pending_norm_stats = self._pending_norm_stats, None
        if self.cfg.normalization != "standardize":
            stats = self.norm_stats(x_norm)  # constant shift and scale
        elif stats is None or stats.shift.shape[:-1] != x_norm.shape[:-1]:
            raise MLSAEError(
                "decode() of a standardize-mode layer view needs the per-vector statistics of "
                "the matching encode() call; call encode() on the same batch first, or use sae(x)"
            )
        return self.from_shared_space(denormalize(x_norm, stats))

    # ---- decoder norm ------------------------------------------------------------------

    @override
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Fold the decoder row norms into the encoder: a no-op here, checked rather than done.

        SAELens' ``TopKSAE`` refuses the fold (rescaling would change which latents win the
        top-k), and sae-dashboard calls it on every SAE. An MLSAE keeps its decoder rows at unit
        norm, so folding would divide by 1: the view checks the norms and changes nothing
        (the weights are shared with the MLSAE and must stay as they are).

        Raises:
            MLSAEError: a decoder row's norm differs from 1 by more than
                :func:`unit_norm_tolerance` (``1e-5`` for float32).
        """
        norms = self.W_dec.detach().float().norm(dim=-1)
        worst = float((norms - 1).abs().max()) if norms.numel() else 0.0
        tolerance = unit_norm_tolerance(self.W_dec.dtype)
        if not worst <= tolerance:
            raise MLSAEError(
                f"cannot fold the decoder norms of this layer view: a decoder row has norm "
                f"{float(norms[(norms - 1).abs().argmax()]):.6g}, not 1 within {tolerance:g}, and a "
                "TopK SAE's fold would change its latents; call set_decoder_norm_to_unit_norm() "
                "on the MLSAE (it changes its reconstructions) or skip the fold"
            )

    # ---- encode ------------------------------------------------------------------------

    @override
    def encode(self, x: Tensor) -> Tensor:
        """Dense TopK code of ``[..., d_in]`` vectors, computed exactly as the MLSAE does."""
        if x.shape[-1] != self.cfg.d_in:
            raise MLSAEError(
                f"this layer view expects activations of shape [..., d_in={self.cfg.d_in}] "
                f"from {self.cfg.metadata.hook_name}, got {list(x.shape)}"
            )
        sae_in = self.process_sae_in(x)  # dtype, hook_sae_input, normalize, minus b_dec
        flat = sae_in.reshape(-1, self.cfg.d_in)
        pre = dense_ops.pre_activations(flat, self.W_enc, self.b_enc, self.matmul_dtype)
        hidden_pre = self.hook_sae_acts_pre(pre.to(self.dtype).reshape(*sae_in.shape[:-1], -1))
        return self.hook_sae_acts_post(self.activation_fn(hidden_pre))

    # ---- export ------------------------------------------------------------------------

    @property
    def exports_exactly(self) -> bool:
        """Whether plain SAELens can express this layer's normalization exactly."""
        return self.cfg.normalization in EXACT_EXPORT_MODES or self.cfg.standardize_convention == "reference"

    def to_topk_sae(self, exact: bool = False) -> TopKSAE:
        """A standalone built-in SAELens ``TopKSAE`` (copied weights) equivalent to this view.

        Args:
            exact: refuse what SAELens can only approximate (a ``legacy`` standardize).

        Raises:
            MLSAEError: ``exact`` and a ``legacy``-convention ``standardize``; or the MLSAE has a
                tuned lens (refused in every mode, for one rule: the affine translator could be
                folded into the weights for ``none``/``center``, but not under ``standardize``).
        """
        mode = self.cfg.normalization
        if self.has_tuned_lens:
            raise MLSAEError(
                "this layer of a tuned-lens MLSAE cannot be exported to plain SAELens: its "
                "translator runs before the normalization, which SAELens' TopK SAE cannot express; "
                "use the layer view itself (it works with HookedSAETransformer) or an MLSAE "
                "trained without --tuned-lens"
            )
        if not self.exports_exactly:
            if exact:
                raise MLSAEError(
                    f"this {mode!r}-mode MLSAE was saved with the legacy convention (it multiplies "
                    "back by std + 1e-5, SAELens' layer_norm by std: a relative error of 1e-5/std), "
                    "so it exports to SAELens only approximately; pass exact=False to accept that, "
                    "or retrain it (new SAEs use the reference convention and export exactly)"
                )
            logger.info(
                "exporting a legacy %s-mode layer as SAELens layer_norm: reconstructions differ "
                "by %.0e x the normalized reconstruction",
                mode,
                STANDARDIZE_EPS,
            )
        with torch.no_grad():
            b_dec = self.b_dec.detach().clone()
            if mode == "center":
                b_dec += self.layer_mean.to(b_dec.dtype)
            state = {
                "W_enc": self.W_enc.detach().clone(),
                "b_enc": self.b_enc.detach().clone(),
                "W_dec": self.W_dec.detach().clone(),
                "b_dec": b_dec,
            }
        metadata = {
            **self.cfg.metadata.to_dict(),
            "mlsae_normalization": mode,
            "mlsae_standardize_convention": self.cfg.standardize_convention,
            "exported_from": "mlsae_lens",
        }
        cfg = TopKSAEConfig(
            d_in=self.cfg.d_in,
            d_sae=self.cfg.d_sae,
            k=self.cfg.k,
            dtype=self.cfg.dtype,
            device="meta",
            apply_b_dec_to_input=True,
            normalize_activations=SAELENS_NORMALIZATION[mode],  # type: ignore[arg-type]
            metadata=SAEMetadata(**metadata),
        )
        sae = TopKSAE(cfg)
        sae.load_state_dict(state, assign=True)
        sae.cfg.device = self.cfg.device
        sae.device = self.device
        return sae

    @override
    def save_model(self, path: str | Path, exact: bool = False) -> tuple[Path, Path]:
        """Write a standalone SAELens ``topk`` SAE (``cfg.json`` + ``sae_weights.safetensors``).

        Plain SAELens loads it with ``SAE.load_from_disk(path)``, no mlsae-lens needed. Each
        file is written atomically.

        Args:
            path: output folder (created if missing).
            exact: refuse what SAELens can only approximate (see :meth:`to_topk_sae`).

        Returns:
            The weights path and the config path, as SAELens' ``save_model`` does.
        """
        exported = self.to_topk_sae(exact=exact)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = exported.state_dict()
        exported.process_state_dict_for_saving(state)
        weights_path, cfg_path = path / SAE_WEIGHTS_FILENAME, path / SAE_CFG_FILENAME
        atomic_save_file(state, weights_path)
        atomic_write_json(cfg_path, exported.cfg.to_dict())
        return weights_path, cfg_path


def steering_hook(
    sae: MultiLayerMixin | LayerViewSAE, latent: int, layer: int | None, scale: float
) -> tuple[str, Callable[..., Tensor]]:
    """A TransformerLens forward hook that steers along one latent's decoder direction.

    Adds what raising latent ``latent`` by ``scale`` adds to the SAE's reconstruction at
    ``layer``: ``scale · W_dec[latent]`` in the normalized space, mapped back to the residual
    stream (for ``standardize`` that is times each vector's own ``std``, or ``std + eps`` for a
    ``legacy`` SAE; ``center`` and ``none`` add ``scale · W_dec[latent]`` as is). It therefore equals adding ``scale`` to
    ``hook_sae_acts_post`` of the layer view under ``run_with_saes(..., use_error_term=True)``,
    without running the SAE. Use it as
    ``model.run_with_hooks(tokens, fwd_hooks=[steering_hook(mlsae, latent, layer, scale)])``.

    Args:
        sae: an MLSAE (then ``layer`` is required) or a layer view (``layer`` may be ``None``).
        latent: index of the latent, ``0 <= latent < d_sae``.
        layer: layer to steer at.
        scale: how much to add to the latent's activation.

    Returns:
        ``(hook_name, hook_fn)`` for ``fwd_hooks``.
    """
    if isinstance(sae, LayerViewSAE):
        if layer is not None and layer != sae.cfg.layer:
            raise MLSAEError(
                f"this layer view reads layer {sae.cfg.layer}, not {layer}; pass layer=None "
                "or take the view of the layer you want with mlsae.layer_view(layer)"
            )
        view = sae
    elif layer is None:
        raise MLSAEError("steering an MLSAE needs a layer; pass layer=l")
    else:
        view = LayerViewSAE.from_mlsae(sae, layer)  # what sae.layer_view(layer) returns
    if not 0 <= latent < view.cfg.d_sae:
        raise MLSAEError(f"latent {latent} is out of range; use 0..{view.cfg.d_sae - 1}")

    def hook_fn(resid: Tensor, hook: HookPoint) -> Tensor:  # noqa: ARG001
        stats = view.norm_stats(view.to_shared_space(resid.to(view.dtype)))
        delta = scale * view.W_dec[latent].detach() * stats.unscale
        # A direction, not a point: map it back by the lens's linear part only (no bias).
        if view.has_tuned_lens:
            delta = view.mlsae.from_lens_basis(delta, layer=view.cfg.layer, linear_only=True)
        return resid + delta.to(resid.dtype)

    return view.cfg.metadata.hook_name, hook_fn



# One layer of an MLSAE as a single-hook SAE, registered where it is defined (see sae.py).
def _register_with_sae_lens() -> None:
    from sae_lens import register_sae_class
    from sae_lens.registry import SAE_CLASS_REGISTRY

    if LAYER_VIEW_ARCHITECTURE not in SAE_CLASS_REGISTRY:
        register_sae_class(LAYER_VIEW_ARCHITECTURE, LayerViewSAE, LayerViewSAEConfig)


_register_with_sae_lens()
