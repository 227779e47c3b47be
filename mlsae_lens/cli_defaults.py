"""Defaults and choices of the subcommands whose own modules import torch and SAELens, spelled
out here so that checking their flags (and printing their ``--help``) takes no seconds of
imports. ``tests/test_cli_validation.py`` checks every value against its source."""

from types import SimpleNamespace

EVAL_BASELINES = ("pca", "saelens-per-layer")
"""``mlsae_lens.baselines.BASELINES``."""

ANALYZE_WEIGHTINGS = ("uniform_tokens", "activation_mass")
"""``mlsae_lens.analysis.layer_stats.WEIGHTINGS``."""

ANALYZE_PROMPT = "When John and Mary went to the store, John gave"
"""``mlsae_lens.analyze.DEFAULT_PROMPT``."""

ANALYZE_DEFAULTS = SimpleNamespace(tokens=100_000, weighting="uniform_tokens", save_every_tokens=100_000, top_n=16)
"""The fields of ``mlsae_lens.analyze.AnalysisOptions()`` that are flags with a default."""

LENS_DEFAULTS = SimpleNamespace(steps=40, tokens_per_step=32, pool_tokens=2048, eval_tokens=256, lr_scale=1.0,
                                momentum=0.9, weight_decay=1e-3, model_batch_size=None, seed=42)
"""The fields of ``mlsae_lens.lens.LensTrainingConfig()`` that are ``train-lens`` flags."""
