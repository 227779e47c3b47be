"""``mlsae-lens analyze``: the residual-stream analysis of a trained run, saved and reported.

``analyze_run`` opens a run (:mod:`mlsae_lens.run_files`), streams its held-out test split
through two accumulators (:mod:`mlsae_lens.analysis_stream`):

* :class:`~mlsae_lens.analysis.LayerDistributionStats` with the SAE's top-k code, for P(L|J),
  E[L|J] and the Eq. 11/12 variance ratios;
* :class:`~mlsae_lens.analysis.ResidualNormStats` for the norm and adjacent-cosine profiles,

and, for the explorer, every latent's top contexts. ``centered_tokens`` caps the centered
second pass for long runs; the means always come from every token of the first pass.

Memory does not grow with the number of tokens: accumulators are ``O(d_sae * n_layers)`` and
one model batch is alive at a time. The accumulators and the position in the test split are
saved atomically to ``stats.safetensors`` every ``save_every_tokens`` tokens, so
``resume=True`` continues an interrupted analysis and ends with the very same sums as an
uninterrupted one (this module checks that a resume reads the same inputs).

Everything the report draws is saved (``metrics.json`` + ``stats.safetensors`` next to the
training's ``training_log.json`` and ``eval.json``), and
:func:`~mlsae_lens.run_report.build_run_report` redraws ``report.html`` from those files alone.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import time
from pathlib import Path
from typing import Any

from mlsae_lens.activation_samples import LatentContexts
from mlsae_lens.analysis.layer_stats import LayerDistributionStats
from mlsae_lens.analysis.reference_ratios import ReferenceRatioStats
from mlsae_lens.analysis.residual import ResidualNormStats
from mlsae_lens.analysis_options import AnalysisOptions
from mlsae_lens.analysis_prompt import analyze_prompt, tokenize_prompt
from mlsae_lens.analysis_state import AnalysisStats
from mlsae_lens.analysis_stream import AnalysisRun, centered_pass, latent_pass
from mlsae_lens.checkpoint import atomic_write_json
from mlsae_lens.errors import MLSAEError
from mlsae_lens.memory import FLOAT_BYTES, resolve_model_batch_size
from mlsae_lens.models import LanguageModel
from mlsae_lens.run_dir import METRICS_FILE, STATS_FILE, TOP_CONTEXTS_FILE, WEIGHTS_FILE
from mlsae_lens.run_files import check_run_dir, open_run
from mlsae_lens.run_report import build_run_report
from mlsae_lens.sae import MultiLayerMixin
from mlsae_lens.top_contexts_file import (
    SAMPLES_PER_LAYER,
    finalize_top_contexts,
    load_top_contexts,
)

logger = logging.getLogger(__name__)


def _open_run(
    run_dir: Path,
    model: LanguageModel | None,
    splits: Any,
    device: str,
) -> AnalysisRun:
    """The run's SAE, model and test split; ``model``/``splits`` skip loading them."""
    run = open_run(run_dir, model, splits, device)
    run.sae.eval()
    return AnalysisRun(
        run_dir, run.cfg, run.sae, run.model, run.splits.test, run.test_special_mask,
        dict(run.splits.provenance),
    )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_IDENTITY_DEFAULTS = {"skip_first_position": False}
"""Values of identity keys that statistics saved before the key existed were made with."""


def _start_or_resume(
    run: AnalysisRun, options: AnalysisOptions, identity: dict[str, Any]
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


def start_or_resume_top_contexts(
    run_dir: Path, stats: AnalysisStats, options: AnalysisOptions, sae: MultiLayerMixin
) -> LatentContexts | None:
    """Fresh tables for a fresh analysis, the saved ones for a resumed one, or ``None``.

    A fresh analysis deletes an older ``top_contexts.safetensors`` (it described other tokens
    or another SAE). A resumed one must find tables in step with the statistics.
    """
    path = run_dir / TOP_CONTEXTS_FILE
    phase = stats.progress.get("phase")
    if phase == "latents" and stats.layer.n_tokens == 0:
        path.unlink(missing_ok=True)
        if not options.collect_top_contexts:
            return None
        return LatentContexts(
            sae.cfg.d_sae, sae.cfg.n_layers, options.top_n, SAMPLES_PER_LAYER, sae.W_enc.device
        )
    if not options.collect_top_contexts:
        return None
    if not path.is_file():
        if phase == "latents":
            raise MLSAEError(
                f"--resume: {run_dir} holds a partial analysis without {TOP_CONTEXTS_FILE}; "
                "pass --no-top-contexts to resume it without them, or --overwrite to start over"
            )
        logger.warning("%s is missing, so this analysis has no top contexts", path)
        return None
    contexts, _, meta = load_top_contexts(path)
    top = contexts.top
    for key, value in meta["identity"].items():
        if stats.progress.get(key) != value:
            raise MLSAEError(
                f"--resume: {path} was collected with {key}={value!r}, not "
                f"{stats.progress.get(key)!r}; pass --overwrite to start over"
            )
    if top.top_n != options.top_n:
        raise MLSAEError(
            f"--resume: {path} keeps the top {top.top_n} tokens, not {options.top_n}; pass "
            f"--top-n {top.top_n}, or --overwrite to start over"
        )
    if top.n_tokens != stats.layer.n_tokens:
        raise MLSAEError(
            f"--resume: {path} holds {top.n_tokens} tokens but stats.safetensors "
            f"{stats.layer.n_tokens} (the analysis stopped between the two saves); pass "
            "--overwrite to start over, or --no-top-contexts to resume without them"
        )
    return LatentContexts.from_saved(contexts.tensors(), contexts.meta(), sae.W_enc.device)


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
    check_run_dir(run_dir)
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
        "sae_sha256": _file_sha256(run_dir / WEIGHTS_FILE),
        "skip_first_position": options.skip_first_position,
    }
    stats = _start_or_resume(run, options, identity)
    stats.top = start_or_resume_top_contexts(run_dir, stats, options, run.sae)
    # Sized from this machine's free memory, not the run's: analysis may run elsewhere. The SAE's
    # dense pre-activations are bounded separately (analysis_stream.ENCODE_CHUNK_ELEMENTS); per
    # token the pass also keeps the valid-token copy of every layer's vector.
    mcfg = run.model.cfg
    batch_size = resolve_model_batch_size(
        options.batch_size, mcfg, run.test.shape[1], mcfg.device, what="--batch-size",
        extra_bytes_per_token=FLOAT_BYTES * mcfg.n_layers * mcfg.d_model,
    )
    path = run_dir / STATS_FILE
    start = time.perf_counter()
    if stats.progress["phase"] == "latents":
        latent_pass(run, stats, batch_size, path, options.save_every_tokens)
    if stats.progress["phase"] == "centered":
        centered_pass(run, stats, batch_size, path, options.save_every_tokens)
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
    run: AnalysisRun,
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


def _fmt(x: float | None) -> str:
    return "undefined" if x is None else f"{x:.4f}"


__all__ = ["analyze_run", "start_or_resume_top_contexts"]
