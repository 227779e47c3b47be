"""Atomic writes: every file and directory mlsae-lens writes appears whole or not at all.

A temporary sibling is written, then renamed over the target (``os.replace`` is atomic within
one file system), so a crash or Ctrl-C leaves the previous version or the new one, never half of
one. ``tempfile`` creates its files 0600 and its directories 0700; renamed into place as they
are, run directories and reports would be unreadable to anyone else sharing the machine or the
results, so they get the modes a plain ``open``/``mkdir`` would give (0666/0777 minus the umask).
"""

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block has written it, it replaces
    ``path``. On an exception the temporary file is removed and ``path`` is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def staging_dir(parent: str | os.PathLike[str], prefix: str) -> Iterator[Path]:
    """A temporary directory in ``parent`` (with a plain directory's mode) for files that are
    renamed into place, or for the directory itself to be renamed; removed afterwards if it is
    still there."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def with_umask_modes(directory: str | os.PathLike[str]) -> None:
    """Give the files in ``directory`` a plain ``open``'s mode (0666 minus the umask):
    ``safetensors`` writes its files 0600, which other users of the run could not read."""
    mode = 0o666 & ~_umask()
    for path in Path(directory).iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, flushed to disk before the rename."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def atomic_save_file(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` through a temporary file and a rename."""
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
