"""The residual-stream analysis of a trained run: stream the test split, save, report.

``analyze_run`` reads a run's held-out test split in order, harvests every layer's
``hook_resid_post``, drops special tokens and feeds two streaming accumulators:

* :class:`~mlsae_lens.analysis.LayerDistributionStats` with the SAE's top-k code
  (``update_sparse``: never a dense ``[tokens, layers, d_sae]`` tensor), for P(L|J), E[L|J]
  and the Eq. 11/12 variance ratios;
* :class:`~mlsae_lens.analysis.ResidualNormStats` for the norm and adjacent-cosine profiles.

Centering needs the dataset mean of each layer, known only after the first pass, so the
centered norms and cosines come from a **second pass that re-harvests the same tokens** with
the means fixed (exact, as the paper defines them; memory stays constant and the cost is one
extra model forward per token, without the SAE). ``centered_tokens`` caps that pass for long
runs; the means always come from every token of the first pass.

Memory does not grow with the number of tokens: accumulators are ``O(d_sae * n_layers)`` and
one model batch is alive at a time (the SAE encodes it in chunks so its dense pre-activations
stay below ~256 MiB). The accumulators and the position in the test split are saved atomically
to ``stats.safetensors`` every ``save_every_tokens`` tokens, so ``resume=True`` continues an
interrupted analysis and ends with the very same sums as an uninterrupted one.

Everything the report draws is saved (``metrics.json`` + ``stats.safetensors`` next to the
training's ``training_log.json`` and ``eval.json``), and :func:`build_run_report` redraws
``report.html`` from those files alone.
"""

from __future__ import annotations

import hashlib
import html
import importlib.metadata
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlsae_lens.activation_samples import LatentContexts
from mlsae_lens.activations import check_finite, harvest_resid_post, valid_token_vectors
from mlsae_lens.analysis.layer_stats import (
    WEIGHTINGS,
    LayerDistributionStats,
    Weighting,
    read_safetensors,
    write_safetensors,
)
from mlsae_lens.analysis.reference_ratios import ReferenceRatioStats
from mlsae_lens.analysis.residual import ResidualNormResult, ResidualNormStats
from mlsae_lens.checkpoint import atomic_write_json
from mlsae_lens.config import MultiLayerRunnerConfig
from mlsae_lens.errors import MLSAEError
from mlsae_lens.figures import (
    adjacent_cosine_figure,
    eval_metrics_figure,
    frequency_histogram_figure,
    latent_token_figure,
    layer_heatmap_figure,
    layer_moment_histograms_figure,
    residual_norm_figure,
    training_curve_figure,
    variance_ratio_figure,
)
from mlsae_lens.memory import FLOAT_BYTES, resolve_model_batch_size
from mlsae_lens.models import LanguageModel
from mlsae_lens.progress import progress_bar
from mlsae_lens.report import ReportSection, table_html, write_report
from mlsae_lens.sae import MultiLayerMixin
from mlsae_lens.topk_contexts import valid_token_positions

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "When John and Mary went to the store, John gave"
"""The IOI prompt of the paper's single-prompt heatmaps (Wang et al. 2022)."""

METRICS_FILE = "metrics.json"
STATS_FILE = "stats.safetensors"
REPORT_FILE = "report.html"
_STATS_FORMAT = "mlsae_lens.AnalysisStats/1"
_ENCODE_CHUNK_ELEMENTS = 1 << 26  # dense pre-activations per SAE chunk: 256 MiB of float32


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


