"""The run directory: its layout (every file name), what state it is in, and the one command
that gets a user on.

A directory can be fresh, hold a run that failed before its first checkpoint, an interrupted
run (checkpoints, no final SAE), a finished run, or belong to a live process. Each state gets
its own message naming a command that works from there (``--resume``, ``--overwrite``, a new
``--output-dir``), so no user has to delete a directory by hand to get out.
"""

import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from mlsae_lens.checkpoint import CHECKPOINT_DIR, LOCK_FILE, list_checkpoints, live_lock_holder
from mlsae_lens.config import RESUMABLE_FIELDS, MultiLayerRunnerConfig
from mlsae_lens.errors import MLSAEError

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
"""The run's flags (:class:`mlsae_lens.config.MultiLayerRunnerConfig`), written when it starts."""
SPLITS_FILE = "splits.json"
"""The corpus provenance and train/test hashes, checked by ``--resume``, ``eval`` and ``analyze``."""
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
TRAINING_LOG_FILE = "training_log.json"
EVAL_FILE = "eval.json"
"""Evaluation of the MLSAE and its baselines (``mlsae-lens eval``)."""
METRICS_FILE = "metrics.json"
"""Analysis results (``mlsae-lens analyze``)."""
STATS_FILE = "stats.safetensors"
"""The analysis' accumulators and position in the test split (``--resume``)."""
TOP_CONTEXTS_FILE = "top_contexts.safetensors"
"""Every latent's top tokens per layer, for the explorer."""
REPORT_FILE = "report.html"
EXPLORER_FILE = "explore.html"
BASELINES_DIR = "baselines"
"""Per-layer baseline SAEs trained by ``mlsae-lens eval --baseline``."""
RUNNER_CFG_FILE = "runner_cfg.json"  # = sae_lens.constants.RUNNER_CFG_FILENAME
"""SAELens' runner config of the training (``sae_lens.constants.RUNNER_CFG_FILENAME``)."""
SPARSITY_FILE = "sparsity.safetensors"  # = sae_lens.constants.SPARSITY_FILENAME
"""SAELens' log10 latent frequencies at the end of training (``SPARSITY_FILENAME``)."""

DEFAULT_PREFIX = "runs/mlsae-"

# Everything mlsae-lens writes into a run directory (train, eval, analyze, explore, convert):
# --overwrite removes these and nothing else, so a user's own files there survive. Not the
# .lock: the overwriting run holds it while it removes the rest.
RUN_ARTEFACTS = (
    RUN_FILE, CFG_FILE, WEIGHTS_FILE, TRAINING_LOG_FILE, SPLITS_FILE, RUNNER_CFG_FILE, SPARSITY_FILE,
    CHECKPOINT_DIR, EVAL_FILE, METRICS_FILE, STATS_FILE, REPORT_FILE, BASELINES_DIR,
    TOP_CONTEXTS_FILE, EXPLORER_FILE, "README.md",
)


def resolve_output_dir(cfg: MultiLayerRunnerConfig) -> MultiLayerRunnerConfig:
    """``--output-dir`` left unset: a fresh ``runs/mlsae-<time>`` (as ``demo`` does), so a
    second default run never collides with the first. ``--resume`` needs the run's directory."""
    if cfg.output_dir is not None:
        return cfg
    if cfg.resume:
        raise MLSAEError("--resume needs the run to continue: pass its --output-dir")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, n = f"{DEFAULT_PREFIX}{stamp}", 1
    while Path(name).exists():
        n += 1
        name = f"{DEFAULT_PREFIX}{stamp}-{n}"
    logger.info("no --output-dir given: writing the run to %s", name)
    return replace(cfg, output_dir=name)


def _make_writable_dir(out: Path) -> None:
    # The first existing path up the tree tells a file in the way from a permission problem.
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        what = "is a file, not a directory" if existing == out else f"cannot be created: {existing} is a file"
        raise MLSAEError(f"--output-dir {out} {what}; choose another --output-dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise MLSAEError(
            f"output directory {out} is not writable ({exc.strerror}); choose another --output-dir"
        ) from exc


