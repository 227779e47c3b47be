"""Statistics files: tensors plus a format tag and JSON metadata in one safetensors file.

Every resumable accumulator of an analysis (:class:`~mlsae_lens.analysis.layer_stats.LayerDistributionStats`,
:class:`~mlsae_lens.analysis.residual.ResidualNormStats`, the analysis state and the top-context
tables) saves through :func:`write_safetensors`: atomic, so a crash never leaves a half-written file
where a resumed analysis would look, and tagged, so a file is only ever read back by the class that
wrote it. No pickles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from mlsae_lens.atomic import atomic_save_file
from mlsae_lens.errors import MLSAEError


def write_safetensors(
    path: str | os.PathLike[str], tensors: dict[str, Tensor], fmt: str, meta: dict[str, Any]
) -> None:
    """Write ``tensors`` with ``{"format": fmt, "meta": json(meta)}`` in the header, atomically.

    A temporary file in the target directory is renamed over ``path``, so a crash never leaves
    a half-written file where a resumed analysis would look for one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_save_file(tensors, path, metadata={"format": fmt, "meta": json.dumps(meta)})


def read_safetensors(
    path: str | os.PathLike[str], fmt: str
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a file written by :func:`write_safetensors`, checking its format tag."""
    path = Path(path)
    if not path.is_file():
        raise MLSAEError(f"No statistics file at {path}: check the path (save() writes it).")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        if header.get("format") != fmt:
            raise MLSAEError(
                f"{path} holds {header.get('format')!r}, not {fmt!r}: load it with the class "
                "that saved it."
            )
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open API)
    return tensors, json.loads(header["meta"])
