"""Pretrained MLSAEs: a release registry and a converter for the published checkpoints.

The paper's authors published their MLSAEs as ``tim-lawson/mlsae-<model>-x<R>-k<k>[-lens][-tfm]``
with their own layout (facts in ``shared/notes/reference-implementation.md``):

* ``config.json``: ``n_inputs``, ``n_latents``, ``k``, ``standardize`` (and AuxK fields);
* ``model.safetensors``: ``encoder.weight`` [n_latents, n_inputs] (no encoder bias),
  ``decoder.weight`` [n_inputs, n_latents], ``pre_encoder_bias`` [n_inputs].

``-tfm`` repositories hold the whole training module instead: the SAE keys prefixed with
``autoencoder.``, the transformer, and for ``-lens`` SAEs the tuned lens as
``lens.layer_translators.{i}.weight`` / ``.bias``; their ``config.json`` holds the training
arguments (``expansion_factor``, ``k``, ``standardize``, ``tuned_lens``, ...), so the sizes are
read from the tensors. Only the SAE and lens tensors are read from such a file.

Their math — standardize per vector, subtract ``pre_encoder_bias``, encode, top-k, ReLU,
decode, add the bias back, de-standardize — is exactly a :class:`MultiLayerSAE` with
``W_enc = encoder.weight.T``, ``b_enc = 0``, ``W_dec = decoder.weight.T``,
``b_dec = pre_encoder_bias`` and ``normalization = "standardize"`` (or ``none``) with
``standardize_convention = "reference"``: divide by ``std + eps``, multiply back by ``std``.

``-lens`` SAEs read ``translator_l(x_l) = x_l + W_l x_l + b_l`` of every layer, and standardize
*after* the lens, which is the order of :meth:`MultiLayerSAE.normalize_input` (lens, then
normalization). The translators become the SAE's ``lens_weight`` / ``lens_bias`` buffers with the
**reference mapping: tuned-lens translator l on** ``blocks.{l}.hook_resid_post``. That matches
how these checkpoints were trained, which is one block off tuned-lens' own convention (translator
l is trained on the *input* of block l; mlsae-lens' own training uses translator l + 1, see
:mod:`mlsae_lens.lens`). Plain ``-lens`` repositories do not contain the lens: it is tuned-lens'
pretrained lens for the model (resource id ``EleutherAI/<model>``, the one the reference loaded),
fetched from the hub, or a lens passed explicitly. Reconstructions in the lens basis equal the
reference's; in the model basis mlsae-lens applies the exact inverse translator (the reference
used only the diagonal of ``(I + W_l)^-1``).

The loaders follow SAELens' converter protocols, so ``SAE.from_pretrained(..., converter=...)``
and ``SAE.load_from_disk(..., converter=...)`` work as well as :func:`from_pretrained`;
:func:`convert_to_run` writes a run directory that ``mlsae-lens analyze`` / ``eval`` /
``explore`` read (``mlsae-lens pretrained convert``).
"""

import json
import logging
import os
import re
import shutil
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from mlsae_lens.atomic import staging_dir
from mlsae_lens.checkpoint import (
    atomic_save_sae,
    atomic_write_json,
    check_not_pickle,
    refuse_pickles_instead_of_weights,
)
from mlsae_lens.errors import MLSAEError
from mlsae_lens.models import hub_unavailable
from mlsae_lens.sae import ARCHITECTURE, MultiLayerSAE
from mlsae_lens.sae_files import check_finite_floats

logger = logging.getLogger(__name__)

REFERENCE_KEYS = ("encoder.weight", "decoder.weight", "pre_encoder_bias")
TFM_PREFIX = "autoencoder."
LENS_PREFIX = "lens.layer_translators."
TFM_SUFFIX = "-tfm"
LENS_SUFFIX = "-lens"
REFERENCE_LENS_CONVENTION = (
    "reference: tuned-lens translator l on blocks.{l}.hook_resid_post (how the checkpoint was "
    "trained; one block off tuned-lens' own convention, translator l on the input of block l)"
)
TUNED_LENS_HUB = "https://huggingface.co/spaces/AlignmentResearch/tuned-lens/tree/main/lens"
_TRANSLATOR_KEY = re.compile(r"^(?:lens\.)?(?:layer_translators\.)?(\d+)\.(weight|bias)$")


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Pure conversion: reference tensors -> our cfg.json dict and state dict
# ---------------------------------------------------------------------------------------------


