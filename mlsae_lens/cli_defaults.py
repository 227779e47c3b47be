"""Defaults and choices of the subcommands whose own modules import torch and SAELens, spelled
out here so that checking their flags (and printing their ``--help``) takes no seconds of
imports. ``tests/test_cli_validation.py`` checks every value against its source."""

from types import SimpleNamespace

EVAL_BASELINES = ("pca", "saelens-per-layer")
"""``mlsae_lens.baselines.BASELINES``."""

ANALYZE_WEIGHTINGS = ("uniform_tokens", "activation_mass")
"""``mlsae_lens.analysis.layer_stats.WEIGHTINGS``."""

ANALYZE_PROMPT = "When John and Mary went to the store, John gave"
"""``mlsae_lens.analysis_prompt.DEFAULT_PROMPT``."""

ANALYZE_DEFAULTS = SimpleNamespace(tokens=100_000, weighting="uniform_tokens", save_every_tokens=100_000, top_n=16)
"""The fields of ``mlsae_lens.analysis_options.AnalysisOptions()`` that are flags with a default."""

LENS_DEFAULTS = SimpleNamespace(steps=40, tokens_per_step=32, pool_tokens=2048, eval_tokens=256, lr_scale=1.0,
                                momentum=0.9, weight_decay=1e-3, model_batch_size=None, seed=42)
"""The fields of ``mlsae_lens.lens.LensTrainingConfig()`` that are ``train-lens`` flags."""


DEMO_DEFAULTS = {"training_tokens": 40_000, "output_dir": None, "lr": 1e-3}
# Config fields `mlsae-lens cache` reads (the others would be ignored, so it does not offer them).
CACHE_FIELDS = ("model_name", "dataset", "text_column", "context_size", "test_fraction", "max_corpus_tokens",
                "training_tokens", "contexts_per_chunk", "batch_size_tokens", "model_batch_size", "seed", "device",
                "model_backend")


# One line per subcommand for `mlsae-lens --help`, which builds no subcommand's parser in full.
COMMAND_HELP = {
    "train": "train an MLSAE on every layer's residual stream",
    "demo": "train a small MLSAE on the embedded model and corpus, evaluate it, write the report",
    "analyze": "latent distributions over layers and residual-stream norms on the test split",
    "compare": "Eq. 11/12 bars and norm profiles of several analysed runs",
    "explore": "browse each latent's top contexts per layer in one offline HTML page",
    "eval": "per-layer reconstruction and downstream-loss metrics, against baselines",
    "cache": "harvest every layer's activations once for a token budget, for many SAEs",
    "train-lens": "train a tuned lens (tuned-lens' TunedLens and KL objective) for --tuned-lens",
    "pretrained": "list the published MLSAEs, or convert one into a run directory",
}