# ---------------------------------------------------------------------- saved statistics


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
    ``top_contexts.safetensors`` with every save; :meth:`load` leaves it ``None`` (``explorer.load_top_contexts`` reads it)."""
    ref: ReferenceRatioStats | None = None
    """Eq. 11/12 as the reference code estimates them (per 2,048-token batch); ``None`` in
    files saved before it was collected."""

    def save(self, path: str | Path) -> None:
        """One safetensors file, written atomically, with both states and the progress."""
        if self.top is not None:  # a crash between the two writes shows in their token counts
            from mlsae_lens.explorer import TOP_CONTEXTS_FILE, save_partial_top_contexts

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


# ---------------------------------------------------------------------- opening a run


@dataclass
class _Run:
    path: Path
    cfg: MultiLayerRunnerConfig
    sae: MultiLayerMixin
    model: LanguageModel
    test: Tensor
    special_mask: Tensor
    provenance: dict[str, Any]


def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        raise MLSAEError(
            f"run directory {run_dir} does not exist; pass the --output-dir of a training run"
        )
    if not run_dir.is_dir():
        raise MLSAEError(
            f"{run_dir} is a file, not a run directory; pass the --output-dir of a training run"
        )
    if not (run_dir / "run.json").is_file():
        raise MLSAEError(
            f"{run_dir} is not an mlsae-lens run directory (no run.json); pass the --output-dir "
            "of a training run"
        )


def _open_run(
    run_dir: Path,
    model: LanguageModel | None,
    splits: Any,
    device: str,
) -> _Run:
    """The run's SAE, model and test split; ``model``/``splits`` skip loading them."""
    from mlsae_lens.data import special_token_mask
    from mlsae_lens.models import load_model
    from mlsae_lens.pipeline import check_sae_fits_model, load_run, load_sae
    from mlsae_lens.run_dir import load_run_config

    _check_run_dir(run_dir)
    if splits is None:
        run = load_run(run_dir, model=model, device=device)
        cfg, sae, model, splits = run.cfg, run.sae, run.model, run.splits
        special_mask = run.test_special_mask
    else:
        cfg = load_run_config(run_dir)
        sae = load_sae(run_dir, device)
        model = model if model is not None else load_model(cfg.model_name, device=device, backend=cfg.model_backend)
        check_sae_fits_model(sae, model)
        special_mask = special_token_mask(splits.test, model.tokenizer)
    sae.eval()
    return _Run(run_dir, cfg, sae, model, splits.test, special_mask, dict(splits.provenance))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------- streaming


