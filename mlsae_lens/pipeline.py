"""End-to-end flows used by the CLI: the demo (train → evaluate → report).

Loading a finished run back (model, test split, SAE) lives here too, so ``analyze`` and
``eval`` see exactly the tokens the run held out.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_lens import SAE

from mlsae_lens.checkpoint import check_not_pickle, refuse_pickles_instead_of_weights
from mlsae_lens.config import MultiLayerRunnerConfig
from mlsae_lens.errors import MLSAEError
from mlsae_lens.evals import ReconstructionResult
from mlsae_lens.figures import per_layer_fvu_figure
from mlsae_lens.models import LanguageModel
from mlsae_lens.report import ReportSection
from mlsae_lens.run_dir import check_same_corpus, load_run_config
from mlsae_lens.sae import MultiLayerSAE
from mlsae_lens.sae_files import check_sae_dir, read_cfg

logger = logging.getLogger(__name__)

DEMO_DOWNSTREAM_TOKENS = 256
"""Test tokens of the demo's spliced CE/KL metrics (every layer spliced in turn)."""


@dataclass
class LoadedRun:
    """A finished run: its config, SAE, model and test split."""

    path: Path
    cfg: MultiLayerRunnerConfig
    sae: MultiLayerSAE
    model: LanguageModel
    splits: Any
    test_special_mask: Any


def load_sae(path: Path, device: str = "cpu") -> MultiLayerSAE:
    """``SAE.load_from_disk`` with clear messages for the usual ways it goes wrong."""
    path = Path(path)
    cfg_file, weights_file = path / "cfg.json", path / "sae_weights.safetensors"
    if not weights_file.exists():
        refuse_pickles_instead_of_weights(path)
    check_not_pickle(weights_file)  # safetensors would only call a pickle "corrupted"
    if not cfg_file.exists() or not weights_file.exists():
        refuse_unfinished_run(path)
        raise MLSAEError(f"{path} holds no SAE (cfg.json + sae_weights.safetensors); pass a run directory")
    cfg_dict = read_cfg(path)
    architecture = cfg_dict.get("architecture")
    if architecture != "multilayer_topk":
        raise MLSAEError(
            f"{path} holds a SAELens SAE of architecture {architecture!r}, not an MLSAE "
            "('multilayer_topk'); load it with sae_lens.SAE.load_from_disk instead"
        )
    check_sae_dir(path, cfg_dict)  # names a wrong shape, missing tensor, int dtype or NaN
    try:
        sae = SAE.load_from_disk(path, device=device)
    except MLSAEError:
        raise
    except Exception as exc:  # safetensors / torch raise several types for damaged files
        raise MLSAEError(
            f"could not load the SAE weights in {path} ({type(exc).__name__}: {exc}); the file is "
            "truncated or corrupted — retrain or restore it from a checkpoint"
        ) from exc
    assert isinstance(sae, MultiLayerSAE)
    return sae


def refuse_unfinished_run(path: Path) -> None:
    """A run directory without its final SAE is an interrupted training (or one that failed before
    its first checkpoint): say so and give the command that gets on (not "holds no SAE")."""
    from mlsae_lens.checkpoint import list_checkpoints

    checkpoints = list_checkpoints(path)
    if not (path / "run.json").is_file():
        return
    if checkpoints:
        raise MLSAEError(
            f"{path} holds an unfinished training run (last checkpoint {checkpoints[-1].name}, no final "
            f"SAE yet); finish it with `mlsae-lens train --output-dir {path} --resume` and the run's "
            "settings, then try again"
        )
    raise MLSAEError(
        f"{path} holds a training run that stopped before its first checkpoint: nothing was trained; "
        f"train it again with `mlsae-lens train --output-dir {path}` (any settings), then try again"
    )


def check_sae_fits_model(sae: MultiLayerSAE, model: LanguageModel) -> None:
    if sae.cfg.d_in != model.cfg.d_model or sae.cfg.n_layers != model.cfg.n_layers:
        raise MLSAEError(
            f"the SAE expects d_in={sae.cfg.d_in} over n_layers={sae.cfg.n_layers}, but the model "
            f"has d_model={model.cfg.d_model} and n_layers={model.cfg.n_layers}; use the model "
            "the SAE was trained on"
        )


def load_run(path: Path, model: LanguageModel | None = None, device: str = "cpu") -> LoadedRun:
    from mlsae_lens.data import special_token_mask
    from mlsae_lens.models import load_model

    path = Path(path)
    run_file = path / "run.json"
    if not run_file.exists():
        raise MLSAEError(f"{path} is not an mlsae-lens run directory (no run.json); pass the --output-dir of a training run")
    cfg = load_run_config(path)
    sae = load_sae(path, device)
    model = model if model is not None else load_model(cfg.model_name, device=device, backend=cfg.model_backend)
    check_sae_fits_model(sae, model)
    splits = cfg.load_token_splits(model.tokenizer)
    check_same_corpus(path, splits.provenance, resuming=False)  # else "test" may be training text
    return LoadedRun(path, cfg, sae, model, splits, special_token_mask(splits.test, model.tokenizer))


def reconstruction_section(result: ReconstructionResult, n_layers: int, k: int) -> ReportSection:
    series = {"MLSAE": result.fvu.tolist()}
    if result.pca_fvu is not None:
        series[f"PCA rank {k} (in-sample)"] = result.pca_fvu.tolist()
    summary = result.to_dict()
    table = {key: value for key, value in summary.items() if key != "per_layer"}
    return ReportSection(
        title="Reconstruction on the held-out split",
        html=(
            "<p>FVU per layer in the SAE's normalized space. The PCA floor is the best rank-k "
            "linear reconstruction of the very same vectors (fit in-sample, per layer).</p>"
        ),
        figures=[per_layer_fvu_figure(series, n_layers)],
        table=table,
    )


def run_demo(cfg: MultiLayerRunnerConfig, eval_tokens: int = 4096) -> Path:
    """Train on the embedded model and corpus, evaluate, analyse, and write ``report.html``.

    The analysis reads ``eval_tokens`` test tokens too; the report is drawn from the files the
    steps saved (``build_run_report``), so ``mlsae-lens analyze`` can redraw it later.
    """
    from mlsae_lens.analyze import AnalysisOptions, analyze_run, build_run_report
    from mlsae_lens.baselines import PCA
    from mlsae_lens.evals import EvalOptions, evaluate_run
    from mlsae_lens.run_training import TrainingRun

    runner = TrainingRun(cfg)
    sae = runner.run()
    # Downstream metrics splice every layer: 30 partial forwards per batch and method on the
    # embedded model, so they read at most DEMO_DOWNSTREAM_TOKENS tokens to stay CPU-sized.
    metrics = evaluate_run(
        runner.out,
        EvalOptions(
            tokens=eval_tokens,
            downstream_tokens=min(eval_tokens, DEMO_DOWNSTREAM_TOKENS),
            baselines=(PCA,),
            batch_size=cfg.model_batch_size,
        ),
        model=runner.model,
        splits=runner.splits,
        device=runner.device,
        report=False,
    )
    logger.info(
        "test FVU (mean over %d layers): MLSAE %.4f vs PCA rank-%d %.4f",
        sae.cfg.n_layers, metrics["mean_fvu"], sae.cfg.k, metrics.get("pca_mean_fvu", float("nan")),
    )
    analyze_run(
        runner.out,
        AnalysisOptions(tokens=eval_tokens, batch_size=cfg.model_batch_size, overwrite=True),
        model=runner.model,
        splits=runner.splits,
        device=runner.device,
        report=False,
    )
    return build_run_report(runner.out)
