"""``mlsae-lens eval``: evaluate a trained run and its baselines, save ``eval.json``, report.

Opens the run (:mod:`mlsae_lens.run_files`), trains or reuses the per-layer baselines it was
asked for, runs :func:`~mlsae_lens.eval_methods.evaluate_methods` on the test split, merges the
result into the ``eval.json`` the run already holds (:mod:`mlsae_lens.eval_merge`) and redraws
``report.html``.
"""

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlsae_lens.checkpoint import atomic_write_json
from mlsae_lens.errors import MLSAEError
from mlsae_lens.eval_merge import merge_with_previous
from mlsae_lens.eval_methods import Method, ToResidual, evaluate_methods
from mlsae_lens.eval_summary import summarize
from mlsae_lens.memory import FLOAT_BYTES, resolve_model_batch_size
from mlsae_lens.models import LanguageModel
from mlsae_lens.run_dir import BASELINES_DIR, EVAL_FILE, RUN_FILE, TRAINING_LOG_FILE, WEIGHTS_FILE
from mlsae_lens.run_files import check_run_dir, open_run
from mlsae_lens.run_report import build_run_report

logger = logging.getLogger(__name__)


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



def mlsae_training_seconds(run_dir: Path) -> tuple[float | None, str]:
    """The MLSAE's training wall time: the training log's cumulative ``seconds`` (written since
    this version), else, for older runs, the time between writing ``run.json`` (start) and
    ``sae_weights.safetensors`` (end)."""
    log_file = run_dir / TRAINING_LOG_FILE
    if log_file.is_file():
        try:
            log = json.loads(log_file.read_text())
        except json.JSONDecodeError:
            log = []
        if log and isinstance(log[-1], dict) and "seconds" in log[-1]:
            return float(log[-1]["seconds"]), "training_log.json (seconds)"
    start, end = run_dir / RUN_FILE, run_dir / WEIGHTS_FILE
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
    from mlsae_lens.baselines import (
        PCA,
        SAELENS_PER_LAYER,
        TRAINING_FILE,
        PerLayerSAEs,
        load_per_layer_saes,
        train_saelens_per_layer,
    )

    options = options or EvalOptions()
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    run = open_run(run_dir, model, splits, device)
    cfg, sae, model, splits = run.cfg, run.sae, run.model, run.splits
    sae.eval()
    layers = parse_layers(options.layers, sae.cfg.n_layers)
    test_mask = run.test_special_mask
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
        out_dir = run_dir / BASELINES_DIR / SAELENS_PER_LAYER
        saes = None if options.retrain_baselines else load_per_layer_saes(
            out_dir, layers, sae.cfg.d_sae, sae.cfg.k, device
        )
        if saes is None:
            info = train_saelens_per_layer(
                sae, model, splits.train, cfg, layers, out_dir, options.baseline_training_tokens, device,
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


__all__ = ["EvalOptions", "evaluate_run", "mlsae_training_seconds", "parse_layers"]
