"""The content of ``eval.json``: per method, per-layer metrics, their means and scalars.

Turns :func:`~mlsae_lens.eval_methods.evaluate_methods`' accumulators into the JSON-able
evaluation (NaN becomes ``null``), with the downstream section when it was measured.
"""

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mlsae_lens.eval_downstream import (
    MEAN_ABLATION,
    ZERO_ABLATION,
    DownstreamStats,
    downstream_scores,
)
from mlsae_lens.eval_methods import frequency_histogram
from mlsae_lens.evals import ReconstructionResult

EVAL_FORMAT = "mlsae_lens.eval/2"


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



__all__ = ["EVAL_FORMAT", "method_summary", "summarize"]