def read_run_file(out: Path) -> dict[str, Any]:
    """``run.json`` as a dict; a damaged one is named with the way out."""
    run_file = out / RUN_FILE
    try:
        data = json.loads(run_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MLSAEError(
            f"{run_file} is not valid JSON ({type(exc).__name__}); the run directory is damaged: "
            f"restore run.json, or replace the run with `mlsae-lens train --output-dir {out} "
            "--overwrite`"
        ) from None
    if not isinstance(data, dict):
        raise MLSAEError(
            f"{run_file} holds no run settings (a JSON {type(data).__name__}, not an object); replace "
            f"the run with `mlsae-lens train --output-dir {out} --overwrite`"
        )
    return data


def load_run_config(out: Path) -> MultiLayerRunnerConfig:
    """The run's settings from ``run.json``; damaged JSON or values are one line, not a traceback."""
    data = read_run_file(out)
    try:
        return MultiLayerRunnerConfig.from_dict(data)
    except MLSAEError as exc:
        raise MLSAEError(f"{out / RUN_FILE} holds settings that are no longer valid ({exc})") from None
    except (TypeError, ValueError) as exc:
        raise MLSAEError(
            f"{out / RUN_FILE} holds settings of the wrong type ({exc}); restore run.json"
        ) from None


def is_finished(out: Path) -> bool:
    """A finished run has its final SAE (written last, by ``save_final``) in the directory."""
    return (out / "cfg.json").is_file() and (out / "sae_weights.safetensors").is_file()


def _flag(key: str, value: Any) -> str:
    flag = "--" + key.replace("_", "-")
    if value is None:
        return f"without {flag}"
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return f"{flag} {value}"


def remove_run(out: Path) -> list[str]:
    """Delete the mlsae-lens files of the run in ``out`` (``--overwrite``); other files stay.
    Returns the names of the entries it kept."""
    for path in [out / name for name in RUN_ARTEFACTS] + sorted(out.glob("eval.previous-*.json")):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    return sorted(p.name for p in out.iterdir() if not p.name.startswith("."))


def prepare_output_dir(cfg: MultiLayerRunnerConfig, remove: bool = False) -> Path:
    """Create the run directory, or check that it may be written: ``--resume`` continues the same
    unfinished run, ``--overwrite`` replaces a run, and a run that never wrote a checkpoint is
    started again with the new settings. Every refusal names a command that works.

    ``remove``: delete the run that ``--overwrite`` replaces (the runner does so only once it
    holds the directory's lock, so a live run's files are never deleted)."""
    assert cfg.output_dir is not None, "resolve_output_dir first"
    out = Path(cfg.output_dir)
    if cfg.resume and cfg.overwrite:
        raise MLSAEError("--resume continues the run in --output-dir and --overwrite replaces it; pass one")
    _make_writable_dir(out)
    holder = live_lock_holder(out, ignore_self=True)  # run() re-checks under its lock
    if holder is not None:
        pid, host = holder
        raise MLSAEError(
            f"another mlsae-lens run (pid {pid} on {host}) is writing into {out}; wait for it to "
            f"finish or choose another --output-dir (if no such run exists, delete {out / LOCK_FILE})"
        )
    if not (out / RUN_FILE).exists():
        if any(p for p in out.iterdir() if not p.name.startswith(".")):
            raise MLSAEError(
                f"{out} is not empty and holds no mlsae-lens run (no run.json); choose an empty or new "
                "--output-dir (--overwrite only replaces an mlsae-lens run)"
            )
        if cfg.resume:
            raise MLSAEError(f"--resume was given but {out} holds no run to resume; drop --resume")
        return out
    if cfg.overwrite:
        if remove:
            kept = remove_run(out)
            logger.warning("--overwrite: removed the run in %s%s", out,
                           f" (kept files that are not mlsae-lens': {', '.join(kept)})" if kept else "")
        return out
    previous = read_run_file(out)
    checkpoints = list_checkpoints(out)
    if is_finished(out):
        tokens = previous.get("training_tokens")
        if cfg.resume:
            raise MLSAEError(
                f"{out} holds a finished run ({tokens} training tokens); there is nothing to resume. "
                f"To train longer, start a new run with a larger --training-tokens and another "
                f"--output-dir (or replace this one with --overwrite)"
            )
        raise MLSAEError(
            f"{out} already holds a finished run; choose another --output-dir, or replace it with "
            f"`mlsae-lens train --output-dir {out} --overwrite`"
        )
    if not checkpoints:
        if not remove:  # said once, at the first of the runner's two checks
            logger.warning(
                "%s holds a run that stopped before its first checkpoint: nothing was trained, so it is "
                "started again with the settings given now%s", out,
                " (--resume has nothing to resume)" if cfg.resume else "",
            )
        return out
    if not cfg.resume:
        raise MLSAEError(
            f"{out} already holds an unfinished run (last checkpoint {checkpoints[-1].name}); continue "
            f"it with `mlsae-lens train --output-dir {out} --resume` and its settings, replace it with "
            "--overwrite, or choose another --output-dir"
        )
    # An auto --model-batch-size (None) takes the recorded value, see resolved_model_batch_size.
    auto = {"model_batch_size"} if cfg.model_batch_size is None else set()
    ignored = RESUMABLE_FIELDS | auto | {"overwrite"}
    differing = sorted(
        key for key, value in cfg.to_dict().items() if key not in ignored and previous.get(key, value) != value
    )
    if differing:
        raise MLSAEError(
            f"{out} holds a different run (settings differ: {', '.join(differing)}); resume it with "
            f"its settings ({'; '.join(_flag(k, previous.get(k)) for k in differing)}), replace it "
            "with --overwrite, or choose another --output-dir"
        )
    return out


def check_same_corpus(out: Path, provenance: dict[str, Any], resuming: bool = True) -> None:
    """Refuse when the corpus now gives other train/test tokens than the run was started on
    (``splits.json``' hashes): ``--resume`` would quietly train on new text, and ``eval``/
    ``analyze`` would measure on a "test" split that is not the one training held out."""
    splits_file = out / SPLITS_FILE
    if not splits_file.is_file():
        return  # runs from before splits.json was written at the start
    try:
        recorded = json.loads(splits_file.read_text()).get("train", {})
    except (OSError, ValueError, AttributeError):
        return
    for key in ("train_sha256", "test_sha256"):
        before, now = recorded.get(key), provenance.get(key)
        if before is not None and now is not None and before != now:
            split = key.split("_")[0]
            changed = (
                f"the corpus {provenance.get('source')!r} changed since the run started (the {split} "
                f"split's sha256 was {before}, now {now})"
            )
            if resuming:
                raise MLSAEError(
                    f"--resume: {changed}; restore the original corpus to resume, or start a new run "
                    "with another --output-dir (or --overwrite)"
                )
            raise MLSAEError(
                f"{changed}, so the test split is not the one {out} held out in training; restore the "
                "original corpus and try again"
            )


def passes_over_data(training_tokens: int, n_valid_train_tokens: int) -> float:
    """How many times the run reads each training token (the stream wraps around)."""
    return training_tokens / max(1, n_valid_train_tokens)
