"""The evaluation pass: the MLSAE and its baselines on the same test tokens.

Every method (the MLSAE, the PCA baseline, per-layer SAEs) reconstructs the very same vectors;
their errors, L0/L1 and firing are measured in the MLSAE's normalized space, and each is then
spliced into every evaluated layer for the downstream metrics (:mod:`mlsae_lens.eval_downstream`).
"""

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from mlsae_lens.activations import check_finite, harvest_resid_post, valid_token_vectors
from mlsae_lens.errors import MLSAEError
from mlsae_lens.eval_downstream import (
    MEAN_ABLATION,
    ZERO_ABLATION,
    DownstreamStats,
    clean_run,
    cross_entropy,
    next_token_log_probs,
    prediction_mask,
    splice,
    spliced_losses,
)
from mlsae_lens.evals import ReconstructionStats
from mlsae_lens.models import LanguageModel
from mlsae_lens.normalization import renormalize
from mlsae_lens.progress import progress_bar
from mlsae_lens.sae import MultiLayerMixin, TopKOutput


class CodeStats:
    """Per-layer squared error (normalized space), L0, L1 and firing counts of one method.

    ``shared`` dictionaries (the MLSAE) count a latent's firing over every (token, layer)
    vector; per-layer dictionaries keep one count per layer.
    """

    def __init__(self, n_layers: int, d_sae: int | None, shared: bool):
        self.n = 0
        self.sum_sq_err = torch.zeros(n_layers, dtype=torch.float64)
        self.sum_l0 = torch.zeros(n_layers, dtype=torch.float64)
        self.sum_l1 = torch.zeros(n_layers, dtype=torch.float64)
        self.shared = shared
        self.fire_counts = None
        if d_sae is not None:
            shape = (d_sae,) if shared else (n_layers, d_sae)
            self.fire_counts = torch.zeros(shape, dtype=torch.long)

    def update(self, x_norm: Tensor, recon_norm: Tensor, code: TopKOutput | None) -> None:
        self.n += x_norm.shape[0]
        self.sum_sq_err += (recon_norm.double() - x_norm.double()).pow(2).sum(dim=(0, 2)).cpu()
        if code is None or self.fire_counts is None:
            return
        active = code.values > 0
        self.sum_l0 += active.sum(-1).double().sum(0).cpu()
        self.sum_l1 += code.values.double().sum(-1).sum(0).cpu()
        d_sae = self.fire_counts.shape[-1]
        if self.shared:
            self.fire_counts += torch.bincount(code.indices[active].cpu(), minlength=d_sae)
        else:
            for layer in range(self.fire_counts.shape[0]):
                idx = code.indices[:, layer][active[:, layer]].cpu()
                self.fire_counts[layer] += torch.bincount(idx, minlength=d_sae)


def frequency_histogram(counts: Tensor, n_vectors: int, bins: int = 40) -> dict[str, Any]:
    """Histogram of log10 firing frequency ``counts / n_vectors`` (latents that never fired are
    counted apart: their log frequency is −∞). ``counts`` may be ``[d_sae]`` or ``[L, d_sae]``
    (then ``n_vectors`` is per row and all rows are pooled)."""
    freq = counts.double().reshape(-1) / max(n_vectors, 1)
    fired = freq > 0
    low = math.floor(math.log10(1 / max(n_vectors, 1)))
    edges = torch.linspace(low, 0, bins + 1, dtype=torch.float64)
    hist = torch.histc(freq[fired].log10(), bins=bins, min=low, max=0) if bool(fired.any()) else torch.zeros(bins)
    return {
        "log10_edges": edges.tolist(),
        "counts": [int(c) for c in hist.tolist()],
        "never_active": int((~fired).sum()),
        "n_latents": int(freq.numel()),
    }



class Method(Protocol):
    """A reconstruction method: raw ``[n, n_layers, d]`` vectors → raw reconstruction (only the
    evaluated layers matter) and its sparse code, if it has one."""

    name: str
    label: str
    shared_dictionary: bool

    def reconstruct(self, x: Tensor) -> tuple[Tensor, TopKOutput | None]: ...


ToResidual = Callable[[int, Tensor], Tensor]
"""Maps an MLSAE's reconstruction of layer ``l`` back to that layer's residual stream before
splicing. Identity for plain MLSAEs; issue 6 plugs the tuned-lens inverse translator in here."""


def _context_batches(
    tokens: Tensor, special_mask: Tensor, budget: int, batch_size: int
) -> Iterator[tuple[Tensor, Tensor, int]]:
    """``(tokens, special_mask, n_keep)`` per batch of whole contexts until ``budget`` valid
    tokens are reached; ``n_keep`` cuts the valid vectors of the last batch to fit."""
    done = 0
    for i in range(0, tokens.shape[0], batch_size):
        if done >= budget:
            return
        ctx, mask = tokens[i : i + batch_size], special_mask[i : i + batch_size]
        # no more contexts than the remaining budget needs
        reached = (~mask).sum(-1).cumsum(0) >= budget - done
        if bool(reached.any()):
            stop = int(reached.nonzero()[0]) + 1
            ctx, mask = ctx[:stop], mask[:stop]
        valid = int((~mask).sum())
        yield ctx, mask, min(valid, budget - done)
        done += valid


def _normalized(recon: Tensor, stats: Any) -> Tensor:
    return renormalize(recon, stats)  # the inverse of the MLSAE's own way back


