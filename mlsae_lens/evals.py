"""Per-layer reconstruction metrics on the held-out split, with a rank-k PCA floor.

Everything is measured in the SAE's normalized space (the space it is trained in), per
layer, streaming in float64. The PCA floor needs no second pass: rank-k PCA of a layer's
vectors leaves exactly the variance of the discarded eigenvalues of their covariance, so
accumulating the covariance is enough (FVU_pca = Σ_{i>k} λ_i / Σ_i λ_i, in-sample, i.e. the
best any rank-k linear code could do on these very vectors).

Downstream (spliced) metrics are :mod:`mlsae_lens.eval_downstream`'s; the MLSAE against its
baselines is :mod:`mlsae_lens.eval_methods`'s.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from mlsae_lens.activations import check_finite, harvest_resid_post, valid_token_vectors
from mlsae_lens.models import LanguageModel
from mlsae_lens.progress import progress_bar
from mlsae_lens.sae import MultiLayerMixin


class ReconstructionStats:
    """Streaming per-layer FVU, MSE and L0 of an MLSAE, plus the covariance for PCA."""

    def __init__(self, n_layers: int, d_in: int, d_sae: int, with_pca: bool = True):
        self.n = 0
        self.sum_sq_err = torch.zeros(n_layers, dtype=torch.float64)
        self.sum_x = torch.zeros(n_layers, d_in, dtype=torch.float64)
        self.sum_sq_x = torch.zeros(n_layers, dtype=torch.float64)
        self.sum_l0 = torch.zeros(n_layers, dtype=torch.float64)
        self.sum_l1 = torch.zeros(n_layers, dtype=torch.float64)
        self.fired = torch.zeros(d_sae, dtype=torch.bool)
        self.fire_counts = torch.zeros(d_sae, dtype=torch.long)
        self.outer = torch.zeros(n_layers, d_in, d_in, dtype=torch.float64) if with_pca else None

    def update(self, x_norm: Tensor, recon_norm: Tensor, values: Tensor, indices: Tensor) -> None:
        """``x_norm``/``recon_norm``: ``[tokens, n_layers, d_in]``; ``values``/``indices``: top-k."""
        x = x_norm.double().cpu()
        self.n += x.shape[0]
        self.sum_sq_err += (recon_norm.double().cpu() - x).pow(2).sum(dim=(0, 2))
        self.sum_x += x.sum(0)
        self.sum_sq_x += x.pow(2).sum(dim=(0, 2))
        active = values > 0
        self.sum_l0 += active.sum(-1).double().sum(0).cpu()
        self.sum_l1 += values.double().sum(-1).sum(0).cpu()
        self.fired[indices[active].cpu()] = True
        self.fire_counts += torch.bincount(indices[active].cpu(), minlength=self.fire_counts.shape[0])
        if self.outer is not None:
            self.outer += torch.einsum("tli,tlj->lij", x, x)

    def layer_variance_sums(self) -> Tensor:
        """Σ_t ||x_t - mean||² per layer."""
        return (self.sum_sq_x - self.sum_x.pow(2).sum(-1) / self.n).clamp_min(1e-12)

    def covariance(self) -> tuple[Tensor, Tensor]:
        """Per-layer mean ``[n_layers, d_in]`` and covariance ``[n_layers, d_in, d_in]``."""
        assert self.outer is not None, "built with with_pca=False"
        mean = self.sum_x / self.n
        return mean, self.outer / self.n - torch.einsum("li,lj->lij", mean, mean)

    def pca(self, k: int) -> tuple[Tensor, Tensor]:
        """Rank-k PCA of each layer's vectors: mean ``[L, d]`` and top-k eigenvectors ``[L, d, k]``."""
        mean, cov = self.covariance()
        _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
        return mean, vectors.flip(-1)[..., :k]

    def compute(self, k: int) -> "ReconstructionResult":
        var = self.layer_variance_sums()
        d_in = self.sum_x.shape[-1]
        pca = None
        if self.outer is not None:
            mean = self.sum_x / self.n
            cov = self.outer / self.n - torch.einsum("li,lj->lij", mean, mean)
            eig = torch.linalg.eigvalsh(cov).flip(-1).clamp_min(0)
            pca = eig[:, k:].sum(-1) / eig.sum(-1).clamp_min(1e-30)
        return ReconstructionResult(
            n_tokens=self.n,
            fvu=self.sum_sq_err / var,
            mse=self.sum_sq_err / (self.n * d_in),
            l0=self.sum_l0 / self.n,
            l1=self.sum_l1 / self.n,
            dead_fraction=float(1 - self.fired.double().mean()),
            pca_fvu=pca,
        )


@dataclass
class ReconstructionResult:
    n_tokens: int
    fvu: Tensor  # [n_layers]
    mse: Tensor
    l0: Tensor
    l1: Tensor
    dead_fraction: float
    pca_fvu: Tensor | None

    def to_dict(self) -> dict:
        out = {
            "n_tokens": self.n_tokens,
            "mean_fvu": float(self.fvu.mean()),
            "mean_mse": float(self.mse.mean()),
            "mean_l0": float(self.l0.mean()),
            "mean_l1": float(self.l1.mean()),
            "dead_fraction": self.dead_fraction,
            "per_layer": {
                "fvu": self.fvu.tolist(),
                "mse": self.mse.tolist(),
                "l0": self.l0.tolist(),
                "l1": self.l1.tolist(),
            },
        }
        if self.pca_fvu is not None:
            out["pca_mean_fvu"] = float(self.pca_fvu.mean())
            out["per_layer"]["pca_fvu"] = self.pca_fvu.tolist()
        return out


@torch.inference_mode()
def evaluate_reconstruction(
    sae: MultiLayerMixin,
    model: LanguageModel,
    tokens: Tensor,
    special_mask: Tensor,
    max_tokens: int | None = None,
    model_batch_size: int = 8,
    with_pca: bool = True,
) -> ReconstructionResult:
    """Per-layer FVU/MSE/L0/L1 and dead fraction of ``sae`` on ``tokens`` (test split)."""
    cfg = sae.cfg
    stats = ReconstructionStats(cfg.n_layers, cfg.d_in, cfg.d_sae, with_pca)
    total = min(max_tokens or int((~special_mask).sum()), int((~special_mask).sum()))
    with progress_bar(total=total, desc="evaluating", unit="tok", leave=False) as bar:
        for i in range(0, tokens.shape[0], model_batch_size):
            acts = harvest_resid_post(model, tokens[i : i + model_batch_size])
            check_finite(acts, "evaluation")
            vectors = valid_token_vectors(acts, special_mask[i : i + model_batch_size])
            vectors = vectors[: total - stats.n].to(sae.W_enc.device)
            out = sae.encode_full(vectors)
            recon = sae.decode_topk_normalized(out.topk)
            stats.update(out.sae_in_normalized, recon, out.topk.values, out.topk.indices)
            bar.update(vectors.shape[0])
            if stats.n >= total:
                break
    return stats.compute(cfg.k)


__all__ = ["ReconstructionResult", "ReconstructionStats", "evaluate_reconstruction"]
