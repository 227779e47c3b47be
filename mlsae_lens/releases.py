"""The release registry: which pretrained MLSAEs exist, where they live, how to fetch and load one.

``mlsae_lens/pretrained_saes.yaml`` names each release (one Hugging Face repository per SAE id)
and its format: ``reference`` (the paper's published checkpoints, converted on load by
:mod:`mlsae_lens.reference_checkpoint`) or ``sae_lens`` (our own SAELens-format releases).
:func:`load_release` builds the SAE through SAELens' registry (``multilayer_topk``), so this
module sits below :mod:`mlsae_lens.sae`, whose ``MultiLayerSAE.from_pretrained`` calls it.
"""

from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from mlsae_lens.errors import MLSAEError
from mlsae_lens.models import hub_unavailable
from mlsae_lens.reference_checkpoint import convert_reference_dir
from mlsae_lens.sae_files import load_mlsae_dir

TFM_SUFFIX = "-tfm"
LENS_SUFFIX = "-lens"


@cache
def release_registry() -> dict[str, dict[str, Any]]:
    """The releases shipped in ``mlsae_lens/pretrained_saes.yaml``."""
    text = resources.files("mlsae_lens").joinpath("pretrained_saes.yaml").read_text()
    return yaml.safe_load(text)["releases"]


def is_lens_sae_id(sae_id: str) -> bool:
    """Whether an SAE id names a tuned-lens MLSAE (``x64-k32-lens``, ``x64-k32-lens-tfm``)."""
    return sae_id.removesuffix(TFM_SUFFIX).endswith(LENS_SUFFIX)


def resolve_release(release: str, sae_id: str) -> tuple[str, dict[str, Any]]:
    """``(repo_id, release entry)`` for a registered release and SAE id.

    Every registered id ``X`` also accepts ``X-tfm``: the reference uploaded each SAE twice,
    alone and inside its training module (``-tfm``, with the transformer and the lens).
    """
    releases = release_registry()
    if release not in releases:
        raise MLSAEError(
            f"unknown release {release!r}; known releases: {', '.join(sorted(releases))} "
            "(mlsae-lens pretrained list)"
        )
    entry = releases[release]
    if sae_id not in entry["saes"] and sae_id.removesuffix(TFM_SUFFIX) not in entry["saes"]:
        raise MLSAEError(
            f"release {release!r} has no SAE {sae_id!r}; it has: {', '.join(entry['saes'])} "
            f"(each also as <id>{TFM_SUFFIX})"
        )
    return entry["repo_id_template"].format(sae_id=sae_id), entry


def download(repo_id: str) -> Path:
    """``snapshot_download`` with one clear message when the hub cannot be reached (offline, it
    still finds files already in the Hugging Face cache)."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id,
            allow_patterns=["config.json", "model.safetensors"],
            local_files_only=hub_unavailable(),
        )
        return Path(path)
    except Exception as exc:  # network, auth and offline-mode errors
        raise MLSAEError(
            f"cannot download {repo_id} from the Hugging Face hub ({type(exc).__name__}); connect "
            "to the internet, or download config.json and model.safetensors yourself and pass "
            "--local-dir"
        ) from exc


def build_from_state(cfg: dict[str, Any], state: dict[str, torch.Tensor], device: str = "cpu") -> Any:
    """The MLSAE of a converted ``cfg.json`` dict and state dict, built by SAELens' registry
    (a :class:`~mlsae_lens.sae.MultiLayerSAE`; this module sits below :mod:`mlsae_lens.sae`)."""
    from sae_lens.registry import get_sae_class

    sae_class, cfg_class = get_sae_class(cfg["architecture"])
    sae = sae_class(cfg_class.from_dict(cfg))
    sae.process_state_dict_for_loading(state)  # shapes and finiteness, incl. a supplied lens
    sae.load_state_dict(state)
    return sae.to(device)


def load_release(
    release: str,
    sae_id: str,
    local_dir: str | Path | None = None,
    device: str = "cpu",
    lens: str | Path | None = None,
) -> Any:
    """Load a registered release as a :class:`~mlsae_lens.sae.MultiLayerSAE` (typed ``Any``:
    see :func:`build_from_state`); what :func:`mlsae_lens.pretrained.from_pretrained` and
    ``MultiLayerSAE.from_pretrained`` return.

    Args:
        local_dir: already-downloaded ``config.json`` + ``model.safetensors`` (skips the hub).
        lens: for a ``-lens`` SAE, the tuned lens it was trained with (see
            :func:`mlsae_lens.reference_checkpoint.read_lens`); default: the ``-tfm`` checkpoint's
            own, else tuned-lens' pretrained lens from the hub.
    """
    repo_id, entry = resolve_release(release, sae_id)
    path = Path(local_dir) if local_dir is not None else download(repo_id)
    if entry["format"] == "sae_lens":
        return load_mlsae_dir(path, device)
    cfg, state = convert_reference_dir(
        path, entry["n_layers"], entry["model"], lens=lens,
        lens_resource_id=entry.get("tuned_lens"), needs_lens=is_lens_sae_id(sae_id),
    )
    cfg["metadata"]["release"] = {"release": release, "sae_id": sae_id, "repo_id": repo_id}
    return build_from_state(cfg, state, device)


def reference_huggingface_loader(
    repo_id: str,
    folder_name: str,  # noqa: ARG001 - the reference repos keep files at the root
    device: str,
    force_download: bool,  # noqa: ARG001
    cfg_overrides: dict[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], None]:
    """SAELens ``PretrainedSaeHuggingfaceLoader`` for raw reference repos:
    ``SAE.from_pretrained("tim-lawson/mlsae-pythia-70m-deduped-x64-k32", "",
    converter=reference_huggingface_loader)`` (``-lens`` repos fetch tuned-lens' pretrained lens)."""
    entry = next(
        (e for e in release_registry().values() if repo_id.startswith(e["repo_id_template"].split("{")[0])),
        None,
    )
    if entry is None:
        raise MLSAEError(f"{repo_id} is not a registered reference release; use reference_disk_loader with n_layers")
    cfg, state = convert_reference_dir(
        download(repo_id), entry["n_layers"], entry["model"],
        lens_resource_id=entry.get("tuned_lens"), needs_lens=is_lens_sae_id(repo_id),
    )
    cfg.update(cfg_overrides or {}, device=device)
    return cfg, {k: v.to(device) for k, v in state.items()}, None


def registry_rows() -> list[dict[str, Any]]:
    """One row per registered (release, SAE id): what ``mlsae-lens pretrained list`` prints."""
    rows = []
    for release, entry in release_registry().items():
        for sae_id in entry["saes"]:
            rows.append({
                "release": release,
                "sae_id": sae_id,
                "repo_id": entry["repo_id_template"].format(sae_id=sae_id),
                "model": entry["model"],
                "n_layers": entry["n_layers"],
                "lens": is_lens_sae_id(sae_id),
            })
    return rows


def format_registry_table(rows: list[dict[str, Any]] | None = None) -> str:
    """The registry as a fixed-width text table."""
    rows = registry_rows() if rows is None else rows
    header = {"release": "release", "sae_id": "sae id", "repo_id": "hub repository", "model": "model",
              "n_layers": "layers", "lens": "tuned lens"}
    cells = [header] + [{**row, "lens": "yes" if row["lens"] else "no"} for row in rows]
    widths = {key: max(len(str(cell[key])) for cell in cells) for key in header}
    lines = ["  ".join(str(cell[key]).ljust(widths[key]) for key in header).rstrip() for cell in cells]
    lines.insert(1, "  ".join("-" * widths[key] for key in header))
    return "\n".join(lines)