@torch.inference_mode()
def evaluate_methods(
    sae: MultiLayerMixin,
    model: LanguageModel,
    tokens: Tensor,
    special_mask: Tensor,
    *,
    layers: Sequence[int],
    n_tokens: int,
    downstream_tokens: int,
    baselines: Sequence[Method] = (),
    with_pca: bool = True,
    batch_size: int = 8,
    to_residual: ToResidual | None = None,
) -> dict[str, Any]:
    """Reconstruction and downstream metrics of the MLSAE and its baselines on ``tokens``.

    Pass 1 reads the first ``n_tokens`` valid tokens: FVU/MSE/L0/L1/firing of every method in
    the MLSAE's normalized space, each layer's covariance (the PCA floor and the PCA baseline are
    fit on these very tokens, in-sample) and each layer's raw mean (for mean-ablation). Pass 2
    reads whole contexts up to ``downstream_tokens`` valid tokens (the first contexts of pass 1)
    and splices every method, zero- and mean-ablation into each layer in ``layers``.

    Returns:
        ``{"reconstruction": ReconstructionResult, "codes": {method: CodeStats},
        "downstream": DownstreamStats | None, "pca": PCABaseline | None, "layer_means": Tensor}``.
    """
    from mlsae_lens.baselines import MLSAEMethod, PCABaseline

    cfg = sae.cfg
    device = sae.W_enc.device
    recon_stats = ReconstructionStats(cfg.n_layers, cfg.d_in, cfg.d_sae, with_pca=True)
    codes = {m.name: CodeStats(cfg.n_layers, cfg.d_sae, m.shared_dictionary) for m in baselines}
    raw_sum = torch.zeros(cfg.n_layers, cfg.d_in, dtype=torch.float64)
    available = int((~special_mask).sum())
    n_tokens = min(n_tokens, available)
    with progress_bar(total=n_tokens, desc="eval: reconstruction", unit="tok") as bar:
        for ctx, mask, keep in _context_batches(tokens, special_mask, n_tokens, batch_size):
            acts = harvest_resid_post(model, ctx)
            check_finite(acts, "evaluation")
            x = valid_token_vectors(acts, mask)[:keep].to(device)
            out = sae.encode_full(x)
            recon = sae.decode_topk_normalized(out.topk)
            recon_stats.update(out.sae_in_normalized, recon, out.topk.values, out.topk.indices)
            raw_sum += x.double().sum(0).cpu()
            for method in baselines:
                m_recon, code = method.reconstruct(x)
                codes[method.name].update(
                    out.sae_in_normalized, _normalized(m_recon, out.norm_stats), code
                )
            bar.update(x.shape[0])
    if recon_stats.n == 0:
        raise MLSAEError("the test split holds no valid tokens to evaluate; use a larger corpus")
    layer_means = (raw_sum / recon_stats.n).float()
    pca = PCABaseline(sae, *recon_stats.pca(cfg.k)) if with_pca else None
    result = {
        "reconstruction": recon_stats.compute(cfg.k),
        "codes": codes,
        "fire_counts": recon_stats.fire_counts,
        "layer_var": recon_stats.layer_variance_sums(),
        "downstream": None,
        "pca": pca,
        "layer_means": layer_means,
    }
    downstream_tokens = min(downstream_tokens, n_tokens)
    if downstream_tokens <= 0:
        return result

    methods: list[Method] = [MLSAEMethod(sae), *([pca] if pca is not None else []), *baselines]
    names = [m.name for m in methods] + [ZERO_ABLATION, MEAN_ABLATION]
    down = DownstreamStats(names, len(layers))
    n_contexts = sum(1 for _ in _context_batches(tokens, special_mask, downstream_tokens, 1))
    with progress_bar(total=n_contexts * len(layers), desc="eval: downstream", unit="ctx·layer") as bar:
        for ctx, mask, _ in _context_batches(tokens, special_mask, downstream_tokens, batch_size):
            logits, acts = clean_run(model, ctx)
            check_finite(acts, "evaluation")
            clean_lp = next_token_log_probs(logits)
            pred = prediction_mask(mask.to(clean_lp.device))
            down.add_clean(cross_entropy(clean_lp, ctx), pred)
            valid = ~mask.to(acts.device)
            recons = {}
            for method in methods:
                full = acts.clone()
                full[valid] = method.reconstruct(acts[valid].to(device))[0].to(acts.dtype).to(acts.device)
                recons[method.name] = full
            for index, layer in enumerate(layers):
                clean = acts[:, :, layer]
                replacements = {name: full[:, :, layer] for name, full in recons.items()}
                if to_residual is not None:
                    replacements["mlsae"] = to_residual(layer, replacements["mlsae"])
                replacements[ZERO_ABLATION] = torch.zeros_like(clean)
                replacements[MEAN_ABLATION] = layer_means[layer].to(clean).expand_as(clean)
                for name, replacement in replacements.items():
                    resid = splice(clean, replacement, mask)
                    ce, kl = spliced_losses(model, ctx, clean_lp, resid, layer)
                    down.add(name, index, ce, kl, pred)
                bar.update(ctx.shape[0])
    result["downstream"] = down
    return result



__all__ = ["CodeStats", "Method", "ToResidual", "evaluate_methods", "frequency_histogram"]
