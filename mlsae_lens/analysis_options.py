"""The settings of one analysis (the ``mlsae-lens analyze`` flags), checked when built.

Its own module so that what reads an analysis' files (the explorer, the report) and what runs
one share the settings without importing the analysis command.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlsae_lens.analysis.layer_stats import WEIGHTINGS, Weighting
from mlsae_lens.analysis_prompt import DEFAULT_PROMPT
from mlsae_lens.errors import MLSAEError


@dataclass
class AnalysisOptions:
    """Settings of one analysis (the ``mlsae-lens analyze`` flags)."""

    tokens: int = 100_000
    """Valid (non-special) test tokens to analyse; capped at what the test split holds."""
    prompt: str = DEFAULT_PROMPT
    """Prompt of the single-prompt heatmap and the per-token view."""
    batch_size: int | None = None
    """Contexts per model forward pass (default: sized from the free memory, see
    :mod:`mlsae_lens.memory`; the value used is recorded in ``metrics.json``)."""
    weighting: Weighting = "uniform_tokens"
    """``uniform_tokens`` (the paper's P(T|J)) or ``activation_mass`` (the reference heatmaps)."""
    centered_tokens: int | None = None
    """Tokens of the centered second pass (default: all tokens of the first pass)."""
    save_every_tokens: int = 100_000
    """Save the statistics (and the position) every this many tokens, for ``resume``."""
    resume: bool = False
    """Continue from a partial ``stats.safetensors`` in the run directory."""
    overwrite: bool = False
    """Discard a partial ``stats.safetensors`` and start over."""
    top_contexts: bool | None = None
    """Collect every latent's top-N tokens per layer for ``mlsae-lens explore``
    (``top_contexts.safetensors``); ``None``: only when ``tokens`` <= 1M."""
    top_n: int = 16
    """Tokens kept per (latent, layer) by the top-context collection."""
    skip_first_position: bool = False
    """Leave each context's first position out of the residual-norm statistics (norms, layer
    means, centering, cosines): in packed contexts without BOS it is an outlier whose huge norm
    dominates the layer mean. The latent statistics keep every token."""

    @property
    def collect_top_contexts(self) -> bool:
        """Whether this analysis collects top contexts (the default depends on ``tokens``)."""
        return self.tokens <= 1_000_000 if self.top_contexts is None else self.top_contexts

    def __post_init__(self) -> None:
        positive = {
            "--tokens": self.tokens,
            "--batch-size": self.batch_size,
            "--centered-tokens": self.centered_tokens,
            "--save-every-tokens": self.save_every_tokens,
            "--top-n": self.top_n,
        }
        for flag, value in positive.items():
            if value is not None and value <= 0:
                raise MLSAEError(f"{flag} must be a positive integer, got {value}")
        if self.weighting not in WEIGHTINGS:
            raise MLSAEError(
                f"--weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}"
            )
        if not self.prompt.strip():
            raise MLSAEError(f"--prompt is empty; pass some text, e.g. {DEFAULT_PROMPT!r}")
        if self.resume and self.overwrite:
            raise MLSAEError("--resume and --overwrite contradict each other; pass one of them")


__all__ = ["AnalysisOptions"]