def lens_buffers(
    translators: dict[str, torch.Tensor], n_layers: int, d_in: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack translators into ``lens_weight`` [n_layers, d, d] and ``lens_bias`` [n_layers, d].

    Reference mapping: translator ``l`` goes to MLSAE layer ``l`` (``blocks.{l}.hook_resid_post``),
    because that is how the published ``-lens`` checkpoints were trained (one block off
    tuned-lens' own convention; see the module docstring).

    Args:
        translators: ``{i}.weight`` / ``{i}.bias`` tensors, optionally prefixed with ``lens.`` and
            ``layer_translators.`` (tuned-lens' ``params.pt``, a ``-tfm`` checkpoint).
    """
    weights: dict[int, torch.Tensor] = {}
    biases: dict[int, torch.Tensor] = {}
    for key, value in translators.items():
        match = _TRANSLATOR_KEY.match(key)
        if match is None:
            continue
        (weights if match.group(2) == "weight" else biases)[int(match.group(1))] = value.float()
    if sorted(weights) != list(range(n_layers)):
        raise MLSAEError(
            f"the tuned lens has translators {sorted(weights)}, but this MLSAE reads {n_layers} layers "
            f"and needs translators 0..{n_layers - 1}; is the lens for this model?"
        )
    weight = torch.zeros(n_layers, d_in, d_in)
    bias = torch.zeros(n_layers, d_in)
    for layer in range(n_layers):
        if tuple(weights[layer].shape) != (d_in, d_in):
            raise MLSAEError(
                f"tuned-lens translator {layer} has shape {list(weights[layer].shape)}, but the SAE "
                f"reads d_in={d_in}; is the lens for this model?"
            )
        weight[layer] = weights[layer]
        if layer in biases:
            bias[layer] = biases[layer].reshape(d_in)
    return weight, bias


def checkpoint_lens(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``lens.layer_translators.*`` tensors a ``-tfm`` checkpoint holds (empty if none)."""
    return {k: v for k, v in tensors.items() if k.startswith(LENS_PREFIX)}


def reference_state_to_mlsae(
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    n_layers: int,
    model_name: str | None = None,
    lens: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Convert a reference checkpoint to our ``cfg.json`` dict and state dict.

    Args:
        config: the checkpoint's ``config.json`` (plain SAE or ``-tfm`` training arguments).
        tensors: its tensors; ``autoencoder.`` prefixes are stripped, and
            ``lens.layer_translators.*`` tensors make a tuned-lens MLSAE.
        lens: tuned-lens translators to use instead (e.g. tuned-lens' pretrained lens for a plain
            ``-lens`` repository), mapped with :func:`lens_buffers`.
    """
    tensors = {k.removeprefix(TFM_PREFIX): v for k, v in tensors.items()}
    missing = [key for key in REFERENCE_KEYS if key not in tensors]
    if missing:
        raise MLSAEError(
            f"not a reference MLSAE checkpoint: model.safetensors lacks {', '.join(missing)}; "
            "expected encoder.weight, decoder.weight and pre_encoder_bias"
        )
    encoder, decoder = tensors["encoder.weight"].float(), tensors["decoder.weight"].float()
    try:
        k = int(config["k"])
        # -tfm configs hold the training arguments, not the sizes: read those from the tensors.
        d_in = int(config.get("n_inputs", encoder.shape[-1]))
        d_sae = int(config.get("n_latents", encoder.shape[0]))
    except KeyError as exc:
        raise MLSAEError(
            f"reference config.json lacks {exc.args[0]!r}; it needs k (the latents kept per vector)"
        ) from None
    if encoder.shape != (d_sae, d_in) or decoder.shape != (d_in, d_sae):
        raise MLSAEError(
            f"reference checkpoint shapes do not match its config: encoder {list(encoder.shape)}, "
            f"decoder {list(decoder.shape)}, expected [{d_sae}, {d_in}] and [{d_in}, {d_sae}]"
        )
    if lens is None:
        lens = checkpoint_lens(tensors) or None
    if lens is None and config.get("tuned_lens"):
        raise MLSAEError(
            "this checkpoint was trained with a tuned lens but holds none; pass the lens it was "
            "trained with (tuned-lens' pretrained lens for the model, a params.pt directory)"
        )
    cfg = {
        "architecture": ARCHITECTURE,
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k,
        "n_layers": n_layers,
        "normalization": "standardize" if config.get("standardize", True) else "none",
        # The reference multiplies back by std (not std + eps): the reference convention.
        "standardize_convention": "reference",
        "tuned_lens": lens is not None,
        "dtype": "float32",
        "apply_b_dec_to_input": True,
        "metadata": {
            "model_name": model_name,
            "hook_names": [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)],
            "converted_from": "tim-lawson/mlsae reference format",
            **({"lens_convention": REFERENCE_LENS_CONVENTION} if lens is not None else {}),
        },
    }
    state = {
        "W_enc": encoder.T.contiguous(),
        "b_enc": torch.zeros(d_sae),
        "W_dec": decoder.T.contiguous(),
        "b_dec": tensors["pre_encoder_bias"].float().clone(),
        "layer_means": torch.zeros(n_layers, d_in),
    }
    if lens is not None:
        state["lens_weight"], state["lens_bias"] = lens_buffers(lens, n_layers, d_in)
    return cfg, state


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------


def _wanted(key: str) -> bool:
    return key.removeprefix(TFM_PREFIX) in REFERENCE_KEYS or key.startswith(LENS_PREFIX)


def read_reference_dir(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` + the SAE (and lens) tensors of ``model.safetensors`` of a downloaded
    reference checkpoint; a ``-tfm`` file's transformer weights are never read."""
    path = Path(path)
    config_file, weights_file = path / "config.json", path / "model.safetensors"
    if not weights_file.exists():
        refuse_pickles_instead_of_weights(path)  # e.g. a pytorch_model.bin
    check_not_pickle(weights_file)
    for file in (config_file, weights_file):
        if not file.is_file():
            raise MLSAEError(f"{path} is not a reference MLSAE checkpoint: {file.name} is missing")
    try:
        config = json.loads(config_file.read_text())
        with safe_open(weights_file, framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys() if _wanted(key)}
    except Exception as exc:  # JSON or safetensors errors
        raise MLSAEError(
            f"could not read the checkpoint in {path} ({type(exc).__name__}: {exc}); re-download it"
        ) from exc
    check_finite_floats(tensors, str(weights_file), "the checkpoint is damaged; re-download it")
    return config, tensors


def read_lens(source: str | Path) -> dict[str, torch.Tensor]:
    """Tuned-lens translators from disk: a tuned-lens directory (``params.pt`` + ``config.json``,
    as ``TunedLens.save`` writes), a ``.safetensors`` file, or a ``-tfm`` checkpoint directory.

    ``params.pt`` is read with ``torch.load(weights_only=True)`` (plain tensors only).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            lens = checkpoint_lens(read_reference_dir(path)[1])
            if not lens:
                raise MLSAEError(
                    f"{path}/model.safetensors holds no {LENS_PREFIX}* tensors; pass a tuned-lens "
                    "directory (params.pt + config.json)"
                )
            return lens
        path = path / "params.pt"
    if not path.is_file():
        raise MLSAEError(
            f"no tuned lens at {source}: pass a tuned-lens directory (params.pt + config.json), a "
            ".safetensors file of layer translators, or a -tfm checkpoint directory"
        )
    if path.suffix == ".safetensors":
        check_not_pickle(path)  # a renamed pickle gets the pickle message, not "corrupted"
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (not plain tensors), damaged files
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise MLSAEError(
            f"could not read the tuned lens {path} ({type(exc).__name__}: {first_line}); it must "
            "hold plain tensors (TunedLens.save writes such a params.pt)"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MLSAEError(
            f"{path} is not a tuned-lens state dict of tensors; re-save it with TunedLens.save"
        )
    return state


def fetch_pretrained_lens(resource_id: str) -> dict[str, torch.Tensor]:
    """tuned-lens' pretrained lens ``resource_id`` (e.g. ``EleutherAI/pythia-70m-deduped``) from
    the hub, through tuned-lens' own artifact loader; one clear message when it cannot be had."""
    from tuned_lens.load_artifacts import load_lens_artifacts

    fix = (
        f"download params.pt and config.json from {TUNED_LENS_HUB}/{resource_id} and pass that "
        "directory as the lens (--lens DIR), or convert the -tfm release, which contains the lens"
    )
    if hub_unavailable():
        raise MLSAEError(
            f"cannot fetch tuned-lens' pretrained lens {resource_id!r}: the Hugging Face hub cannot "
            f"be reached; {fix}"
        )
    try:
        _, params = load_lens_artifacts(resource_id)
    except Exception as exc:  # noqa: BLE001 - hub errors have many types
        raise MLSAEError(
            f"cannot fetch tuned-lens' pretrained lens {resource_id!r} ({type(exc).__name__}); {fix}"
        ) from None
    return read_lens(params)


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


def convert_reference_dir(
    path: str | Path,
    n_layers: int,
    model_name: str | None = None,
    lens: str | Path | None = None,
    lens_resource_id: str | None = None,
    needs_lens: bool = False,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and convert a reference checkpoint directory, finding its tuned lens if it has one.

    The lens comes from, in order: ``lens`` (a path, see :func:`read_lens`), the checkpoint's own
    ``lens.layer_translators.*`` tensors (``-tfm``), or tuned-lens' pretrained lens
    ``lens_resource_id`` (fetched) when ``needs_lens`` or the checkpoint's config says it was
    trained with one.

    Raises:
        MLSAEError: unreadable files, a lens for another model, or a lens that cannot be had.
    """
    config, tensors = read_reference_dir(Path(path))
    has_lens = needs_lens or bool(config.get("tuned_lens")) or bool(checkpoint_lens(tensors))
    translators: dict[str, torch.Tensor] | None = None
    source: str | None = None
    if lens is not None:
        if not has_lens:
            raise MLSAEError(
                f"the checkpoint in {path} was trained without a tuned lens; drop the lens, or "
                "convert a -lens release"
            )
        translators, source = read_lens(lens), str(lens)
    elif checkpoint_lens(tensors):
        source = f"{path} ({LENS_PREFIX}*)"
    elif has_lens:
        if lens_resource_id is None:
            raise MLSAEError(
                f"the checkpoint in {path} was trained with a tuned lens but holds none, and no "
                "pretrained lens is registered for it; pass the lens (--lens DIR)"
            )
        translators, source = fetch_pretrained_lens(lens_resource_id), lens_resource_id
    cfg, state = reference_state_to_mlsae(config, tensors, n_layers, model_name, translators)
    if source is not None:
        cfg["metadata"]["tuned_lens_source"] = source
    return cfg, state


def build_sae(cfg: dict[str, Any], state: dict[str, torch.Tensor], device: str = "cpu") -> MultiLayerSAE:
    from mlsae_lens.sae import MultiLayerSAEConfig

    sae = MultiLayerSAE(MultiLayerSAEConfig.from_dict(cfg))
    sae.process_state_dict_for_loading(state)  # shapes and finiteness, incl. a supplied lens
    sae.load_state_dict(state)
    return sae.to(device)


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
        lens: for a ``-lens`` SAE, the tuned lens it was trained with (see :func:`read_lens`);
            default: the ``-tfm`` checkpoint's own, else tuned-lens' pretrained lens from the hub.
    """
    repo_id, entry = resolve_release(release, sae_id)
    path = Path(local_dir) if local_dir is not None else download(repo_id)
    if entry["format"] == "sae_lens":
        from mlsae_lens.run_files import load_sae

        return load_sae(path, device)
    cfg, state = convert_reference_dir(
        path, entry["n_layers"], entry["model"], lens=lens,
        lens_resource_id=entry.get("tuned_lens"), needs_lens=is_lens_sae_id(sae_id),
    )
    cfg["metadata"]["release"] = {"release": release, "sae_id": sae_id, "repo_id": repo_id}
    return build_sae(cfg, state, device)


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


def reference_disk_loader(n_layers: int, model_name: str | None = None, lens: str | Path | None = None):
    """SAELens ``PretrainedSaeDiskLoader`` for a downloaded reference checkpoint:
    ``SAE.load_from_disk(path, converter=reference_disk_loader(n_layers=6))``; ``lens`` is the
    tuned lens of a plain ``-lens`` checkpoint (a ``-tfm`` one carries its own)."""

    def loader(path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None):
        cfg, state = convert_reference_dir(
            Path(path), n_layers, model_name, lens=lens, needs_lens=lens is not None
        )
        cfg.update(cfg_overrides or {}, device=device)
        return cfg, {k: v.to(device) for k, v in state.items()}

    return loader


# ---------------------------------------------------------------------------------------------
# The command line's two actions: list the registry, convert a release into a run directory
# ---------------------------------------------------------------------------------------------


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
    (path / "README.md").write_text(card)
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
