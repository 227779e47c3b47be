"""The Multi-Layer SAE: one TopK SAE shared by the residual stream of every layer.

Both classes are real SAELens architectures (registered as ``"multilayer_topk"`` in
``mlsae_lens/__init__.py``), so ``SAE.load_from_disk`` returns a :class:`MultiLayerSAE` and
SAELens tools read the files (``cfg.json`` + ``sae_weights.safetensors``).

Inputs carry the layer axis second to last: ``[..., n_layers, d_in]``. Each (token, layer)
vector is a separate example for the same dictionary; only the normalization (``center``
mode) knows which layer a vector came from.

The forward pass reads top to bottom: (tuned lens) → normalize → subtract the pre-encoder bias
``b_dec`` → encode → top-k → ReLU → decode (a sparse gather of k decoder rows) → add ``b_dec`` →
un-normalize → (inverse tuned lens).

Tuned lens (``cfg.tuned_lens``, paper §4.4): each layer's vector first goes through that layer's
frozen affine translator ``y = (I + W_l) x + b_l`` (buffers ``lens_weight`` ``[n_layers, d, d]``
and ``lens_bias`` ``[n_layers, d]``, see :mod:`mlsae_lens.lens` for which tuned-lens translator
sits at which layer). The SAE's dictionary, its normalization, ``encode_topk`` and the loss all
live in this *lens basis*; :meth:`MultiLayerMixin.reconstruct` (default ``basis="model"``),
SAELens' ``decode``/``forward`` and :meth:`MultiLayerMixin.from_normalized` map reconstructions
back to the model's own basis with the exact inverse ``(I + W_l)^-1 (y - b_l)`` (a cached LU
factorization), so they can be spliced into the model.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, NamedTuple

import torch
import torch.nn.functional as F
from sae_lens import (
    SAE,
    SAEConfig,
    TrainingSAE,
    TrainingSAEConfig,
    register_sae_class,
    register_sae_training_class,
)
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput, TrainStepOutput
from torch import Tensor, nn
from typing_extensions import override

from mlsae_lens import sparse_ops
from mlsae_lens.errors import MLSAEError
from mlsae_lens.normalization import (
    NORMALIZATION_MODES,
    STANDARDIZE_CONVENTIONS,
    NormalizationMode,
    NormStats,
    StandardizeConvention,
    denormalize,
    normalize,
)

if TYPE_CHECKING:
    from mlsae_lens.layer_view import LayerViewSAE

ARCHITECTURE = "multilayer_topk"


@dataclass(kw_only=True)
class MultiLayerFields:
    """Config fields shared by the inference and the training config."""

    k: int = 32
    """Latents kept per (token, layer) vector by the TopK activation."""
    n_layers: int = 1
    """Number of residual-stream layers the SAE reads (``blocks.{l}.hook_resid_post``)."""
    normalization: NormalizationMode = "standardize"
    """Input normalization: ``standardize`` (per vector), ``center`` (per-layer dataset mean) or ``none``."""
    standardize_convention: StandardizeConvention = "reference"
    """How ``standardize`` maps reconstructions back: times ``std`` (``reference``, as the reference
    code and SAELens' ``layer_norm``) or ``std + eps`` (``legacy``: what a ``cfg.json`` without this
    field was saved with). See :mod:`mlsae_lens.normalization`."""
    tuned_lens: bool = False
    """Apply frozen per-layer affine translators (buffers ``lens_weight``/``lens_bias``) before
    the normalization, and their exact inverse to reconstructions (paper §4.4)."""

    def validate_multilayer(self, d_in: int, d_sae: int) -> None:
        """Raise :class:`MLSAEError` with the fix for impossible sizes."""
        if d_in <= 0:
            raise MLSAEError(f"d_in must be positive, got {d_in}")
        if d_sae <= 0:
            raise MLSAEError(
                f"d_sae must be positive, got {d_sae}; set the expansion factor R > 0"
            )
        if not 0 < self.k < d_sae:
            raise MLSAEError(
                f"k must satisfy 0 < k < d_sae, got k={self.k} and d_sae={d_sae}; "
                "choose a smaller k or a larger expansion factor"
            )
        if self.n_layers <= 0:
            raise MLSAEError(f"n_layers must be positive, got {self.n_layers}")
        if self.normalization not in NORMALIZATION_MODES:
            raise MLSAEError(
                f"unknown normalization {self.normalization!r}; use one of {NORMALIZATION_MODES}"
            )
        if self.standardize_convention not in STANDARDIZE_CONVENTIONS:
            raise MLSAEError(
                f"unknown standardize_convention {self.standardize_convention!r} in the SAE "
                f"config; use one of {STANDARDIZE_CONVENTIONS}"
            )


@dataclass
class MultiLayerSAEConfig(SAEConfig, MultiLayerFields):
    """Inference config of a :class:`MultiLayerSAE` (SAELens naming: ``d_in``, ``d_sae``, ``k``)."""

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_multilayer(self.d_in, self.d_sae)


@dataclass(kw_only=True)
class MultiLayerTrainingSAEConfig(TrainingSAEConfig, MultiLayerFields):
    """Training config: adds the AuxK loss (Gao et al. 2024) to the inference fields."""

    aux_k: int | None = None
    """Dead latents used by the AuxK loss; ``None`` means ``d_in // 2`` (sparsify's heuristic)."""
    aux_coefficient: float = 1 / 32
    """Weight of the AuxK loss (Gao et al. 2024, Appendix A.2)."""
    decoder_init_norm: float | None = 1.0
    """Decoder rows start (and stay) at unit norm."""

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_multilayer(self.d_in, self.d_sae)
        if self.aux_k is not None and self.aux_k <= 0:
            raise MLSAEError(f"aux_k must be positive or None, got {self.aux_k}")

    @property
    def effective_aux_k(self) -> int:
        return self.aux_k if self.aux_k is not None else max(1, self.d_in // 2)


# SAELens' loaders (``SAE.load_from_disk``, ``SAE.from_dict``, ``TrainingSAE.load_from_disk``) build
# the *registered* config class from a cfg.json's keys, so a key the file lacks takes the class
# default. A cfg.json written before ``standardize_convention`` existed was un-standardized with
# ``std + eps``: the classes registered for loading (``mlsae_lens/__init__.py``) default to
# ``legacy``, while code making a new SAE uses the classes above (default ``reference``).


@dataclass(kw_only=True)
class SavedMultiLayerSAEConfig(MultiLayerSAEConfig):
    """:class:`MultiLayerSAEConfig` as loaded from a file: no ``standardize_convention`` = legacy."""

    standardize_convention: StandardizeConvention = "legacy"


@dataclass(kw_only=True)
class SavedMultiLayerTrainingSAEConfig(MultiLayerTrainingSAEConfig):
    """:class:`MultiLayerTrainingSAEConfig` as loaded from a file: no ``standardize_convention`` = legacy."""

    standardize_convention: StandardizeConvention = "legacy"


class TopKOutput(NamedTuple):
    """Sparse latent code: the k selected latents of every vector, post-ReLU."""

    values: Tensor  # [..., n_layers, k]
    indices: Tensor  # [..., n_layers, k]


Basis = Literal["model", "lens"]
"""Where a reconstruction lives: the model's residual stream (``model``, what splicing needs) or
the tuned lens' basis the SAE reads (``lens``; the same as ``model`` without a tuned lens)."""


class EncodeOutput(NamedTuple):
    """``norm_stats`` and ``sae_in_normalized`` are in the (normalized) lens basis."""

    topk: TopKOutput
    norm_stats: NormStats
    sae_in_normalized: Tensor
    hidden_pre: Tensor


def decode_topk_rows(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """Sum of the selected decoder rows weighted by their activations, without a dense code.

    ``embedding_bag`` gathers k rows per vector: O(vectors·k·d_in) instead of the dense
    O(vectors·d_sae·d_in) matmul, and its backward only touches the selected rows.
    """
    lead = values.shape[:-1]
    flat = F.embedding_bag(
        indices.reshape(-1, indices.shape[-1]),
        W_dec,
        per_sample_weights=values.reshape(-1, values.shape[-1]).to(W_dec.dtype),
        mode="sum",
    )
    return flat.reshape(*lead, W_dec.shape[-1])


def scatter_topk(topk: TopKOutput, d_sae: int) -> Tensor:
    """Dense ``[..., d_sae]`` code from a sparse one (for SAELens' dense ``encode`` API)."""
    dense = topk.values.new_zeros(*topk.values.shape[:-1], d_sae)
    return dense.scatter_(-1, topk.indices, topk.values)


class MultiLayerMixin:
    """Encode/decode math shared by the inference and the training SAE."""

    cfg: Any
    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter
    layer_means: Tensor
    dtype: torch.dtype
    hook_sae_acts_pre: Callable[[Tensor], Tensor]
    hook_sae_acts_post: Callable[[Tensor], Tensor]
    hook_sae_input: Callable[[Tensor], Tensor]
    hook_sae_recons: Callable[[Tensor], Tensor]

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        """SAELens' hook before ``load_state_dict(assign=True)``: every load path (``load_from_disk``,
        ``from_pretrained``, the training SAE) refuses weights of another shape, an integer dtype
        or NaN/inf instead of loading them as they are."""
        from mlsae_lens.sae_files import check_state_dict

        super().process_state_dict_for_loading(state_dict)  # type: ignore[misc]
        expected = {name: tuple(t.shape) for name, t in self.state_dict().items()}  # type: ignore[attr-defined]
        check_state_dict(state_dict, expected, f"this MLSAE's config (d_in={self.cfg.d_in}, "
                         f"d_sae={self.cfg.d_sae}, n_layers={self.cfg.n_layers})")

    def init_multilayer_weights(self) -> None:
        d_in, d_sae = self.cfg.d_in, self.cfg.d_sae
        device = torch.device(self.cfg.device)
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=self.dtype, device=device))
        # Persistent so that load_from_disk (strict, meta device) restores it.
        self.register_buffer(  # type: ignore[attr-defined]
            "layer_means",
            torch.zeros(self.cfg.n_layers, d_in, dtype=self.dtype, device=device),
            persistent=True,
        )
        if self.cfg.tuned_lens:
            # Persistent buffers (frozen, saved with the SAE); zeros = the identity translator.
            n, d = self.cfg.n_layers, d_in
            self.register_buffer(  # type: ignore[attr-defined]
                "lens_weight", torch.zeros(n, d, d, dtype=self.dtype, device=device), persistent=True
            )
            self.register_buffer(  # type: ignore[attr-defined]
                "lens_bias", torch.zeros(n, d, dtype=self.dtype, device=device), persistent=True
            )

    @torch.no_grad()
    def set_tuned_lens(self, weight: Tensor, bias: Tensor) -> None:
        """Copy per-layer translators ``y = x + weight[l] @ x + bias[l]`` into the buffers.

        Raises:
            MLSAEError: the SAE was not configured with ``tuned_lens=True`` or shapes differ.
        """
        if not self.cfg.tuned_lens:
            raise MLSAEError("this MLSAE has no tuned lens; build it with tuned_lens=True")
        n, d = self.cfg.n_layers, self.cfg.d_in
        if tuple(weight.shape) != (n, d, d) or tuple(bias.shape) != (n, d):
            raise MLSAEError(
                f"tuned-lens translators of shape {list(weight.shape)} / {list(bias.shape)} do not "
                f"fit this MLSAE ([{n}, {d}, {d}] / [{n}, {d}]); is the lens for this model?"
            )
        self.lens_weight.copy_(weight)
        self.lens_bias.copy_(bias)

    def to_lens_basis(self, x: Tensor, layer: int | None = None) -> Tensor:
        """Apply the tuned-lens translators: ``x + W_l x + b_l`` (identity without a lens).

        Args:
            x: ``[..., n_layers, d_in]`` vectors, or ``[..., d_in]`` vectors of ``layer``.
            layer: translate every vector with this one layer's translator.
        """
        if not self.cfg.tuned_lens:
            return x
        weight, bias = self.lens_weight.to(x.dtype), self.lens_bias.to(x.dtype)
        if layer is not None:
            return x + x @ weight[layer].T + bias[layer]
        return x + torch.einsum("...li,loi->...lo", x, weight) + bias

    def _lens_lu(self) -> tuple[Tensor, Tensor]:
        """LU factorization (float64) of every ``I + W_l``, cached until the buffer changes."""
        weight = self.lens_weight
        try:
            version: int | None = weight._version
        except RuntimeError:  # inference tensors carry no version counter
            version = None
        key = (weight.data_ptr(), version, weight.device)
        cached = self.__dict__.get("_lens_lu_cache")
        if cached is None or cached[0] != key or version is None:
            eye = torch.eye(self.cfg.d_in, dtype=torch.float64, device=weight.device)
            LU, pivots = torch.linalg.lu_factor(eye + weight.detach().double())
            cached = (key, LU, pivots)
            self.__dict__["_lens_lu_cache"] = cached
        return cached[1], cached[2]

    def from_lens_basis(self, y: Tensor, layer: int | None = None, linear_only: bool = False) -> Tensor:
        """Exact inverse of :meth:`to_lens_basis`: ``(I + W_l)^-1 (y - b_l)`` by a linear solve.

        Solved in float64 with the full matrix (not the diagonal approximation of the reference
        code) and cast back to ``y``'s dtype.

        Args:
            y: ``[..., n_layers, d_in]`` vectors, or ``[..., d_in]`` vectors of ``layer``.
            layer: invert this one layer's translator for every vector.
            linear_only: invert the linear part only, ``(I + W_l)^-1 y`` (for directions and
                differences, e.g. steering deltas).
        """
        if not self.cfg.tuned_lens:
            return y
        LU, pivots = self._lens_lu()
        z = y.double()
        if not linear_only:
            bias = self.lens_bias.double()
            z = z - (bias[layer] if layer is not None else bias)
        if layer is not None:
            flat = z.reshape(-1, z.shape[-1]).T  # [d, N]
            x = torch.linalg.lu_solve(LU[layer], pivots[layer], flat).T.reshape(z.shape)
        else:
            n, d = z.shape[-2], z.shape[-1]
            flat = z.reshape(-1, n, d).permute(1, 2, 0)  # [n_layers, d, N]
            x = torch.linalg.lu_solve(LU, pivots, flat).permute(2, 0, 1).reshape(z.shape)
        return x.to(y.dtype)

    def check_input(self, x: Tensor) -> None:
        """One clear message when the activations do not fit this SAE."""
        if x.ndim < 2 or x.shape[-1] != self.cfg.d_in or x.shape[-2] != self.cfg.n_layers:
            raise MLSAEError(
                f"this MLSAE expects activations of shape [..., n_layers={self.cfg.n_layers}, "
                f"d_in={self.cfg.d_in}], got {list(x.shape)}; stack the model's "
                "blocks.{l}.hook_resid_post for every layer on the second-to-last axis "
                "(is it the SAE for this model?)"
            )

    def normalize_input(self, x: Tensor) -> tuple[Tensor, NormStats]:
        """Model-basis vectors → the normalized lens basis the dictionary reads (the tuned lens,
        if any, then the normalization). The returned stats map back to the *lens* basis."""
        return normalize(
            self.to_lens_basis(x.to(self.dtype)),
            self.cfg.normalization,
            self.layer_means,
            self.cfg.standardize_convention,
        )

    def from_normalized(self, x_norm: Tensor, stats: NormStats, basis: Basis = "model") -> Tensor:
        """Undo :meth:`normalize_input`: de-normalize, then (``basis="model"``) invert the lens.

        Use it on ``decode_topk_normalized(...)`` (or any reconstruction in the normalized
        space) to get vectors that can be spliced back into the model.
        """
        out = denormalize(x_norm, stats)
        return self.from_lens_basis(out) if basis == "model" else out

    dense: bool = False
    """Reference switch: train through plain autograd (dense backward through ``topk``) instead
    of the sparse ops of :mod:`mlsae_lens.sparse_ops`. Same values and gradients, slower."""
    matmul_dtype: torch.dtype | None = None
    """Dtype of the one dense matmul (e.g. ``torch.bfloat16`` on GPU); ``None``: the SAE's dtype."""

    def encode_normalized(self, x_norm: Tensor) -> tuple[TopKOutput, Tensor]:
        """TopK code of already-normalized vectors; also returns the dense pre-activations.

        This is the dense path (SAELens' ``encode_with_hidden_pre`` needs ``hidden_pre``, and
        under ``torch.inference_mode`` nothing is saved anyway); training uses
        :func:`mlsae_lens.sparse_ops.topk_encode`, which never keeps ``hidden_pre``.
        """
        flat = (x_norm - self.b_dec).reshape(-1, x_norm.shape[-1])
        pre = sparse_ops.pre_activations(flat, self.W_enc, self.b_enc, self.matmul_dtype)
        hidden_pre = self.hook_sae_acts_pre(pre.to(self.dtype).reshape(*x_norm.shape[:-1], -1))
        top = hidden_pre.topk(self.cfg.k, dim=-1, sorted=False)
        return TopKOutput(values=top.values.relu(), indices=top.indices), hidden_pre

    def encode_full(self, x: Tensor) -> EncodeOutput:
        self.check_input(x)
        x_norm, stats = self.normalize_input(self.hook_sae_input(x))
        topk, hidden_pre = self.encode_normalized(x_norm)
        return EncodeOutput(topk, stats, x_norm, hidden_pre)

    def encode_topk(self, x: Tensor) -> TopKOutput:
        """Sparse code ``(values, indices)`` of ``[..., n_layers, d_in]`` activations.

        This is what analysis and evaluation consume: never a dense ``[.., d_sae]`` tensor.
        """
        return self.encode_full(x).topk

    def decode_topk_normalized(self, topk: TopKOutput) -> Tensor:
        """Reconstruction in the normalized space (the space the loss is measured in)."""
        return self.hook_sae_recons(
            decode_topk_rows(topk.values, topk.indices, self.W_dec) + self.b_dec
        )

    def reconstruct(self, x: Tensor, basis: Basis = "model") -> Tensor:
        """Encode and decode model-basis ``x`` back into the residual stream's own scale.

        Args:
            x: ``[..., n_layers, d_in]`` residual vectors in the model's basis.
            basis: ``model`` (default; the inverse tuned lens is applied, ready for splicing)
                or ``lens`` (the reconstruction of ``to_lens_basis(x)``, what the loss compares).
        """
        if basis not in ("model", "lens"):
            raise MLSAEError(f"basis must be 'model' or 'lens', got {basis!r}")
        out = self.encode_full(x)
        return self.from_normalized(self.decode_topk_normalized(out.topk), out.norm_stats, basis)

    def layer_view(self, layer: int) -> "LayerViewSAE":
        """Layer ``layer`` as an ordinary single-hook SAELens SAE sharing these weights.

        For SAELens tools (``HookedSAETransformer.run_with_saes``, ``sae_lens.evals``,
        steering); see :mod:`mlsae_lens.layer_view`.
        """
        from mlsae_lens.layer_view import LayerViewSAE  # deferred: keeps sae.py import-light

        return LayerViewSAE.from_mlsae(self, layer)

    def dense_encode(self, x: Tensor) -> Tensor:
        """SAELens' dense ``encode``; remembers the normalization for the next ``decode``."""
        out = self.encode_full(x)
        self._pending_norm_stats = out.norm_stats
        return self.hook_sae_acts_post(scatter_topk(out.topk, self.cfg.d_sae))

    def dense_decode(self, feature_acts: Tensor) -> Tensor:
        """SAELens' dense ``decode``: back to the residual stream's scale (and model basis).

        ``standardize`` needs each vector's own mean and std, which only ``encode`` saw, so
        ``decode`` uses the statistics remembered by the last ``encode`` (as SAELens' own
        ``layer_norm`` mode does).
        """
        x_norm = self.hook_sae_recons(feature_acts.to(self.dtype) @ self.W_dec + self.b_dec)
        stats = getattr(self, "_pending_norm_stats", None)
        if self.cfg.normalization == "standardize":
            if stats is None or stats.shift.shape[:-1] != x_norm.shape[:-1]:
                raise MLSAEError(
                    "decode() of a standardize-mode MLSAE needs the per-vector statistics "
                    "of the matching encode() call; use sae(x) or sae.reconstruct(x) instead"
                )
            self._pending_norm_stats = None
            return self.from_normalized(x_norm, stats)
        stats = normalize(x_norm, self.cfg.normalization, self.layer_means)[1]
        return self.from_normalized(x_norm, stats)

    # SAELens' API, shared by both classes (the mixin precedes the SAELens base in the MRO).
    def encode(self, x: Tensor) -> Tensor:
        return self.dense_encode(x)

    def decode(self, feature_acts: Tensor) -> Tensor:
        return self.dense_decode(feature_acts)

    def forward(self, x: Tensor) -> Tensor:
        return self.hook_sae_output(self.reconstruct(x))  # type: ignore[attr-defined]

    def get_activation_fn(self) -> Callable[[Tensor], Tensor]:
        return lambda x: x  # TopK lives in encode_normalized

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec.data /= self.W_dec.data.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Keep decoder rows on the unit sphere: drop the gradient's radial component."""
        if self.W_dec.grad is None:
            return
        # Row-wise dot products as one batched matmul and an in-place update: no [d_sae, d_in]
        # temporaries (about 4x faster on CPU at d_sae = 64·576).
        grad, W = self.W_dec.grad, self.W_dec.data
        parallel = torch.bmm(grad.unsqueeze(1), W.unsqueeze(2)).squeeze(2)  # [d_sae, 1]
        grad.addcmul_(parallel, W, value=-1)


