"""Per-layer reconstruction metrics on the held-out split, with a rank-k PCA floor.

Everything is measured in the SAE's normalized space (the space it is trained in), per
layer, streaming in float64. The PCA floor needs no second pass: rank-k PCA of a layer's
vectors leaves exactly the variance of the discarded eigenvalues of their covariance, so
accumulating the covariance is enough (FVU_pca = Σ_{i>k} λ_i / Σ_i λ_i, in-sample, i.e. the
best any rank-k linear code could do on these very vectors).
"""

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from mlsae_lens.activations import (
    check_finite,
    harvest_resid_post,
    resid_post_hook_names,
    valid_token_vectors,
)
from mlsae_lens.errors import MLSAEError
from mlsae_lens.memory import FLOAT_BYTES, resolve_model_batch_size
from mlsae_lens.models import LanguageModel
from mlsae_lens.normalization import renormalize
from mlsae_lens.progress import progress_bar
from mlsae_lens.sae import MultiLayerMixin, TopKOutput

logger = logging.getLogger(__name__)


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


# ====================================================================== downstream metrics
#
# Splicing: the reconstruction replaces ``blocks.{l}.hook_resid_post`` at non-special positions
# (special positions keep the clean activation), and the rest of the model runs from there with
# ``model(resid, start_at_layer=l + 1)``, so layers 0..l are not recomputed. CE and KL are
# averaged over the positions whose input and target tokens are both non-special, the same
# positions for the clean and every spliced run. Names follow ``sae_lens.evals``.


def prediction_mask(special_mask: Tensor) -> Tensor:
    """``[batch, pos]`` special mask → ``[batch, pos - 1]``: position t predicts token t + 1 and
    counts only where neither the input t nor the target t + 1 is special."""
    return ~special_mask[:, :-1] & ~special_mask[:, 1:]


def next_token_log_probs(logits: Tensor) -> Tensor:
    """Log-probabilities of the next token at every position but the last, in float32."""
    return logits[:, :-1].float().log_softmax(-1)


def cross_entropy(log_probs: Tensor, tokens: Tensor) -> Tensor:
    """Per-position next-token CE ``[batch, pos - 1]`` from :func:`next_token_log_probs`."""
    return -log_probs.gather(-1, tokens[:, 1:, None].to(log_probs.device)).squeeze(-1)


def kl_divergence(clean_log_probs: Tensor, log_probs: Tensor) -> Tensor:
    """KL(clean ‖ spliced) per position (summed over the vocabulary), ``[batch, pos - 1]``."""
    return (clean_log_probs.exp() * (clean_log_probs - log_probs)).sum(-1)


def splice(clean: Tensor, replacement: Tensor, special_mask: Tensor) -> Tensor:
    """``replacement`` at non-special positions, ``clean`` at special ones (``[batch, pos, d]``)."""
    return torch.where(special_mask[..., None].to(clean.device), clean, replacement.to(clean.dtype))


@torch.inference_mode()
def logits_from_layer(model: Any, resid: Tensor, layer: int, tokens: Tensor | None = None) -> Tensor:
    """Logits of the model run from ``blocks.{layer}.hook_resid_post`` = ``resid`` onwards.

    ``HookedTransformer`` starts at block ``layer + 1`` (``start_at_layer``). TransformerBridge
    has no ``start_at_layer`` (it runs the Hugging Face forward as a whole), so there the
    forward reruns from ``tokens`` and a hook replaces the layer's output with ``resid``.
    """
    from mlsae_lens.bridge import is_bridge

    if not is_bridge(model):
        return model(resid.to(model.cfg.device), start_at_layer=layer + 1)
    if tokens is None:
        raise MLSAEError("logits_from_layer needs the tokens for a TransformerBridge model")
    resid = resid.to(model.cfg.device)
    hook = (f"blocks.{layer}.hook_resid_post", lambda act, hook: resid.to(act.dtype))
    return model.run_with_hooks(tokens.to(model.cfg.device), fwd_hooks=[hook])


@torch.inference_mode()
def spliced_losses(
    model: LanguageModel,
    tokens: Tensor,
    clean_log_probs: Tensor,
    resid: Tensor,
    layer: int,
) -> tuple[Tensor, Tensor]:
    """Per-position CE and KL(clean ‖ spliced) ``[batch, pos - 1]`` with ``resid`` (already
    spliced) as layer ``layer``'s residual stream; mask them with :func:`prediction_mask`."""
    log_probs = next_token_log_probs(logits_from_layer(model, resid, layer, tokens))
    return cross_entropy(log_probs, tokens), kl_divergence(clean_log_probs, log_probs)


