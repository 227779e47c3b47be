"""The Multi-Layer SAE: one TopK SAE shared by the residual stream of every layer.

Both classes are real SAELens architectures (registered as ``"multilayer_topk"`` at the end of
this module), so ``SAE.load_from_disk`` returns a :class:`MultiLayerSAE` and SAELens tools read
the files (``cfg.json`` + ``sae_weights.safetensors``). This module holds the configs and the two
SAELens classes; their shared encode/decode math (normalization, tuned lens, TopK, sparse
decode) is :class:`~mlsae_lens.sae_mixin.MultiLayerMixin`.

Inputs carry the layer axis second to last: ``[..., n_layers, d_in]``. Each (token, layer)
vector is a separate example for the same dictionary; only the normalization (``center``
mode) knows which layer a vector came from.

Only modules that import no SAELens at their top are imported at the top here (the layer view
inside :meth:`LayerViewMixin.layer_view`, the release registry inside ``from_pretrained``):
importing SAELens runs the registration hook of ``mlsae_lens/__init__.py``, which imports this
module, and a module this one imported halfway would then be found half-initialized.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
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
from torch import Tensor
from typing_extensions import override

from mlsae_lens import dense_ops, sparse_ops
from mlsae_lens.errors import MLSAEError
from mlsae_lens.normalization import (
    NORMALIZATION_MODES,
    STANDARDIZE_CONVENTIONS,
    NormalizationMode,
    StandardizeConvention,
)
from mlsae_lens.sae_files import ARCHITECTURE
from mlsae_lens.sae_mixin import MultiLayerMixin, TopKOutput, decode_topk_rows, scatter_topk

if TYPE_CHECKING:
    from mlsae_lens.layer_view import LayerViewSAE

__all__ = [
    "ARCHITECTURE",
    "MultiLayerMixin",
    "MultiLayerSAE",
    "MultiLayerSAEConfig",
    "MultiLayerTrainingSAE",
    "MultiLayerTrainingSAEConfig",
    "TopKOutput",
]


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


class LayerViewMixin:
    """:meth:`layer_view` for both SAE classes (kept out of :class:`MultiLayerMixin`, which the
    layer view itself builds on)."""

    def layer_view(self, layer: int) -> "LayerViewSAE":
        """Layer ``layer`` as an ordinary single-hook SAELens SAE sharing these weights.

        For SAELens tools (``HookedSAETransformer.run_with_saes``, ``sae_lens.evals``,
        steering); see :mod:`mlsae_lens.layer_view`.
        """
        from mlsae_lens.layer_view import LayerViewSAE  # deferred: it imports SAELens (see top)

        return LayerViewSAE.from_mlsae(self, layer)  # type: ignore[arg-type]


class MultiLayerSAE(LayerViewMixin, MultiLayerMixin, SAE[MultiLayerSAEConfig]):
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
        from mlsae_lens.releases import load_release, release_registry  # deferred: the hub, yaml

        if release in release_registry():
            sae = load_release(release, sae_id, local_dir=local_dir, device=device, lens=kwargs.get("lens"))
            assert isinstance(sae, MultiLayerSAE)
            return sae
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


class MultiLayerTrainingSAE(LayerViewMixin, MultiLayerMixin, TrainingSAE[MultiLayerTrainingSAEConfig]):
    """Training MLSAE: loss = mean over layers of each layer's FVU + AuxK.

    ``training_forward_pass`` takes a :class:`TrainStepInput` whose ``sae_in`` is
    ``[batch, n_layers, d_in]`` raw residual vectors (special tokens already removed).
    """

    # FVU/AuxK denominators; data-parallel training swaps in the global-batch version
    # (mlsae_lens.distributed.global_layer_variance) so rank losses add up exactly.
    layer_variance_fn: Callable[[Tensor], Tensor] = staticmethod(lambda x: per_layer_total_variance(x))
    aux_matmul_dtype: torch.dtype | None = None
    """Dtype of the dense AuxK products (``--auxk-matmul-dtype``; ``None``: the SAE's dtype)."""

    def __init__(self, cfg: MultiLayerTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.pre_activation_buffer = dense_ops.PreActivationBuffer()

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
        buffer = None if self.dense else self.pre_activation_buffer.get(
            flat.shape[0], self.cfg.d_sae, self.matmul_dtype or self.W_enc.dtype, flat.device
        )
        code = encode(
            flat,
            self.b_dec,
            self.W_enc,
            self.b_enc,
            k,
            dead_mask if n_dead else None,
            self.cfg.effective_aux_k,
            self.matmul_dtype,
            self.aux_matmul_dtype,
            out=buffer,
        )
        codes = [(code.values, code.indices)]
        aux_recon = None
        if code.aux_values is not None and code.aux_indices is not None:
            assert dead_mask is not None
            if self.dense:
                codes.append((code.aux_values, code.aux_indices))
            elif sparse_ops.aux_is_dense(n_dead, self.cfg.effective_aux_k, flat.device):  # as topk_encode chose
                aux_recon = sparse_ops.decode_dead(
                    code.aux_values, code.aux_indices, dead_mask, self.W_dec, self.aux_matmul_dtype
                )
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