class MultiLayerSAE(MultiLayerMixin, SAE[MultiLayerSAEConfig]):
    """Inference MLSAE. ``encode``/``decode`` follow SAELens' dense API; prefer
    :meth:`encode_topk` for analysis and :meth:`reconstruct` for reconstructions."""

    def __init__(self, cfg: MultiLayerSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.init_multilayer_weights()

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        release: str,
        sae_id: str,
        device: str = "cpu",
        local_dir: str | None = None,
        **kwargs: Any,
    ) -> "MultiLayerSAE":
        """A release from mlsae-lens' registry (``mlsae_lens/pretrained_saes.yaml``, incl. the
        paper's published checkpoints; ``lens=PATH`` gives a ``-lens`` SAE its tuned lens), else
        SAELens' own ``from_pretrained``."""
        from mlsae_lens.pretrained import from_pretrained, release_registry

        if release in release_registry():
            return from_pretrained(release, sae_id, local_dir=local_dir, device=device, lens=kwargs.get("lens"))
        return super().from_pretrained(release, sae_id, device=device, **kwargs)  # type: ignore[return-value]

    @override
    @classmethod
    def get_sae_config_class_for_architecture(cls, architecture: str) -> type[SAEConfig]:
        from sae_lens.registry import get_sae_class

        return get_sae_class(architecture)[1]


