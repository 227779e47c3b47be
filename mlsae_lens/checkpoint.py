"""Atomic, pickle-free checkpoints of a training run.

A checkpoint is a directory written under a temporary name and renamed into place, so a
crash leaves either the previous checkpoint or the new one, never half of one. It holds the
SAE (SAELens format), the optimizer's tensors, the dead-latent counters and the RNG state in
safetensors, and the rest (step, data position, scheduler, log) in JSON.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mlsae_lens.atomic import (  # noqa: F401 - re-exported
    atomic_save_file,
    atomic_write_json,
    staging_dir,
    with_umask_modes,
)
from mlsae_lens.errors import MLSAEError

CHECKPOINT_DIR = "checkpoints"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (safetensors) and plain data (JSON)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, param_state in state["state"].items():
        for name, value in param_state.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def write_checkpoint(
    root: Path,
    name: str,
    sae: Any,
    tensors: dict[str, torch.Tensor],
    plain: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``root/<name>`` (a run's ``checkpoints/``) atomically and keep the newest ``keep``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    with staging_dir(root, ".tmp-") as tmp:
        sae.save_model(tmp)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / STATE_TENSORS)
        (tmp / STATE_JSON).write_text(json.dumps(plain, indent=2, default=str))
        with_umask_modes(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    for old in checkpoints_in(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def atomic_save_sae(sae: Any, directory: Path, inference: bool = True) -> None:
    """Save an SAE in SAELens' format into ``directory`` file by file through renames, so an
    earlier SAE there stays whole until the new one is complete."""
    directory = Path(directory)
    with staging_dir(directory, ".tmp-sae-") as tmp:
        # A training SAE saves its inference form; an inference SAE has only save_model.
        save = sae.save_inference_model if inference and hasattr(sae, "save_inference_model") else sae.save_model
        save(tmp)
        with_umask_modes(tmp)
        # Weights first, config last: a cfg.json always describes complete weights.
        for name in sorted(p.name for p in tmp.iterdir() if p.name != "cfg.json") + ["cfg.json"]:
            os.replace(tmp / name, directory / name)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """A run directory's complete checkpoints, oldest first (names sort by token count)."""
    return checkpoints_in(Path(run_dir) / CHECKPOINT_DIR)


def checkpoints_in(root: Path) -> list[Path]:
    """The complete checkpoints in ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Trainer tensors and JSON state of a checkpoint; a damaged one is named."""
    check_not_pickle(Path(path) / STATE_TENSORS)
    try:
        tensors = load_file(Path(path) / STATE_TENSORS)
        plain = json.loads((Path(path) / STATE_JSON).read_text())
    except Exception as exc:  # safetensors raises its own error types
        raise MLSAEError(
            f"checkpoint {path} is damaged or incomplete ({exc}); delete it to resume from "
            "the one before (with none left, the run starts again), or replace the run with --overwrite"
        ) from exc
    return tensors, plain


# ---- hostile files -------------------------------------------------------------------

PICKLE_MAGIC = b"\x80"
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


def check_not_pickle(path: Path) -> None:
    """Refuse a pickle or ``torch.save`` file where safetensors/JSON belongs.

    Unpickling runs arbitrary code, so mlsae-lens never does it. A pickle starts with the
    protocol opcode ``0x80``; ``torch.save`` writes a zip archive (``PK\\x03\\x04``) holding
    one. Checking the first bytes catches a renamed file that ``safetensors`` would only
    call "corrupted".
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError:
        return  # a missing file is the caller's message to give
    # A safetensors file starts with its JSON header's length (u64, little endian) and then
    # the header's "{". The length's low byte can be 0x80, so rule safetensors in first.
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if 0 < header_len <= size - 8 and head[8:9] == b"{":
        return
    if head[:1] == PICKLE_MAGIC or head[:4] == ZIP_MAGIC:
        raise MLSAEError(
            f"{path} is a pickle/torch.save file; mlsae-lens never unpickles (it can run code); "
            "convert it to safetensors (safetensors.torch.save_file) from a trusted Python session"
        )


def refuse_pickles_instead_of_weights(directory: Path) -> None:
    """Call when a directory lacks its safetensors weights: if it holds a ``.pt``/``.bin``/...
    file instead, name it (someone expected it to be read, and it never will be)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for name in sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES):
        raise MLSAEError(
            f"{directory / name} is a pickle/torch.save file; mlsae-lens never unpickles (it can "
            f"run code) and {directory} holds no safetensors weights; convert it to safetensors "
            "(safetensors.torch.save_file) from a trusted Python session"
        )


# ---- one writer per run directory ------------------------------------------------------

LOCK_FILE = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_lock_holder(run_dir: Path, ignore_self: bool = False) -> tuple[int, str] | None:
    """``(pid, host)`` of the process holding ``run_dir/.lock``, or None when there is no lock
    or it is stale (its process on this host is dead, or the lock is half-written); with
    ``ignore_self``, also None when this process holds it."""
    import socket

    lock = Path(run_dir) / LOCK_FILE
    if not lock.exists():
        return None
    here = socket.gethostname()
    try:
        holder = json.loads(lock.read_text())
        pid, host = int(holder["pid"]), str(holder.get("host", here))
    except (OSError, ValueError, KeyError, TypeError):
        pid, host = -1, here  # unreadable: half-written by a killed process
    if host == here and (pid < 0 or not _pid_alive(pid) or (ignore_self and pid == os.getpid())):
        return None
    return pid, host


def acquire_run_lock(run_dir: Path) -> Path:
    """Create ``run_dir/.lock`` (``O_EXCL``) holding our pid and host, so two runs never
    write into one directory. A lock whose process is dead (a run killed by SIGKILL or a
    power cut) is stale and taken over."""
    import socket

    lock = Path(run_dir) / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = live_lock_holder(run_dir)
            if holder is None:
                lock.unlink(missing_ok=True)  # stale
                continue
            pid, host = holder
            raise MLSAEError(
                f"another mlsae-lens run (pid {pid} on {host}) is writing into {run_dir}; wait for "
                f"it to finish or choose another --output-dir (if no such run exists, delete {lock})"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return lock
    raise MLSAEError(f"could not take the lock {lock}; delete it if no run is writing into {run_dir}")


def release_run_lock(run_dir: Path) -> None:
    """Remove ``run_dir/.lock`` if this process holds it."""
    lock = Path(run_dir) / LOCK_FILE
    try:
        if int(json.loads(lock.read_text())["pid"]) == os.getpid():
            lock.unlink()
    except (OSError, ValueError, KeyError, TypeError):
        pass
