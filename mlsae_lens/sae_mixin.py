"""The encode/decode math shared by the inference and the training MLSAE (no SAELens base).

:class:`MultiLayerMixin` holds everything that is the same for :class:`~mlsae_lens.sae.MultiLayerSAE`
and :class:`~mlsae_lens.sae.MultiLayerTrainingSAE`; :mod:`mlsae_lens.sae` combines it with SAELens'
``SAE`` / ``TrainingSAE``. It imports no SAELens module, so ``mlsae_lens.sae`` can import it at
the top without running SAELens' registration hook (``mlsae_lens/__init__.py``) halfway.

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

from typing import Any, Callable, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlsae_lens import dense_ops
from mlsae_lens.errors import MLSAEError
from mlsae_lens.normalization import NormStats, denormalize, normalize
from mlsae_lens.sae_files import check_state_dict


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
        pre = dense_ops.pre_activations(flat, self.W_enc, self.b_enc, self.matmul_dtype)
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