@dataclass
class MultiLayerTrainStepOutput(TrainStepOutput):
    """SAELens' step output plus the sparse code and the per-layer FVU."""

    topk: TopKOutput | None = None
    layer_fvu: Tensor | None = None


class MultiLayerTrainingSAE(MultiLayerMixin, TrainingSAE[MultiLayerTrainingSAEConfig]):
    """Training MLSAE: loss = mean over layers of each layer's FVU + AuxK.

    ``training_forward_pass`` takes a :class:`TrainStepInput` whose ``sae_in`` is
    ``[batch, n_layers, d_in]`` raw residual vectors (special tokens already removed).
    """

    # FVU/AuxK denominators; data-parallel training swaps in the global-batch version
    # (mlsae_lens.distributed.global_layer_variance) so rank losses add up exactly.
    layer_variance_fn: Callable[[Tensor], Tensor] = staticmethod(lambda x: per_layer_total_variance(x))

    def __init__(self, cfg: MultiLayerTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()  # W_enc = W_dec.T, decoder rows at decoder_init_norm
        self.init_multilayer_weights()

    @override
    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.encode_full(x)
        self._pending_norm_stats = out.norm_stats
        return scatter_topk(out.topk, self.cfg.d_sae), out.hidden_pre

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {}

    @torch.no_grad()
    def initialize_b_dec_with_geometric_median(self, sae_in: Tensor) -> None:
        """Pre-encoder bias = geometric median of a batch *in the normalized space* it is
        subtracted in (the reference code took the median of raw inputs: a mismatch)."""
        x_norm, _ = self.normalize_input(sae_in)
        self.b_dec.data = geometric_median(x_norm.reshape(-1, self.cfg.d_in)).to(self.dtype)

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: Tensor,
        hidden_pre: Tensor,
        sae_out: Tensor,
    ) -> dict[str, Tensor]:
        raise NotImplementedError("MultiLayerTrainingSAE computes AuxK in training_forward_pass")

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> MultiLayerTrainStepOutput:
        """Per-layer FVU + AuxK with a sparse backward (see :mod:`mlsae_lens.sparse_ops`).

        The dense pre-activations are never kept: ``hidden_pre`` in the output is an empty
        placeholder (the sparse code is in ``topk`` and ``feature_acts``).
        """
        sae_in = step_input.sae_in
        self.check_input(sae_in)
        x_norm, norm_stats = self.normalize_input(self.hook_sae_input(sae_in))
        d_in, k = self.cfg.d_in, self.cfg.k
        flat = x_norm.reshape(-1, d_in)
        dead_mask = step_input.dead_neuron_mask
        n_dead = int(dead_mask.sum()) if dead_mask is not None else 0
        encode = sparse_ops.dense_topk_encode if self.dense else sparse_ops.topk_encode
        code = encode(
            flat,
            self.b_dec,
            self.W_enc,
            self.b_enc,
            k,
            dead_mask if n_dead else None,
            self.cfg.effective_aux_k,
            self.matmul_dtype,
        )
        codes = [(code.values, code.indices)]
        aux_recon = None
        if code.aux_values is not None and code.aux_indices is not None:
            assert dead_mask is not None
            if self.dense:
                codes.append((code.aux_values, code.aux_indices))
            elif sparse_ops.aux_is_dense(n_dead, self.cfg.effective_aux_k, flat.device):  # as topk_encode chose
                aux_recon = sparse_ops.decode_dead(code.aux_values, code.aux_indices, dead_mask, self.W_dec)
            else:  # many dead latents: one sparse decode (and one W_dec gradient) for both codes
                codes.append((code.aux_values, code.aux_indices))
        decode = sparse_ops.dense_decode if self.dense else sparse_ops.sparse_decode
        decoded = decode(codes, self.W_dec)
        if len(decoded) > 1:
            aux_recon = decoded[1]
        recon = self.hook_sae_recons(decoded[0].reshape(x_norm.shape) + self.b_dec)
        layer_var = self.layer_variance_fn(x_norm)
        error = recon - x_norm
        layer_fvu = error.pow(2).sum(dim=-1).sum(dim=0) / layer_var
        fvu = layer_fvu.mean()
        if aux_recon is not None:
            auxk = self.auxk_fvu(error.detach(), aux_recon.reshape(x_norm.shape), layer_var, n_dead)
        else:
            auxk = fvu.new_zeros(())
        loss = fvu + self.cfg.aux_coefficient * auxk
        lead = x_norm.shape[:-1]
        values, indices = code.values.reshape(*lead, k), code.indices.reshape(*lead, k)
        n_vectors = flat.shape[0]
        feature_acts = torch.sparse_coo_tensor(
            torch.stack(
                [
                    torch.arange(n_vectors, device=values.device).repeat_interleave(k),
                    indices.reshape(-1),
                ]
            ),
            values.detach().reshape(-1),
            (n_vectors, self.cfg.d_sae),
            check_invariants=False,
        )
        return MultiLayerTrainStepOutput(
            sae_in=sae_in,
            sae_out=self.from_normalized(recon, norm_stats),
            feature_acts=feature_acts,
            hidden_pre=x_norm.new_empty(0),
            loss=loss,
            losses={"mse_loss": fvu, "auxiliary_reconstruction_loss": auxk},
            topk=TopKOutput(values=values, indices=indices),
            layer_fvu=layer_fvu.detach(),
        )

    def auxk_loss(
        self,
        error: Tensor,
        hidden_pre: Tensor,
        layer_var: Tensor,
        dead_mask: Tensor | None,
    ) -> Tensor:
        """AuxK (Gao et al. 2024, Appendix A.2): the top ``aux_k`` *dead* latents reconstruct
        the main reconstruction's error; its FVU, scaled down when few latents are dead.

        ``error`` is the main error in the normalized space, the same space the auxiliary
        decode lives in (the reference code mixed raw and standardized spaces here). This
        form takes dense pre-activations; training selects the dead latents inside
        :func:`mlsae_lens.sparse_ops.topk_encode` and calls :meth:`auxk_fvu` directly.
        """
        if dead_mask is None or not bool(dead_mask.any()):
            return hidden_pre.new_zeros(())
        n_dead = int(dead_mask.sum())
        aux_k = min(self.cfg.effective_aux_k, n_dead)
        dead_pre = hidden_pre.masked_fill(~dead_mask, -torch.inf)
        top = dead_pre.topk(aux_k, dim=-1, sorted=False)
        aux_recon = decode_topk_rows(top.values.relu(), top.indices, self.W_dec)
        return self.auxk_fvu(error, aux_recon, layer_var, n_dead)

    def auxk_fvu(self, error: Tensor, aux_recon: Tensor, layer_var: Tensor, n_dead: int) -> Tensor:
        """FVU of the dead latents' reconstruction ``aux_recon`` of ``error``, per layer, averaged."""
        # Heuristic from sparsify: fewer dead latents than aux_k lowers the loss's weight.
        scale = min(n_dead / self.cfg.effective_aux_k, 1.0)
        aux_fvu = (aux_recon - error).pow(2).sum(dim=-1).sum(dim=0) / layer_var
        return scale * aux_fvu.mean()


