"""The two streaming passes of an analysis over a run's test split.

The first pass harvests every layer's ``hook_resid_post`` in test-split order, drops special
tokens and feeds the SAE's top-k code to the latent statistics (``update_sparse``: never a dense
``[tokens, layers, d_sae]`` tensor) and the raw vectors to the residual-norm statistics.
Centering needs the dataset mean of each layer, known only after that pass, so the centered
norms and cosines come from a **second pass that re-harvests the same tokens** with the means
fixed (exact, as the paper defines them; memory stays constant and the cost is one extra model
forward per token, without the SAE).

One model batch is alive at a time (the SAE encodes it in chunks so its dense pre-activations
stay below ~256 MiB), and the statistics are saved with their position every ``every`` tokens,
so a resumed pass ends with the very same sums as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlsae_lens.activations import check_finite, harvest_resid_post, valid_token_vectors
from mlsae_lens.analysis_state import AnalysisStats
from mlsae_lens.config import MultiLayerRunnerConfig
from mlsae_lens.models import LanguageModel
from mlsae_lens.progress import progress_bar
from mlsae_lens.sae import MultiLayerMixin
from mlsae_lens.topk_contexts import valid_token_positions

ENCODE_CHUNK_ELEMENTS = 1 << 26  # dense pre-activations per SAE chunk: 256 MiB of float32


@dataclass
class AnalysisRun:
    """The opened run an analysis reads: its SAE, model and test split."""

    path: Path
    cfg: MultiLayerRunnerConfig
    sae: MultiLayerMixin
    model: LanguageModel
    test: Tensor
    special_mask: Tensor
    provenance: dict[str, Any]


def _test_vectors(
    run: AnalysisRun, batch_size: int, start_context: int, budget: int
) -> Iterator[tuple[int, Tensor]]:
    """``(next_context, [n_valid, n_layers, d_model])`` per model batch, in test-split order,
    until ``budget`` valid tokens have been yielded (the last batch is cut to fit).

    A batch never reads more contexts than the remaining budget could fill, so a small
    remainder does not cost a full model batch.
    """
    n_contexts, context_size = run.test.shape
    start = start_context
    while start < n_contexts and budget > 0:
        stop = min(start + batch_size, start + math.ceil(budget / context_size), n_contexts)
        acts = harvest_resid_post(run.model, run.test[start:stop])
        check_finite(acts, f"test contexts {start}-{stop - 1}")
        vectors = valid_token_vectors(acts, run.special_mask[start:stop])[:budget]
        budget -= vectors.shape[0]
        yield stop, vectors
        start = stop


def _encode_chunks(sae: MultiLayerMixin, vectors: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    """Top-k ``(indices, values)`` of ``vectors`` in chunks bounding the dense pre-activations."""
    cfg = sae.cfg
    step = max(1, ENCODE_CHUNK_ELEMENTS // (cfg.n_layers * cfg.d_sae))
    device = sae.W_enc.device
    for start in range(0, vectors.shape[0], step):
        topk = sae.encode_topk(vectors[start : start + step].to(device))
        yield topk.indices, topk.values


class _Saver:
    """Saves the statistics every ``every`` tokens of a pass."""

    def __init__(self, stats: AnalysisStats, path: Path, every: int, done: int) -> None:
        self.stats, self.path, self.every = stats, path, every
        self.last = done

    def maybe_save(self, done: int, next_context: int) -> None:
        self.stats.progress["next_context"] = next_context
        if done - self.last >= self.every:
            self.stats.save(self.path)
            self.last = done


def _test_batches(
    run: AnalysisRun, batch_size: int, progress: dict[str, Any], budget: int
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """:func:`_test_vectors` from the pass's saved ``next_context`` on, each batch with the
    test-split positions of its vectors (:func:`valid_token_positions`)."""
    first_context = progress["next_context"]
    for next_context, vectors in _test_vectors(run, batch_size, first_context, budget):
        yield next_context, valid_token_positions(run.special_mask, first_context, next_context), vectors
        first_context = next_context


@torch.inference_mode()
def latent_pass(run: AnalysisRun, stats: AnalysisStats, batch_size: int, path: Path, every: int) -> None:
    progress = stats.progress
    target = progress["tokens_target"]
    done = stats.layer.n_tokens
    saver = _Saver(stats, path, every, done)
    with progress_bar(total=target, initial=done, desc="latents + norms", unit="tok") as bar:
        for next_context, positions, vectors in _test_batches(run, batch_size, progress, target - done):
            offset = 0
            for indices, values in _encode_chunks(run.sae, vectors):
                stats.layer.update_sparse(indices, values)
                if stats.ref is not None:
                    stats.ref.update_sparse(indices, values)
                if stats.top is not None:
                    stats.top.update(indices, values, positions[offset : offset + len(indices)])
                offset += len(indices)
            stats.resid.update(vectors, _resid_mask(run, progress, positions, len(vectors)))
            done += vectors.shape[0]
            bar.update(vectors.shape[0])
            saver.maybe_save(done, next_context)
    progress.update(phase="centered", next_context=0)
    stats.save(path)


@torch.inference_mode()
def centered_pass(
    run: AnalysisRun, stats: AnalysisStats, batch_size: int, path: Path, every: int
) -> None:
    progress = stats.progress
    target = progress["centered_target"]
    means = stats.resid.compute().mean_vector
    # Tokens read by this pass (the residual statistics may skip some: --skip-first-position).
    done = progress.get("centered_seen", stats.resid.n_tokens_centered)
    saver = _Saver(stats, path, every, done)
    with progress_bar(total=target, initial=done, desc="centered norms", unit="tok") as bar:
        for next_context, positions, vectors in _test_batches(run, batch_size, progress, target - done):
            mask = _resid_mask(run, progress, positions, len(vectors))
            stats.resid.update_centered(vectors, means, mask)
            done += vectors.shape[0]
            progress["centered_seen"] = done
            bar.update(vectors.shape[0])
            saver.maybe_save(done, next_context)
    progress.update(phase="done", next_context=0)
    stats.save(path)


def _resid_mask(run: AnalysisRun, progress: dict[str, Any], positions: Tensor, n: int) -> Tensor | None:
    """Tokens of the residual statistics: all, or all but each context's first position."""
    if not progress.get("skip_first_position"):
        return None
    return (positions[:n] % run.test.shape[1]) != 0


__all__ = ["ENCODE_CHUNK_ELEMENTS", "AnalysisRun", "centered_pass", "latent_pass"]
