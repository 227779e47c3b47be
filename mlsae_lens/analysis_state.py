"""What one analysis has accumulated so far, saved as ``stats.safetensors``.

Both streaming accumulators of ``mlsae-lens analyze`` (the latents' layer distribution and the
residual-stream norms), the reference-code estimator of Eq. 11/12 and the position in the test
split, in one file written atomically, so ``--resume`` continues an interrupted analysis with the
very same sums and the report and the explorer redraw everything from it without the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlsae_lens.activation_samples import LatentContexts
from mlsae_lens.analysis.layer_stats import (
    LayerDistributionStats,
    read_safetensors,
    write_safetensors,
)
from mlsae_lens.analysis.reference_ratios import ReferenceRatioStats
from mlsae_lens.analysis.residual import ResidualNormStats
from mlsae_lens.run_dir import TOP_CONTEXTS_FILE
from mlsae_lens.top_contexts_file import save_partial_top_contexts

_STATS_FORMAT = "mlsae_lens.AnalysisStats/1"


@dataclass
class AnalysisStats:
    """Both accumulators of an analysis plus where in the test split it stands.

    ``progress`` holds ``phase`` (``latents`` → ``centered`` → ``done``), ``next_context``
    (first test context of the current pass not yet read), the two token targets and what
    identifies the inputs (weighting, test-split and SAE hashes), so a resume can refuse
    statistics of other data.
    """

    layer: LayerDistributionStats
    resid: ResidualNormStats
    progress: dict[str, Any] = field(default_factory=dict)
    top: LatentContexts | None = None
    """Top contexts, samples and histograms (``mlsae-lens explore``), saved beside as
    ``top_contexts.safetensors`` with every save; :meth:`load` leaves it ``None`` (``top_contexts_file.load_top_contexts`` reads it)."""
    ref: ReferenceRatioStats | None = None
    """Eq. 11/12 as the reference code estimates them (per 2,048-token batch); ``None`` in
    files saved before it was collected."""

    def save(self, path: str | Path) -> None:
        """One safetensors file, written atomically, with both states and the progress."""
        if self.top is not None:  # a crash between the two writes shows in their token counts
            save_partial_top_contexts(
                Path(path).with_name(TOP_CONTEXTS_FILE), self.top, self.progress
            )
        tensors: dict[str, Tensor] = {}
        meta: dict[str, Any] = {"progress": self.progress}
        parts = [("layer", self.layer.state_dict()), ("resid", self.resid.state_dict())]
        if self.ref is not None:
            parts.append(("ref", self.ref.state_dict()))
        for prefix, state in parts:
            meta[prefix] = {}
            for key, value in state.items():
                if isinstance(value, Tensor):
                    tensors[f"{prefix}.{key}"] = value
                else:
                    meta[prefix][key] = value
        write_safetensors(path, tensors, _STATS_FORMAT, meta)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> AnalysisStats:
        """Read a file written by :meth:`save`."""
        tensors, meta = read_safetensors(path, _STATS_FORMAT)

        def part(prefix: str) -> dict[str, Any]:
            state = {
                k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(prefix + ".")
            }
            return {**state, **meta[prefix]}

        layer_meta, resid_meta = meta["layer"], meta["resid"]
        layer = LayerDistributionStats(
            layer_meta["n_layers"], layer_meta["n_latents"], device, layer_meta["weighting"]
        )
        layer.load_state_dict(part("layer"))
        resid = ResidualNormStats(resid_meta["n_layers"], resid_meta["d_model"], device)
        resid.load_state_dict(part("resid"))
        ref = ReferenceRatioStats.from_state_dict(part("ref"), device) if "ref" in meta else None
        return cls(layer, resid, dict(meta["progress"]), ref=ref)

    def merge(self, other: AnalysisStats) -> AnalysisStats:
        """Add another analysis' sums (same MLSAE and weighting; centered sums need the same
        centering means, which :class:`ResidualNormStats` checks). Progress is not merged, and
        the reference estimator is dropped (its batches belong to one stream)."""
        self.ref = None
        self.layer.merge(other.layer)
        self.resid.merge(other.resid)
        if self.top is not None and other.top is not None:
            self.top.merge(other.top)
        return self


__all__ = ["AnalysisStats"]
