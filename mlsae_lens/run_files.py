"""The files of a finished run directory and how to read them back.

Loads a finished run (its config, SAE, model and test split) with the
messages for the usual ways that goes wrong. Every command that reads a run goes through here,
so each sees exactly the tokens the run held out. Writing a run (output-directory preparation,
locks, the corpus check) is :mod:`mlsae_lens.run_dir`'s; this module sits above it and reads.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlsae_lens.checkpoint import (
    list_checkpoints,
    refuse_pickles_instead_of_weights,
)
from mlsae_lens.config import MultiLayerRunnerConfig
from mlsae_lens.errors import MLSAEError
from mlsae_lens.models import LanguageModel, load_model
from mlsae_lens.run_dir import (
    CFG_FILE,
    RUN_FILE,
    WEIGHTS_FILE,
    check_same_corpus,
    load_run_config,
)
from mlsae_lens.sae import MultiLayerSAE
from mlsae_lens.sae_files import load_mlsae_dir

logger = logging.getLogger(__name__)

__all__ = [
    "LoadedRun",
    "check_run_dir",
    "check_sae_fits_model",
    "load_run",
    "load_sae",
    "open_run",
    "read_json",
    "refuse_unfinished_run",
]


@dataclass
class LoadedRun:
    """A finished run: its config, SAE, model and test split."""

    path: Path
    cfg: MultiLayerRunnerConfig
    sae: MultiLayerSAE
    model: LanguageModel
    splits: Any
    test_special_mask: Any


def check_run_dir(run_dir: Path) -> None:
    """Refuse a path that is not a training run's ``--output-dir`` (missing, a file, no run.json)."""
    if not run_dir.exists():
        raise MLSAEError(
            f"run directory {run_dir} does not exist; pass the --output-dir of a training run"
        )
    if not run_dir.is_dir():
        raise MLSAEError(
            f"{run_dir} is a file, not a run directory; pass the --output-dir of a training run"
        )
    if not (run_dir / RUN_FILE).is_file():
        raise MLSAEError(
            f"{run_dir} is not an mlsae-lens run directory (no run.json); pass the --output-dir "
            "of a training run"
        )


def read_json(path: Path) -> Any:
    """A JSON file a step wrote into the run; damaged JSON names the step to rerun."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MLSAEError(
            f"{path} is not valid JSON ({exc}); rerun the step that writes it"
        ) from exc


def load_sae(path: Path, device: str = "cpu") -> MultiLayerSAE:
    """A run directory's SAE (:func:`mlsae_lens.sae_files.load_mlsae_dir`); a run without its final
    SAE is named as an unfinished training with the command that continues it."""
    path = Path(path)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.exists():
        refuse_pickles_instead_of_weights(path)
    if not (path / CFG_FILE).exists() or not weights_file.exists():
        refuse_unfinished_run(path)
    sae = load_mlsae_dir(path, device)
    assert isinstance(sae, MultiLayerSAE)
    return sae


def refuse_unfinished_run(path: Path) -> None:
    """A run directory without its final SAE is an interrupted training (or one that failed before
    its first checkpoint): say so and give the command that gets on (not "holds no SAE")."""
    checkpoints = list_checkpoints(path)
    if not (path / RUN_FILE).is_file():
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
    """Refuse an SAE whose ``d_in``/``n_layers`` differ from the model's."""
    if sae.cfg.d_in != model.cfg.d_model or sae.cfg.n_layers != model.cfg.n_layers:
        raise MLSAEError(
            f"the SAE expects d_in={sae.cfg.d_in} over n_layers={sae.cfg.n_layers}, but the model "
            f"has d_model={model.cfg.d_model} and n_layers={model.cfg.n_layers}; use the model "
            "the SAE was trained on"
        )


def load_run(path: Path, model: LanguageModel | None = None, device: str = "cpu") -> LoadedRun:
    """The run's config, SAE, model (``model``, or loaded by name) and token splits, rebuilt
    from its corpus and checked against the hash training recorded."""
    from mlsae_lens.data import special_token_mask

    path = Path(path)
    run_file = path / RUN_FILE
    if not run_file.exists():
        raise MLSAEError(f"{path} is not an mlsae-lens run directory (no run.json); pass the --output-dir of a training run")
    cfg = load_run_config(path)
    sae = load_sae(path, device)
    model = model if model is not None else load_model(cfg.model_name, device=device, backend=cfg.model_backend)
    check_sae_fits_model(sae, model)
    splits = cfg.load_token_splits(model.tokenizer)
    check_same_corpus(path, splits.provenance, resuming=False)  # else "test" may be training text
    return LoadedRun(path, cfg, sae, model, splits, special_token_mask(splits.test, model.tokenizer))


def open_run(
    run_dir: Path, model: LanguageModel | None, splits: Any, device: str
) -> LoadedRun:
    """:func:`load_run`, or, when the caller already holds the run's ``splits`` (and maybe its
    ``model``: the demo, right after training), the run's config and SAE with those."""
    from mlsae_lens.data import special_token_mask

    check_run_dir(run_dir)
    if splits is None:
        return load_run(run_dir, model=model, device=device)
    cfg = load_run_config(run_dir)
    sae = load_sae(run_dir, device)
    model = model if model is not None else load_model(cfg.model_name, device=device, backend=cfg.model_backend)
    check_sae_fits_model(sae, model)
    return LoadedRun(run_dir, cfg, sae, model, splits, special_token_mask(splits.test, model.tokenizer))