@torch.inference_mode()
def clean_run(model: LanguageModel, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Clean logits ``[batch, pos, vocab]`` and every layer's ``hook_resid_post``
    ``[batch, pos, n_layers, d]`` from one forward pass."""
    names = resid_post_hook_names(model.cfg.n_layers)
    logits, cache = model.run_with_cache(
        tokens.to(model.cfg.device), names_filter=lambda name: name in names
    )
    return logits, torch.stack([cache[name] for name in names], dim=2).float()


class DownstreamStats:
    """Sums of CE and KL over predicted positions, per method and evaluated layer."""

    def __init__(self, methods: Sequence[str], n_layers: int):
        self.n = 0
        self.clean_ce = 0.0
        self.ce = {m: torch.zeros(n_layers, dtype=torch.float64) for m in methods}
        self.kl = {m: torch.zeros(n_layers, dtype=torch.float64) for m in methods}

    def add_clean(self, ce: Tensor, mask: Tensor) -> None:
        self.n += int(mask.sum())
        self.clean_ce += float(ce[mask].double().sum())

    def add(self, method: str, index: int, ce: Tensor, kl: Tensor, mask: Tensor) -> None:
        self.ce[method][index] += ce[mask].double().sum().cpu()
        self.kl[method][index] += kl[mask].double().sum().cpu()

    def mean(self, method: str) -> tuple[Tensor, Tensor]:
        n = max(self.n, 1)
        return self.ce[method] / n, self.kl[method] / n


def downstream_scores(stats: DownstreamStats, method: str) -> dict[str, Tensor]:
    """SAELens' downstream metrics for one method, per evaluated layer.

    ``ce_loss_score`` = (CE_zero − CE_method) / (CE_zero − CE_clean) (fraction of loss recovered
    relative to zero-ablation, as in ``sae_lens.evals``); ``*_mean_ablation`` relative to
    replacing the layer by its dataset mean; ``kl_div_score`` = (KL_zero − KL_method) / KL_zero.
    """
    ce, kl = stats.mean(method)
    clean = stats.clean_ce / max(stats.n, 1)
    ce_zero, kl_zero = stats.mean(ZERO_ABLATION)
    ce_mean, kl_mean = stats.mean(MEAN_ABLATION)
    return {
        "ce_loss_with_sae": ce,
        "delta_ce": ce - clean,
        "kl_div_with_sae": kl,
        "ce_loss_score": (ce_zero - ce) / (ce_zero - clean),
        "ce_loss_score_mean_ablation": (ce_mean - ce) / (ce_mean - clean),
        "kl_div_score": (kl_zero - kl) / kl_zero,
        "kl_div_score_mean_ablation": (kl_mean - kl) / kl_mean,
    }


ZERO_ABLATION = "zero_ablation"
MEAN_ABLATION = "mean_ablation"


# ====================================================================== per-method statistics


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


def parse_layers(spec: str | Sequence[int], n_layers: int) -> list[int]:
    """``"all"``, ``"0,5,10"`` or a list of ints → sorted unique layer indices (negative ones
    count from the end). Raises :class:`MLSAEError` for anything else."""
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return list(range(n_layers))
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise MLSAEError(
                f"--layers must be 'all' or comma-separated layer indices like 0,5,10; got {spec!r}"
            ) from None
    else:
        values = [int(v) for v in spec]
    if not values:
        raise MLSAEError(f"--layers is empty; pass 'all' or indices like 0,5,10 (got {spec!r})")
    bad = [v for v in values if not -n_layers <= v < n_layers]
    if bad:
        raise MLSAEError(
            f"--layers {bad} out of range: the model has {n_layers} layers (0..{n_layers - 1})"
        )
    return sorted({v % n_layers for v in values})


# ====================================================================== the evaluation


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


# ====================================================================== the run command

EVAL_FILE = "eval.json"
EVAL_FORMAT = "mlsae_lens.eval/2"
TABLE_METRICS = (
    ("fvu", "FVU"),
    ("delta_ce", "Δ CE (nats)"),
    ("kl_div_with_sae", "KL (nats/token)"),
    ("ce_loss_score", "CE loss recovered (vs zero-abl.)"),
    ("ce_loss_score_mean_ablation", "CE loss recovered (vs mean-abl.)"),
    ("l0", "L0"),
)


@dataclass
class EvalOptions:
    """Settings of one evaluation (the ``mlsae-lens eval`` flags)."""

    tokens: int = 4096
    """Valid test tokens for the reconstruction metrics (capped at the test split)."""
    downstream_tokens: int | None = 1024
    """Valid test tokens for the downstream (spliced) metrics; 0 skips them; ``None``: ``tokens``."""
    baselines: Sequence[str] = ()
    """Any of ``pca`` and ``saelens-per-layer``."""
    layers: str | Sequence[int] = "all"
    """Layers to report, splice and train per-layer SAEs for."""
    batch_size: int | None = None
    """Contexts per model forward pass (default: sized from the free memory, see
    :mod:`mlsae_lens.memory`; the value used is recorded in ``eval.json``)."""
    baseline_training_tokens: int | None = None
    """Training tokens per per-layer SAE (default: the MLSAE's ``training_tokens``)."""
    retrain_baselines: bool = False
    """Train the per-layer SAEs again even when matching ones are saved in the run."""

    def __post_init__(self) -> None:
        from mlsae_lens.baselines import BASELINES

        for flag, value in (
            ("--tokens", self.tokens),
            ("--batch-size", self.batch_size),
            ("--baseline-training-tokens", self.baseline_training_tokens),
        ):
            if value is not None and value <= 0:
                raise MLSAEError(f"{flag} must be a positive integer, got {value}")
        if self.downstream_tokens is not None and self.downstream_tokens < 0:
            raise MLSAEError(
                f"--downstream-tokens must be 0 (skip) or positive, got {self.downstream_tokens}"
            )
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise MLSAEError(f"unknown --baseline {unknown}; choose from {', '.join(BASELINES)}")


def _mean(values: Tensor) -> float | None:
    value = float(values.double().mean())
    return None if math.isnan(value) else value


def _listed(values: Tensor) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values.double().tolist()]


def method_summary(
    per_layer: dict[str, Tensor],
    label: str,
    dead_fraction: float | None,
    histogram: dict[str, Any] | None,
    n_parameters: int,
    training_seconds: float | None,
    **extra: Any,
) -> dict[str, Any]:
    """One method's eval.json entry: per-layer lists, their means over layers, and scalars."""
    return {
        "label": label,
        "per_layer": {key: _listed(values) for key, values in per_layer.items()},
        "mean": {key: _mean(values) for key, values in per_layer.items()},
        "dead_fraction": dead_fraction,
        "frequency_histogram": histogram,
        "n_parameters": n_parameters,
        "training_seconds": training_seconds,
        **extra,
    }


def summarize(
    raw: dict[str, Any],
    layers: Sequence[int],
    k: int,
    d_sae: int,
    d_in: int,
    baseline_meta: dict[str, dict[str, Any]],
    mlsae_training_seconds: float | None,
) -> dict[str, Any]:
    """The JSON-able evaluation from :func:`evaluate_methods`' output."""
    from mlsae_lens.baselines import PCA, topk_parameter_count

    rec: ReconstructionResult = raw["reconstruction"]
    sel = torch.tensor(list(layers), dtype=torch.long)
    down: DownstreamStats | None = raw["downstream"]
    n = rec.n_tokens

    def with_downstream(name: str, per_layer: dict[str, Tensor]) -> dict[str, Tensor]:
        if down is not None and name in down.ce:
            per_layer.update(downstream_scores(down, name))
        return per_layer

    fvu = rec.fvu[sel]
    methods = {
        "mlsae": method_summary(
            with_downstream("mlsae", {
                "fvu": fvu, "explained_variance": 1 - fvu, "mse": rec.mse[sel],
                "l0": rec.l0[sel], "l1": rec.l1[sel],
            }),
            "MLSAE",
            rec.dead_fraction,
            frequency_histogram(raw["fire_counts"], n * len(rec.fvu)),
            topk_parameter_count(d_in, d_sae),
            mlsae_training_seconds,
        )
    }
    if raw["pca"] is not None and rec.pca_fvu is not None:
        pca_fvu = rec.pca_fvu[sel]
        methods[PCA] = method_summary(
            with_downstream(PCA, {"fvu": pca_fvu, "explained_variance": 1 - pca_fvu,
                                  "l0": torch.full_like(pca_fvu, float(k))}),
            f"PCA rank {k}",
            None,
            None,
            len(layers) * (k * d_in + d_in),
            None,
            fit="in-sample: mean and top-k eigenvectors of each layer's covariance over the "
            "evaluated test tokens (normalized space)",
        )
    for name, stats in raw["codes"].items():
        meta = baseline_meta.get(name, {})
        m_fvu = stats.sum_sq_err[sel] / raw["layer_var"][sel]
        counts = stats.fire_counts[sel] if stats.fire_counts is not None else None
        methods[name] = method_summary(
            with_downstream(name, {
                "fvu": m_fvu, "explained_variance": 1 - m_fvu,
                "mse": stats.sum_sq_err[sel] / (stats.n * d_in),
                "l0": stats.sum_l0[sel] / stats.n, "l1": stats.sum_l1[sel] / stats.n,
            }),
            meta.get("label", name),
            float((counts == 0).double().mean()) if counts is not None else None,
            frequency_histogram(counts, stats.n) if counts is not None else None,
            len(layers) * topk_parameter_count(d_in, d_sae),
            meta.get("training_seconds"),
            **{key: v for key, v in meta.items() if key not in ("label", "training_seconds")},
        )
    out: dict[str, Any] = {
        **rec.to_dict(),
        "format": EVAL_FORMAT,
        "split": "test",
        "n_layers": len(rec.fvu),
        "layers": list(layers),
        "normalized_space": "FVU/MSE are measured in the MLSAE's normalized space, per layer",
        "methods": methods,
    }
    if down is not None:
        zero_ce, zero_kl = down.mean(ZERO_ABLATION)
        mean_ce, mean_kl = down.mean(MEAN_ABLATION)
        out["downstream"] = {
            "n_predicted_positions": down.n,
            "ce_loss_without_sae": down.clean_ce / max(down.n, 1),
            "per_layer": {
                "ce_loss_with_ablation": _listed(zero_ce),
                "kl_div_with_ablation": _listed(zero_kl),
                "ce_loss_with_mean_ablation": _listed(mean_ce),
                "kl_div_with_mean_ablation": _listed(mean_kl),
            },
            "masking": "reconstructions and ablations replace only non-special positions; CE and "
            "KL(clean ‖ spliced) are averaged over positions whose input and target tokens are "
            "both non-special",
            "mean_ablation": "each layer's raw mean over the reconstruction pass's tokens",
        }
    return out



def comparison_table(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method of an eval.json: means over the evaluated layers, dead fraction,
    parameter count and training time (the table of the report and the CLI)."""
    rows = []
    for name, method in data.get("methods", {}).items():
        row: dict[str, Any] = {"method": method["label"]}
        for key, title in TABLE_METRICS:
            row[title] = method["mean"].get(key)
        row["dead fraction"] = method.get("dead_fraction")
        row["parameters"] = method.get("n_parameters")
        row["training s"] = method.get("training_seconds")
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`comparison_table` rows."""
    if not rows:
        return ""
    keys = list(rows[0])

    def cell(value: Any) -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def mlsae_training_seconds(run_dir: Path) -> tuple[float | None, str]:
    """The MLSAE's training wall time: the training log's cumulative ``seconds`` (written since
    this version), else, for older runs, the time between writing ``run.json`` (start) and
    ``sae_weights.safetensors`` (end)."""
    import json

    log_file = run_dir / "training_log.json"
    if log_file.is_file():
        try:
            log = json.loads(log_file.read_text())
        except json.JSONDecodeError:
            log = []
        if log and isinstance(log[-1], dict) and "seconds" in log[-1]:
            return float(log[-1]["seconds"]), "training_log.json (seconds)"
    start, end = run_dir / "run.json", run_dir / "sae_weights.safetensors"
    if start.is_file() and end.is_file():
        seconds = end.stat().st_mtime - start.stat().st_mtime
        if seconds > 0:
            return seconds, "approximate: mtime(sae_weights.safetensors) − mtime(run.json)"
    return None, "unknown"


def evaluate_run(
    run_dir: str | Path,
    options: EvalOptions | None = None,
    *,
    model: LanguageModel | None = None,
    splits: Any = None,
    device: str = "cpu",
    report: bool = True,
    to_residual: ToResidual | None = None,
) -> dict[str, Any]:
    """Evaluate a trained run and its baselines on its test split; write ``eval.json`` (and,
    with ``report``, rebuild ``report.html``).

    Args:
        run_dir: A training run's ``--output-dir``.
        options: Token budgets, baselines, layers.
        model: The run's model, already loaded (else loaded from ``run.json``).
        splits: The run's token splits (else rebuilt from its corpus, as training did).
        device: Where the SAEs (and a loaded model) live.
        report: Rebuild ``report.html`` afterwards.
        to_residual: Hook for tuned-lens MLSAEs (issue 6): reconstruction → residual stream.

    Returns:
        The dict written to ``eval.json``.
    """
    import json

    from mlsae_lens.analyze import _check_run_dir, build_run_report
    from mlsae_lens.baselines import (
        PCA,
        SAELENS_PER_LAYER,
        TRAINING_FILE,
        PerLayerSAEs,
        load_per_layer_saes,
        train_saelens_per_layer,
    )
    from mlsae_lens.checkpoint import atomic_write_json
    from mlsae_lens.data import special_token_mask
    from mlsae_lens.eval_merge import merge_with_previous
    from mlsae_lens.models import load_model
    from mlsae_lens.pipeline import check_sae_fits_model, load_run, load_sae
    from mlsae_lens.run_dir import load_run_config

    options = options or EvalOptions()
    run_dir = Path(run_dir)
    _check_run_dir(run_dir)
    if splits is None:
        run = load_run(run_dir, model=model, device=device)
        cfg, sae, model, splits = run.cfg, run.sae, run.model, run.splits
    else:
        cfg = load_run_config(run_dir)
        sae = load_sae(run_dir, device)
        model = model if model is not None else load_model(cfg.model_name, device=device, backend=cfg.model_backend)
        check_sae_fits_model(sae, model)
    sae.eval()
    layers = parse_layers(options.layers, sae.cfg.n_layers)
    test_mask = special_token_mask(splits.test, model.tokenizer)
    # Sized from this machine's free memory: per token the whole batch's dense SAE
    # pre-activations (and a ReLU'd copy), and the spliced pass's logits and a copy of every
    # layer's activations per method (counted as four).
    mcfg = model.cfg
    batch_size = resolve_model_batch_size(
        options.batch_size, mcfg, splits.test.shape[1], mcfg.device, what="--batch-size",
        logits=options.downstream_tokens != 0,
        extra_bytes_per_token=FLOAT_BYTES * mcfg.n_layers * (2 * sae.cfg.d_sae + 4 * mcfg.d_model),
    )

    baselines: list[Method] = []
    meta: dict[str, dict[str, Any]] = {}
    if SAELENS_PER_LAYER in options.baselines:
        out_dir = run_dir / "baselines" / SAELENS_PER_LAYER
        saes = None if options.retrain_baselines else load_per_layer_saes(
            out_dir, layers, sae.cfg.d_sae, sae.cfg.k, device
        )
        if saes is None:
            info = train_saelens_per_layer(
                sae, model, splits.train, special_token_mask(splits.train, model.tokenizer),
                cfg, layers, out_dir, options.baseline_training_tokens, device,
            )
            saes = load_per_layer_saes(out_dir, layers, sae.cfg.d_sae, sae.cfg.k, device)
            assert saes is not None
        else:
            logger.info("reusing the per-layer SAEs saved in %s", out_dir)
            info = json.loads((out_dir / TRAINING_FILE).read_text()) if (out_dir / TRAINING_FILE).is_file() else {}
        seconds = info.get("training_seconds")
        trained_layers = info.get("layers") or layers
        baselines.append(PerLayerSAEs(saes, sae.cfg.k))
        meta[SAELENS_PER_LAYER] = {
            "label": "SAELens TopK per layer",
            # the saved training may cover more layers than evaluated: charge these layers' share
            "training_seconds": seconds * len(layers) / len(trained_layers) if seconds else None,
            "tokens_per_layer": info.get("tokens_per_layer"),
            "path": str(out_dir.relative_to(run_dir)),
        }

    downstream = options.downstream_tokens if options.downstream_tokens is not None else options.tokens
    raw = evaluate_methods(
        sae, model, splits.test, test_mask,
        layers=layers, n_tokens=options.tokens, downstream_tokens=downstream,
        baselines=baselines, with_pca=PCA in options.baselines,
        batch_size=batch_size, to_residual=to_residual,
    )
    seconds, source = mlsae_training_seconds(run_dir)
    data = summarize(raw, layers, sae.cfg.k, sae.cfg.d_sae, sae.cfg.d_in, meta, seconds)
    data["methods"]["mlsae"]["training_seconds_source"] = source
    data["methods"]["mlsae"]["training_tokens"] = cfg.training_tokens
    data["options"] = {
        "tokens": options.tokens, "downstream_tokens": downstream, "baselines": list(options.baselines),
        "layers": layers, "batch_size": batch_size,
    }
    data = merge_with_previous(run_dir / EVAL_FILE, data)  # keep what this eval did not recompute
    atomic_write_json(run_dir / EVAL_FILE, data)
    mean_fvu = data["methods"]["mlsae"]["mean"]["fvu"]  # None when not finite: no "%.4f" of None
    logger.info("wrote %s (MLSAE mean FVU %s over layers %s)", run_dir / EVAL_FILE,
                "n/a" if mean_fvu is None else f"{mean_fvu:.4f}", layers)
    if report:
        build_run_report(run_dir)
    return data