def _test_vectors(
    run: _Run, batch_size: int, start_context: int, budget: int
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
    step = max(1, _ENCODE_CHUNK_ELEMENTS // (cfg.n_layers * cfg.d_sae))
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


@torch.inference_mode()
def _latent_pass(run: _Run, stats: AnalysisStats, batch_size: int, path: Path, every: int) -> None:
    progress = stats.progress
    target = progress["tokens_target"]
    done = stats.layer.n_tokens
    saver = _Saver(stats, path, every, done)
    with progress_bar(total=target, initial=done, desc="latents + norms", unit="tok") as bar:
        first_context = progress["next_context"]
        for next_context, vectors in _test_vectors(
            run, batch_size, progress["next_context"], target - done
        ):
            positions = valid_token_positions(run.special_mask, first_context, next_context)
            first_context, offset = next_context, 0
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
def _centered_pass(
    run: _Run, stats: AnalysisStats, batch_size: int, path: Path, every: int
) -> None:
    progress = stats.progress
    target = progress["centered_target"]
    means = stats.resid.compute().mean_vector
    # Tokens read by this pass (the residual statistics may skip some: --skip-first-position).
    done = progress.get("centered_seen", stats.resid.n_tokens_centered)
    saver = _Saver(stats, path, every, done)
    with progress_bar(total=target, initial=done, desc="centered norms", unit="tok") as bar:
        first_context = progress["next_context"]
        for next_context, vectors in _test_vectors(
            run, batch_size, progress["next_context"], target - done
        ):
            positions = valid_token_positions(run.special_mask, first_context, next_context)
            first_context = next_context
            mask = _resid_mask(run, progress, positions, len(vectors))
            stats.resid.update_centered(vectors, means, mask)
            done += vectors.shape[0]
            progress["centered_seen"] = done
            bar.update(vectors.shape[0])
            saver.maybe_save(done, next_context)
    progress.update(phase="done", next_context=0)
    stats.save(path)


_IDENTITY_DEFAULTS = {"skip_first_position": False}
"""Values of identity keys that statistics saved before the key existed were made with."""


def _resid_mask(run: _Run, progress: dict[str, Any], positions: Tensor, n: int) -> Tensor | None:
    """Tokens of the residual statistics: all, or all but each context's first position."""
    if not progress.get("skip_first_position"):
        return None
    return (positions[:n] % run.test.shape[1]) != 0


def _start_or_resume(
    run: _Run, options: AnalysisOptions, identity: dict[str, Any]
) -> AnalysisStats:
    """Fresh statistics, or the saved ones after checking they belong to these inputs."""
    path = run.path / STATS_FILE
    saved_phase = None
    if path.exists() and not options.overwrite:
        try:
            saved = AnalysisStats.load(path, run.sae.W_enc.device)
        except MLSAEError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise MLSAEError(
                f"{path} is damaged ({type(exc).__name__}: {exc}); delete it or pass --overwrite"
            ) from exc
        saved_phase = saved.progress.get("phase")
    if options.resume:
        if saved_phase is None:
            raise MLSAEError(
                f"--resume: {run.path} has no {STATS_FILE} yet; run the analysis without --resume"
            )
        for key, value in identity.items():
            if saved.progress.get(key, _IDENTITY_DEFAULTS.get(key)) != value:
                raise MLSAEError(
                    f"--resume: {path} was made with {key}={saved.progress.get(key)!r}, not "
                    f"{value!r}; pass the same settings, or --overwrite to start over"
                )
        logger.info(
            "resuming the analysis at phase %r, %d tokens done", saved_phase, saved.layer.n_tokens
        )
        return saved
    if saved_phase is not None and saved_phase != "done" and not options.overwrite:
        raise MLSAEError(
            f"{run.path} holds a partial analysis ({saved.layer.n_tokens} of "
            f"{saved.progress.get('tokens_target')} tokens); pass --resume to continue it or "
            "--overwrite to start over"
        )
    sae_cfg, device = run.sae.cfg, run.sae.W_enc.device
    return AnalysisStats(
        LayerDistributionStats(sae_cfg.n_layers, sae_cfg.d_sae, device, options.weighting),
        ResidualNormStats(sae_cfg.n_layers, sae_cfg.d_in, device),
        {**identity, "phase": "latents", "next_context": 0},
        ref=ReferenceRatioStats(sae_cfg.n_layers, sae_cfg.d_sae, device=device),
    )


# ---------------------------------------------------------------------- the prompt


def tokenize_prompt(model: LanguageModel, text: str) -> tuple[Tensor, list[str]]:
    """Token ids ``[pos]`` and their strings, with BOS only where the model expects one.

    Raises :class:`MLSAEError` for an empty prompt or one longer than the model's context.
    """
    if not text.strip():
        raise MLSAEError(f"--prompt is empty; pass some text, e.g. {DEFAULT_PROMPT!r}")
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise MLSAEError("the model has no tokenizer, so a text prompt cannot be tokenized")
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    bos = getattr(tokenizer, "bos_token_id", None)
    if model.cfg.default_prepend_bos and bos is not None:
        ids = [int(bos), *ids]
    if len(ids) > model.cfg.n_ctx:
        raise MLSAEError(
            f"--prompt has {len(ids)} tokens but the model's context holds at most "
            f"{model.cfg.n_ctx}; shorten it"
        )
    return torch.tensor(ids, dtype=torch.long), [tokenizer.decode([i]) for i in ids]


@torch.inference_mode()
def analyze_prompt(
    sae: MultiLayerMixin,
    model: LanguageModel,
    text: str,
    weighting: Weighting = "uniform_tokens",
) -> dict[str, Any]:
    """P(L|J) over one prompt's (non-special) tokens and the strongest latent per token.

    Returns a JSON-able dict: ``tokens`` (strings), ``token_ids``, ``latents`` (active on the
    prompt, sorted by the prompt's E[L|J]), ``layer_given_latent`` (one row per listed latent),
    ``expected_layer``, ``top_latent`` (largest total activation over the prompt) and
    ``top_latent_activations`` ``[tokens][layers]``, plus the prompt's own Eq. 11/12 ratios.
    """
    from mlsae_lens.data import special_token_mask

    ids, strings = tokenize_prompt(model, text)
    keep = ~special_token_mask(ids, model.tokenizer)
    if not bool(keep.any()):
        raise MLSAEError(f"--prompt {text!r} holds only special tokens; pass some ordinary text")
    acts = harvest_resid_post(model, ids[None])[0]  # [pos, n_layers, d]
    check_finite(acts, "the prompt")
    topk = sae.encode_topk(acts[keep.to(acts.device)].to(sae.W_enc.device))
    values, indices = topk.values.double().cpu(), topk.indices.cpu()
    stats = LayerDistributionStats(sae.cfg.n_layers, sae.cfg.d_sae, "cpu", weighting)
    stats.update_sparse(indices, values)
    result = stats.compute()
    order = result.latent_order
    totals = torch.zeros(sae.cfg.d_sae, dtype=torch.float64).index_add_(
        0, indices.reshape(-1), values.reshape(-1)
    )
    top = int(totals.argmax())
    top_acts = (values * (indices == top)).sum(-1)  # [tokens, n_layers]
    p_layer = result.layer_given_latent[order]
    row, layer = p_layer.nonzero(as_tuple=True)  # at most tokens * n_layers * k entries
    return {
        "text": text,
        "token_ids": ids[keep].tolist(),
        "tokens": [s for s, k in zip(strings, keep.tolist(), strict=True) if k],
        "n_special_tokens_dropped": int((~keep).sum()),
        "weighting": weighting,
        "latents": order.tolist(),
        "layer_given_latent": {
            "shape": list(p_layer.shape),
            "row": row.tolist(),
            "layer": layer.tolist(),
            "value": p_layer[row, layer].tolist(),
        },
        "expected_layer": result.expected_layer[order].tolist(),
        "top_latent": top,
        "top_latent_total_activation": float(totals[top]),
        "top_latent_activations": top_acts.tolist(),
        "latent_ratio": _json_float(result.latent_ratio),
        "token_ratio": _json_float(result.token_ratio),
    }


# ---------------------------------------------------------------------- the command


def analyze_run(
    run_dir: str | Path,
    options: AnalysisOptions | None = None,
    *,
    model: LanguageModel | None = None,
    splits: Any = None,
    device: str = "cpu",
    report: bool = True,
) -> dict[str, Any]:
    """Analyse a trained run on its test split; write ``stats.safetensors``, ``metrics.json``
    and (with ``report``) ``report.html`` into ``run_dir``.

    Args:
        run_dir: A training run's ``--output-dir``.
        options: Token budget, prompt, weighting, resume, ...
        model: The run's model, already loaded (else loaded from ``run.json``'s name).
        splits: The run's :class:`~mlsae_lens.data.TokenSplits` (else rebuilt from its corpus).
        device: Where to load the SAE (and the model, if not given).
        report: Rebuild ``report.html`` from everything in ``run_dir`` afterwards.

    Returns:
        The dict written to ``metrics.json``.
    """
    from mlsae_lens.data import tensor_sha256

    options = options or AnalysisOptions()
    run_dir = Path(run_dir)
    _check_run_dir(run_dir)
    run = _open_run(run_dir, model, splits, device)
    tokenize_prompt(run.model, options.prompt)  # fail fast, before the long pass
    available = int((~run.special_mask).sum())
    if available == 0:
        raise MLSAEError(f"the test split of {run_dir} holds no valid tokens; use a larger corpus")
    target = min(options.tokens, available)
    if target < options.tokens:
        logger.warning(
            "the test split holds only %d valid tokens; analysing all of them instead of %d",
            available,
            options.tokens,
        )
    identity = {
        "weighting": options.weighting,
        "tokens_target": target,
        "centered_target": min(options.centered_tokens or target, target),
        "test_sha256": tensor_sha256(run.test),
        "sae_sha256": _file_sha256(run_dir / "sae_weights.safetensors"),
        "skip_first_position": options.skip_first_position,
    }
    stats = _start_or_resume(run, options, identity)
    from mlsae_lens.explorer import finalize_top_contexts, start_or_resume_top_contexts

    stats.top = start_or_resume_top_contexts(run_dir, stats, options, run.sae)
    # Sized from this machine's free memory, not the run's: analysis may run elsewhere. The SAE's
    # dense pre-activations are bounded separately (_ENCODE_CHUNK_ELEMENTS); per token the pass
    # also keeps the valid-token copy of every layer's vector.
    mcfg = run.model.cfg
    batch_size = resolve_model_batch_size(
        options.batch_size, mcfg, run.test.shape[1], mcfg.device, what="--batch-size",
        extra_bytes_per_token=FLOAT_BYTES * mcfg.n_layers * mcfg.d_model,
    )
    path = run_dir / STATS_FILE
    start = time.perf_counter()
    if stats.progress["phase"] == "latents":
        _latent_pass(run, stats, batch_size, path, options.save_every_tokens)
    if stats.progress["phase"] == "centered":
        _centered_pass(run, stats, batch_size, path, options.save_every_tokens)
    if stats.top is not None:
        finalize_top_contexts(run_dir, stats.top, stats.progress, run.model, run.sae, run.test)
    seconds = time.perf_counter() - start

    prompt = analyze_prompt(run.sae, run.model, options.prompt, options.weighting)
    metrics = _metrics(run, stats, prompt, options, available, batch_size)
    metrics["analysis"]["seconds_this_invocation"] = seconds
    atomic_write_json(run_dir / METRICS_FILE, metrics)
    layer = metrics["layer_distribution"]
    logger.info(
        "Eq. 11 E[Var(L|J)]/Var(L) = %s, Eq. 12 E[Var(L|J,T)]/E[Var(L|J)] = %s over %d tokens "
        "(%d latents never active)",
        _fmt(layer["latent_ratio"]),
        _fmt(layer["token_ratio"]),
        layer["n_tokens"],
        layer["n_dead_latents"],
    )
    if report:
        build_run_report(run_dir)
    return metrics


def _metrics(
    run: _Run,
    stats: AnalysisStats,
    prompt: dict[str, Any],
    options: AnalysisOptions,
    available: int,
    batch_size: int,
) -> dict[str, Any]:
    sae_cfg = run.sae.cfg
    mcfg = run.model.cfg
    return {
        "format": "mlsae_lens.analysis/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "layer_distribution": stats.layer.compute().to_dict(),
        "reference_ratios": stats.ref.compute() if stats.ref is not None else None,
        "residual": stats.resid.compute().to_dict(),
        "prompt": prompt,
        "analysis": {
            "split": "test",
            "tokens_requested": options.tokens,
            "tokens_available": available,
            "tokens_analysed": stats.layer.n_tokens,
            "centered_tokens": stats.resid.n_tokens_centered,
            "centering": "second pass re-harvesting the first centered_tokens tokens, with the "
            "per-layer means of the whole first pass",
            "special_tokens": "dropped (BOS/EOS/PAD/UNK of the tokenizer)",
            "skip_first_position": options.skip_first_position,
            "residual_tokens": "every analysed token except each context's first position"
            if options.skip_first_position
            else "every analysed token",
            "weighting": options.weighting,
            "model_batch_size": batch_size,
            "test_sha256": stats.progress["test_sha256"],
            "sae_sha256": stats.progress["sae_sha256"],
        },
        "sae": {
            "d_in": sae_cfg.d_in,
            "d_sae": sae_cfg.d_sae,
            "k": sae_cfg.k,
            "n_layers": sae_cfg.n_layers,
            "normalization": sae_cfg.normalization,
            "expansion_factor": sae_cfg.d_sae // sae_cfg.d_in,
        },
        "model": {
            "name": run.cfg.model_name,
            "n_layers": mcfg.n_layers,
            "d_model": mcfg.d_model,
            "n_ctx": mcfg.n_ctx,
        },
        "data": run.provenance,
        "run_config": run.cfg.to_dict(),
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    from mlsae_lens import __version__

    out = {"mlsae-lens": __version__}  # run from a checkout, the package may not be installed
    for name in ("torch", "transformer-lens", "sae-lens"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _fmt(x: float | None) -> str:
    return "undefined" if x is None else f"{x:.4f}"


# ---------------------------------------------------------------------- the report


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MLSAEError(
            f"{path} is not valid JSON ({exc}); rerun the step that writes it"
        ) from exc


def build_run_report(run_dir: str | Path) -> Path:
    """Draw ``report.html`` from what ``run_dir`` holds: run config, training log,
    evaluation (``eval.json``) and analysis (``metrics.json`` + ``stats.safetensors``).

    Sections whose files are absent are left out, so the demo and ``analyze`` share one report.
    """
    run_dir = Path(run_dir)
    _check_run_dir(run_dir)
    cfg = _read_json(run_dir / "run.json")
    sections = [_run_section(run_dir, cfg)]
    log_file = run_dir / "training_log.json"
    if log_file.is_file() and (log := _read_json(log_file)):
        sections.append(ReportSection(title="Training", figures=[training_curve_figure(log)]))
    if (run_dir / "eval.json").is_file():
        k = cfg.get("k", "k")  # names the PCA floor's rank
        eval_data = _read_json(run_dir / "eval.json")
        sections.append(_reconstruction_section(eval_data, k))
        if eval_data.get("methods"):
            sections.append(_evaluation_section(eval_data))
    if (run_dir / METRICS_FILE).is_file():
        metrics = _read_json(run_dir / METRICS_FILE)
        stats_path = run_dir / STATS_FILE
        stats = AnalysisStats.load(stats_path) if stats_path.is_file() else None
        sections += _analysis_sections(metrics, stats)
    title = f"MLSAE report — {cfg.get('model_name', run_dir.name)}"
    return write_report(run_dir / REPORT_FILE, title, sections)


def _run_section(run_dir: Path, cfg: dict[str, Any]) -> ReportSection:
    table: dict[str, Any] = {"run directory": str(run_dir), "model": cfg.get("model_name")}
    if (run_dir / "cfg.json").is_file():
        sae_cfg = _read_json(run_dir / "cfg.json")
        table.update(
            layers=sae_cfg.get("n_layers"),
            d_in=sae_cfg.get("d_in"),
            d_sae=sae_cfg.get("d_sae"),
            k=sae_cfg.get("k"),
            normalization=sae_cfg.get("normalization"),
        )
    log_file = run_dir / "training_log.json"
    if log_file.is_file() and (log := _read_json(log_file)):
        table["training tokens"] = log[-1].get("tokens")
    parts = [table_html(table)]
    if (run_dir / "splits.json").is_file():
        corpus = _read_json(run_dir / "splits.json").get("train")
        if corpus:
            parts.append("<h3>Corpus (training split)</h3>" + table_html(corpus))
    parts.append("<h3>Configuration (run.json)</h3>" + table_html(cfg))
    return ReportSection(title="Run", html="".join(parts))


def _reconstruction_section(data: dict[str, Any], k: int) -> ReportSection:
    from mlsae_lens.evals import ReconstructionResult
    from mlsae_lens.pipeline import reconstruction_section

    per_layer = data["per_layer"]
    result = ReconstructionResult(
        n_tokens=data["n_tokens"],
        fvu=torch.tensor(per_layer["fvu"]),
        mse=torch.tensor(per_layer["mse"]),
        l0=torch.tensor(per_layer["l0"]),
        l1=torch.tensor(per_layer["l1"]),
        dead_fraction=data["dead_fraction"],
        pca_fvu=torch.tensor(per_layer["pca_fvu"]) if "pca_fvu" in per_layer else None,
    )
    return reconstruction_section(result, len(per_layer["fvu"]), k)


def _evaluation_section(data: dict[str, Any]) -> ReportSection:
    """MLSAE vs baselines from eval.json: the comparison table, metrics per layer, firing."""
    from mlsae_lens.evals import comparison_table

    rows = comparison_table(data)
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join(
        "<tr>" + "".join(
            f"<td>{'—' if v is None else html.escape(f'{v:.4g}' if isinstance(v, float) else str(v))}</td>"
            for v in row.values()
        ) + "</tr>"
        for row in rows
    )
    down = data.get("downstream")
    note = (
        f"<p>{data['n_tokens']} test tokens for reconstruction"
        + (f", {down['n_predicted_positions']} predicted positions for the downstream metrics "
           f"(clean CE {down['ce_loss_without_sae']:.4f} nats)" if down else "")
        + f"; means over layers {data['layers'] if len(data['layers']) < 12 else 'all'}. "
        "FVU in the MLSAE's normalized space; Δ CE and KL(clean ‖ spliced) splice a "
        "reconstruction into one layer's hook_resid_post (non-special positions only) and run "
        "the rest of the model; CE loss recovered is SAELens' ce_loss_score (relative to zero- "
        "or mean-ablation of that layer). PCA is fit in-sample on the evaluated tokens.</p>"
    )
    histograms = {
        m["label"]: m["frequency_histogram"]
        for m in data["methods"].values()
        if m.get("frequency_histogram")
    }
    figures = [eval_metrics_figure(data["methods"], data["layers"], data["n_layers"])]
    if histograms:
        figures.append(frequency_histogram_figure(histograms))
    return ReportSection(
        title="Evaluation: MLSAE vs baselines",
        html=note + f"<table><tr>{head}</tr>{body}</table>",
        figures=figures,
    )


_FIRST_POSITION_NOTE = (
    "<p>Why the centered norm can exceed the raw norm at middle layers: the first position of "
    "each packed context (in SmolLM2, which has no BOS token, whatever token starts the "
    "context) carries a residual vector far larger than every other position's (~23,600 vs "
    "~150 at SmolLM2's layers 11–27), so it dominates the layer mean μ<sub>l</sub>, and "
    "subtracting μ<sub>l</sub> adds a large, nearly constant vector to every ordinary token "
    "(only the RMS centered norm is bounded by the raw RMS norm, not the mean norm).</p>"
)


def _analysis_sections(metrics: dict[str, Any], stats: AnalysisStats | None) -> list[ReportSection]:
    layer = metrics["layer_distribution"]
    info = metrics["analysis"]
    ratios_table = {
        "Eq. 11  E[Var(L|J)] / Var(L)": layer["latent_ratio"],
        "Eq. 12  E[Var(L|J,T)] / E[Var(L|J)]": layer["token_ratio"],
        "Var(L)": layer["total_variance_identity_lhs"],
        "E[Var(L|J)] + Var(E[L|J])  (= Var(L))": layer["total_variance_identity_rhs"],
        "E[Var(L|J)]": layer["within_latent_identity_lhs"],
        "E[Var(L|J,T)] + E_J[Var_T(E[L|J,T])]  (= E[Var(L|J)])": layer[
            "within_latent_identity_rhs"
        ],
        "active latents": layer["n_active_latents"],
        "never-active latents": layer["n_dead_latents"],
        "latents (d_sae)": layer["n_latents"],
        "test tokens": layer["n_tokens"],
        "weighting": layer["weighting"],
    }
    reference = metrics.get("reference_ratios")
    if reference:
        ratios_table["Eq. 11, reference estimator"] = reference["latent_ratio"]
        ratios_table["Eq. 12, reference estimator"] = reference["token_ratio"]
        n_batches, last = reference["n_batches"], reference["last_batch_tokens"]
        ratios_table["reference batches"] = (
            f"{n_batches} of {reference['batch_tokens']} tokens"
            + ("" if last == reference["batch_tokens"] else f" (the last of {last})")
        )
    run_name = metrics["model"]["name"]
    latent_figures = [
        variance_ratio_figure({run_name: layer}, {run_name: reference} if reference else None)
    ]
    note = ""
    if stats is not None:
        result = stats.layer.compute()
        latent_figures += [
            layer_heatmap_figure(
                result.layer_given_latent,
                result.latent_order,
                f"P(L|J) over {result.n_tokens} test tokens",
            ),
            layer_moment_histograms_figure(result.expected_layer, result.var_layer_given_latent),
        ]
    else:
        note = f"<p>{STATS_FILE} is missing, so the heatmap and histograms are not drawn.</p>"
    p_token = (
        "P(T|J) uniform over the tokens where the latent is active (the paper)"
        if layer["weighting"] == "uniform_tokens"
        else "P(T|J) proportional to the latent's total activation on each token (the reference "
        "heatmaps)"
    )
    sections = [
        ReportSection(
            title="Latent distributions over layers",
            html=(
                "<p>P(L=l|T=t,J=j) ∝ h<sub>j</sub>(x<sub>t,l</sub>) (Eq. 10); "
                f"{p_token}; P(J) uniform over active latents. Layers are 0-based; variances "
                "are in layers². Both law-of-total-variance identities are shown with both "
                "sides. The bars give Eq. 11/12 by the paper's definition (over all analysed "
                "tokens)"
                + (
                    " and, hatched, as the reference code estimates them (per batch of "
                    f"{reference['batch_tokens']} tokens over every latent, dead ones included, "
                    "un-renormalised, then averaged over batches; special tokens dropped here)"
                    if reference
                    else ""
                )
                + ".</p>"
                + note
            ),
            figures=latent_figures,
            table=ratios_table,
        )
    ]
    prompt = metrics.get("prompt")
    if prompt:
        sparse = prompt["layer_given_latent"]
        p_layer = torch.zeros(sparse["shape"], dtype=torch.float64)
        values = torch.tensor(sparse["value"], dtype=torch.float64)
        p_layer[sparse["row"], sparse["layer"]] = values
        sections.append(
            ReportSection(
                title="Single prompt",
                html=(
                    f"<p>Prompt: <code>{html.escape(prompt['text'])}</code> "
                    f"({len(prompt['tokens'])} tokens; {prompt['n_special_tokens_dropped']} "
                    "special tokens dropped). Latents active on the prompt only, sorted by the "
                    "prompt's E[L|J].</p>"
                ),
                figures=[
                    layer_heatmap_figure(
                        p_layer,
                        torch.arange(p_layer.shape[0]),
                        f"P(L|J) over the prompt ({p_layer.shape[0]} active latents)",
                        latent_ids=torch.tensor(prompt["latents"], dtype=torch.long),
                    ),
                    latent_token_figure(
                        torch.tensor(prompt["top_latent_activations"]),
                        prompt["tokens"],
                        prompt["top_latent"],
                    ),
                ],
                table={
                    "Eq. 11 on the prompt": prompt["latent_ratio"],
                    "Eq. 12 on the prompt": prompt["token_ratio"],
                    "latent with the largest total activation": prompt["top_latent"],
                },
            )
        )
    if stats is not None:
        resid = stats.resid.compute()
        name = metrics["model"]["name"]
        skipped = info.get("skip_first_position", False)
        sections.append(
            ReportSection(
                title="Residual stream",
                html=(
                    "<p>Mean L2 norm and adjacent-layer cosine similarity of hook_resid_post, raw "
                    "and after subtracting each layer's mean over the analysed tokens (Fig. 4). "
                    "Relative layer (l + 1) / n_layers: layer l is the output of l + 1 blocks.</p>"
                    + _FIRST_POSITION_NOTE
                    + (
                        "<p>This analysis left each context's first position out of these "
                        "statistics (--skip-first-position).</p>"
                        if skipped
                        else "<p>Every analysed token is included; <code>mlsae-lens analyze "
                        "--skip-first-position</code> leaves each context's first position "
                        "out of these statistics and the layer means.</p>"
                    )
                ),
                figures=[
                    residual_norm_figure({name: resid}),
                    adjacent_cosine_figure({name: resid}),
                ],
                table={
                    "tokens (raw)": resid.n_tokens,
                    "tokens (centered pass)": resid.n_tokens_centered,
                },
            )
        )
    sections.append(
        ReportSection(
            title="Analysis provenance",
            table={
                **info,
                "model": metrics["model"],
                "sae": metrics["sae"],
                "data": metrics["data"],
                "versions": metrics["versions"],
                "created": metrics["created"],
            },
        )
    )
    return sections


# ---------------------------------------------------------------------- compare


def compare_runs(run_dirs: Sequence[str | Path], output: str | Path) -> Path:
    """Eq. 11/12 bars (paper Fig. 5) and overlaid norm profiles of several analysed runs."""
    if not run_dirs:
        raise MLSAEError("compare needs at least one run directory")
    paths = [Path(p) for p in run_dirs]
    seen: dict[Path, Path] = {}
    for path in paths:  # one run under two spellings (run, ./run, a symlink) is one run
        first = seen.setdefault(path.resolve(), path)
        if first is not path:
            same = f"{first} twice" if str(first) == str(path) else f"one run twice ({first} and {path})"
            raise MLSAEError(f"compare was given {same}; pass each run directory once")
    labels = _labels(paths)
    ratios: dict[str, dict[str, Any]] = {}
    norms: dict[str, ResidualNormResult] = {}
    table: dict[str, Any] = {}
    for path, label in zip(paths, labels, strict=True):
        _check_run_dir(path)
        metrics_file, stats_file = path / METRICS_FILE, path / STATS_FILE
        if not metrics_file.is_file() or not stats_file.is_file():
            raise MLSAEError(
                f"{path} has no analysis ({METRICS_FILE} + {STATS_FILE}); run "
                f"`mlsae-lens analyze {path}` first"
            )
        metrics = _read_json(metrics_file)
        layer = metrics["layer_distribution"]
        ratios[label] = layer
        norms[label] = AnalysisStats.load(stats_file).resid.compute()
        sae = metrics["sae"]
        table[label] = (
            f"{metrics['model']['name']}, R={sae['expansion_factor']}, k={sae['k']}: "
            f"Eq. 11 {_fmt(layer['latent_ratio'])}, Eq. 12 {_fmt(layer['token_ratio'])} over "
            f"{layer['n_tokens']} tokens ({layer['weighting']})"
        )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    sections = [
        ReportSection(
            title="Variance ratios (Eqs. 11 and 12)",
            figures=[variance_ratio_figure(ratios)],
            table=table,
        ),
        ReportSection(
            title="Residual stream",
            figures=[residual_norm_figure(norms), adjacent_cosine_figure(norms)],
        ),
    ]
    return write_report(output, f"MLSAE comparison of {len(paths)} runs", sections)


def _labels(paths: Sequence[Path]) -> list[str]:
    """Directory names, or full paths where two names collide."""
    names = [p.name or str(p) for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]


__all__ = [
    "DEFAULT_PROMPT",
    "AnalysisOptions",
    "AnalysisStats",
    "analyze_prompt",
    "analyze_run",
    "build_run_report",
    "compare_runs",
    "tokenize_prompt",
]
