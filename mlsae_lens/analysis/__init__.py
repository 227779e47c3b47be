"""Statistics over MLSAE latents and residual streams: tensors in, tensors out."""

from mlsae_lens.analysis.layer_result import LayerDistributionResult
from mlsae_lens.analysis.layer_stats import LayerDistributionStats, variance_ratios
from mlsae_lens.analysis.reference_ratios import reference_per_batch_ratios
from mlsae_lens.analysis.residual import ResidualNormResult, ResidualNormStats

__all__ = [
    "LayerDistributionResult",
    "LayerDistributionStats",
    "ResidualNormResult",
    "ResidualNormStats",
    "reference_per_batch_ratios",
    "variance_ratios",
]