def per_layer_total_variance(x: Tensor) -> Tensor:
    """Σ_batch ||x - mean_batch(x)||² for each layer of ``[batch, n_layers, d_in]``: the
    denominator of each layer's FVU (clamped so a constant batch cannot divide by zero)."""
    return (x - x.mean(dim=0)).pow(2).sum(dim=(0, 2)).clamp_min(1e-12)


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances.

    Robust to outliers (unlike the mean), hence the usual SAE bias initialisation
    (Bricken et al. 2023; the reference implementation uses it too).
    """
    points = points.double()
    median = points.mean(dim=0)
    for _ in range(max_iter):
        weights = 1.0 / (points - median).norm(dim=-1).clamp_min(1e-8)
        new = (weights[:, None] * points).sum(dim=0) / weights.sum()
        if (new - median).norm() <= tol * max(1.0, float(median.norm())):
            median = new
            break
        median = new
    return median.float()


# Registered where the classes are defined, so SAELens knows the architecture whichever module is
# imported first (mlsae_lens/__init__.py imports this one once SAELens is imported). The Saved*
# config classes are what SAELens' loaders build: a cfg.json without standardize_convention loads
# as "legacy" (see above).
if ARCHITECTURE not in SAE_CLASS_REGISTRY:
    register_sae_class(ARCHITECTURE, MultiLayerSAE, SavedMultiLayerSAEConfig)
if ARCHITECTURE not in SAE_TRAINING_CLASS_REGISTRY:
    register_sae_training_class(ARCHITECTURE, MultiLayerTrainingSAE, SavedMultiLayerTrainingSAEConfig)
