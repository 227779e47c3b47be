"""Pretrained MLSAEs as objects, run directories and release folders.

:func:`from_pretrained` loads a registered release (:mod:`mlsae_lens.releases`; the paper's
checkpoints are converted by :mod:`mlsae_lens.reference_checkpoint`) as a :class:`MultiLayerSAE`;
:func:`convert_to_run` writes a run directory that ``mlsae-lens analyze`` / ``eval`` /
``explore`` read (``mlsae-lens pretrained convert``); :func:`save_pretrained` and
:func:`push_to_hub` publish our own MLSAEs in SAELens' format with a model card.
"""

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from mlsae_lens.atomic import atomic_write_text, staging_dir
from mlsae_lens.checkpoint import atomic_save_sae, atomic_write_json
from mlsae_lens.errors import MLSAEError
from mlsae_lens.reference_checkpoint import REFERENCE_LENS_CONVENTION
from mlsae_lens.releases import load_release, resolve_release
from mlsae_lens.sae import MultiLayerSAE

logger = logging.getLogger(__name__)


def from_pretrained(
    release: str,
    sae_id: str,
    local_dir: str | Path | None = None,
    device: str = "cpu",
    lens: str | Path | None = None,
) -> MultiLayerSAE:
    """Load a registered release as a :class:`MultiLayerSAE`.

    Args:
        local_dir: already-downloaded ``config.json`` + ``model.safetensors`` (skips the hub).
        lens: for a ``-lens`` SAE, the tuned lens it was trained with (see
            :func:`mlsae_lens.reference_checkpoint.read_lens`); default: the ``-tfm`` checkpoint's
            own, else tuned-lens' pretrained lens from the hub.

    Unlike ``MultiLayerSAE.from_pretrained``, an unregistered release is an error here, not a
    hand-over to SAELens' own registry.
    """
    sae = load_release(release, sae_id, local_dir=local_dir, device=device, lens=lens)
    assert isinstance(sae, MultiLayerSAE)
    return sae


def _replace_dir(tmp: Path, output: Path) -> None:
    """Move the finished ``tmp`` directory to ``output`` (renames only; an old run is removed
    after the new one is in place)."""
    if output.is_dir() and not any(output.iterdir()):
        output.rmdir()
    if not output.exists():
        os.replace(tmp, output)
        return
    trash = output.with_name(f".{output.name}.old-{os.getpid()}")
    os.replace(output, trash)
    os.replace(tmp, output)
    shutil.rmtree(trash, ignore_errors=True)


def convert_to_run(
    release: str,
    sae_id: str,
    output: str | Path,
    local_dir: str | Path | None = None,
    lens: str | Path | None = None,
    overwrite: bool = False,
    run_overrides: dict[str, Any] | None = None,
) -> Path:
    """Convert a registered release into an mlsae-lens run directory for ``analyze``/``eval``/``explore``.

    Writes ``cfg.json`` + ``sae_weights.safetensors`` (SAELens format) and ``run.json`` (a
    :class:`~mlsae_lens.config.MultiLayerRunnerConfig` naming the registry's model, plus a
    ``converted_from`` record). The directory is built beside ``output`` and renamed into place.

    Args:
        run_overrides: run-config fields for the analysis, e.g. ``dataset``, ``context_size``.
        overwrite: replace an existing run directory (never a non-empty directory that is not one).

    Raises:
        MLSAEError: ``output`` is not empty (without ``overwrite``), or the conversion fails.
    """
    from mlsae_lens.config import MultiLayerRunnerConfig

    output = Path(output)
    if output.exists() and not output.is_dir():
        raise MLSAEError(f"--output {output} is a file; choose a new or empty directory")
    if output.is_dir() and any(output.iterdir()):
        if not (output / "run.json").is_file():
            raise MLSAEError(
                f"{output} is not empty and holds no mlsae-lens run; choose an empty or new --output"
            )
        if not overwrite:
            raise MLSAEError(
                f"{output} already holds a run; pass --overwrite to replace it, or choose a new --output"
            )
    repo_id, entry = resolve_release(release, sae_id)
    sae = from_pretrained(release, sae_id, local_dir=local_dir, lens=lens)
    cfg = sae.cfg
    run_cfg = MultiLayerRunnerConfig(**{
        "model_name": entry["model"],
        "expansion_factor": cfg.d_sae // cfg.d_in,
        "k": cfg.k,
        "normalization": cfg.normalization,
        "tuned_lens": cfg.metadata.get("tuned_lens_source"),
        "output_dir": str(output),
        **(run_overrides or {}),
    })
    provenance = {
        "release": release,
        "sae_id": sae_id,
        "repo_id": repo_id,
        "files": str(local_dir) if local_dir is not None else f"https://huggingface.co/{repo_id}",
        **({"lens_convention": REFERENCE_LENS_CONVENTION} if cfg.tuned_lens else {}),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(output.parent, f".{output.name}.tmp-") as tmp:
        atomic_save_sae(sae, tmp)
        atomic_write_json(tmp / "run.json", {**run_cfg.to_dict(), "converted_from": provenance})
        _replace_dir(tmp, output)
    logger.info("converted %s to the run directory %s", repo_id, output)
    return output


MODEL_CARD = """---
library_name: sae_lens
tags: [mlsae-lens, sparse-autoencoder, multi-layer-sae]
---
# {name}

A Multi-Layer Sparse Autoencoder (MLSAE; Lawson et al. 2024, arXiv 2409.04185) trained with
[mlsae-lens](https://pypi.org/project/mlsae-lens/) on the residual stream of every layer of
`{model}`: one TopK SAE (k = {k}, {d_sae} latents, d_in = {d_in}) shared by all {n_layers}
layers, input normalization `{normalization}`. Files are in SAELens' format.

```python
import mlsae_lens  # registers the multilayer_topk architecture
from sae_lens import SAE
sae = SAE.load_from_disk("path/to/this/folder")
```
"""


def save_pretrained(sae: MultiLayerSAE, path: str | Path, name: str | None = None) -> Path:
    """Write an MLSAE as a release folder: SAELens files plus a model card (README.md)."""
    from mlsae_lens.checkpoint import atomic_save_sae

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_sae(sae, path)
    cfg = sae.cfg
    card = MODEL_CARD.format(
        name=name or path.name, model=cfg.metadata.model_name, k=cfg.k, d_sae=cfg.d_sae,
        d_in=cfg.d_in, n_layers=cfg.n_layers, normalization=cfg.normalization,
    )
    atomic_write_text(path / "README.md", card)
    return path


def push_to_hub(sae: MultiLayerSAE, repo_id: str, staging_dir: str | Path, private: bool = False) -> str:
    """``save_pretrained`` then upload the folder with ``huggingface_hub`` (needs a token)."""
    from huggingface_hub import HfApi

    folder = save_pretrained(sae, staging_dir, name=repo_id)
    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder))
    except Exception as exc:  # network/auth errors
        raise MLSAEError(
            f"cannot push to {repo_id} ({type(exc).__name__}: {exc}); log in with `hf auth login` "
            f"and check the network; the release folder is kept in {folder}"
        ) from exc
    return f"https://huggingface.co/{repo_id}"
