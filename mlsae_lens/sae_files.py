"""Check an SAE's weights file against what its ``cfg.json`` promises, before loading it.

``SAE.load_from_disk`` loads with ``assign=True``: integer tensors become integer parameters
and NaN/inf weights load as they are, giving absurd metrics (a mean FVU of 3e17) instead of an
error; a wrong shape or a missing tensor surfaces as a torch error that reads like a damaged
file. Reading the safetensors header first (names, shapes, dtypes; no tensor data) names the
tensor, the shape expected and found, and which of the two files disagrees.
"""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mlsae_lens.errors import MLSAEError

ARCHITECTURE = "multilayer_topk"
"""The SAELens architecture name of an MLSAE's ``cfg.json`` (the classes: :mod:`mlsae_lens.sae`)."""


def _shape(shape: Any) -> str:
    return "[" + ", ".join(str(int(n)) for n in shape) + "]"


def expected_shapes(cfg_dict: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The tensors (name → shape) an SAE built from ``cfg_dict`` holds, from building it on the
    meta device exactly as ``SAE.load_from_disk`` does (no memory, no weights)."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting

    cfg_dict = handle_config_defaulting(dict(cfg_dict))
    cfg = SAE.get_sae_config_class_for_architecture(cfg_dict["architecture"]).from_dict(cfg_dict)
    cfg.device = "meta"
    sae = SAE.get_sae_class_for_architecture(cfg.architecture())(cfg)
    return {name: tuple(t.shape) for name, t in sae.state_dict().items()}


def _sizes_of_weights(found: dict[str, tuple[int, ...]]) -> str:
    """What the weights themselves say about d_in, d_sae and n_layers (MLSAE tensor names)."""
    w_enc, means = found.get("W_enc"), found.get("layer_means")
    if w_enc is None or len(w_enc) != 2:
        return ""
    sizes = f"d_in={w_enc[0]}, d_sae={w_enc[1]}"
    if means is not None and len(means) == 2:
        sizes += f", n_layers={means[0]}"
    return f" (the weights are of an SAE with {sizes})"


def check_tensors(
    weights_file: Path, expected: dict[str, tuple[int, ...]], described_by: str
) -> None:
    """Refuse a weights file whose tensors are missing, extra, of another shape, not floating
    point, or not finite, naming the tensor. ``described_by`` names what set the expectation
    (``cfg.json (d_in=…, …)`` or ``the run's settings``)."""
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise MLSAEError(
            f"could not read the SAE weights in {weights_file} ({type(exc).__name__}: {exc}); the file "
            "is truncated or corrupted — retrain or restore it from a checkpoint"
        ) from None
    floating = {name: dtype in ("F16", "BF16", "F32", "F64") for name, dtype in dtypes.items()}
    with safe_open(str(weights_file), framework="pt") as f:
        _check(f"{weights_file}", found, dtypes, floating, f.get_tensor, expected, described_by)


def check_state_dict(
    state_dict: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], described_by: str
) -> None:
    """:func:`check_tensors` for tensors already in memory (SAELens' loading hook)."""
    _check(
        "the state dict",
        {name: tuple(t.shape) for name, t in state_dict.items()},
        {name: str(t.dtype).removeprefix("torch.") for name, t in state_dict.items()},
        {name: t.is_floating_point() for name, t in state_dict.items()},
        state_dict.__getitem__,
        expected,
        described_by,
    )


def _check(
    where: str,
    found: dict[str, tuple[int, ...]],
    dtypes: dict[str, str],
    floating: dict[str, bool],
    get_tensor: Callable[[str], torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    described_by: str,
) -> None:
    for name, shape in expected.items():
        if name not in found:
            raise MLSAEError(
                f"{where} lacks the tensor {name} (expected shape {_shape(shape)} from "
                f"{described_by}); the file is incomplete or not an MLSAE's — retrain or restore it"
            )
        if found[name] != shape:
            raise MLSAEError(
                f"tensor {name} in {where} has shape {_shape(found[name])}, but {described_by} "
                f"expects {_shape(shape)}: the weights and the config disagree{_sizes_of_weights(found)} "
                "— restore the matching cfg.json or weights"
            )
    extra = sorted(set(found) - set(expected))
    if extra:
        raise MLSAEError(
            f"{where} holds tensors that {described_by} does not describe ({', '.join(extra)}); "
            "the weights and the config disagree — restore the matching cfg.json or weights"
        )
    for name in expected:
        if not floating[name]:
            raise MLSAEError(
                f"tensor {name} in {where} has dtype {dtypes[name]}; SAE weights are floating "
                "point — the file was not written by mlsae-lens or SAELens (retrain or restore it)"
            )
    for name in expected:
        bad = int((~torch.isfinite(get_tensor(name))).sum())
        if bad:
            raise MLSAEError(
                f"tensor {name} in {where} holds {bad} NaN/inf values; the weights are "
                "unusable — retrain them (e.g. with a lower --lr) or restore the file"
            )


def check_finite_floats(tensors: dict[str, torch.Tensor], where: str, fix: str) -> None:
    """Refuse integer or NaN/inf tensors (a reference checkpoint, a lens), naming the tensor."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise MLSAEError(f"tensor {name} in {where} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                             f"not floating point; {fix}")
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise MLSAEError(f"tensor {name} in {where} holds {bad} NaN/inf values; {fix}")


def check_sae_dir(path: Path, cfg_dict: dict[str, Any]) -> None:
    """Check ``path/sae_weights.safetensors`` against ``cfg_dict`` (its ``cfg.json``)."""
    for key in ("d_in", "d_sae", "n_layers", "k"):
        value = cfg_dict.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MLSAEError(
                f"{path / 'cfg.json'} gives {key}={value!r}, not a positive integer; the config is "
                "damaged — restore it"
            )
    try:
        expected = expected_shapes(cfg_dict)
    except MLSAEError:
        raise
    except Exception as exc:  # noqa: BLE001 - a cfg.json SAELens cannot build from
        raise MLSAEError(
            f"{path / 'cfg.json'} does not describe a loadable SAE ({type(exc).__name__}: {exc}); "
            "restore it"
        ) from None
    sizes = ", ".join(f"{k}={cfg_dict[k]}" for k in ("d_in", "d_sae", "n_layers") if k in cfg_dict)
    check_tensors(path / "sae_weights.safetensors", expected, f"cfg.json ({sizes})")


def read_cfg(path: Path) -> dict[str, Any]:
    """``cfg.json`` of an SAE directory as a dict, a damaged one named."""
    cfg_file = path / "cfg.json"
    try:
        data = json.loads(cfg_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MLSAEError(f"{cfg_file} is not valid JSON ({exc}); the run directory is damaged") from None
    if not isinstance(data, dict):
        raise MLSAEError(f"{cfg_file} is not a JSON object; the run directory is damaged")
    return data


def load_mlsae_dir(path: Path, device: str = "cpu") -> Any:
    """``SAE.load_from_disk`` of an MLSAE directory with clear messages for the usual ways it goes
    wrong (pickles, missing files, another architecture, wrong shapes, damaged weights).

    Returns the :class:`~mlsae_lens.sae.MultiLayerSAE` SAELens' registry builds; typed ``Any``
    because this module sits below :mod:`mlsae_lens.sae` (which imports it).
    """
    from sae_lens import SAE

    from mlsae_lens.checkpoint import check_not_pickle, refuse_pickles_instead_of_weights

    path = Path(path)
    cfg_file, weights_file = path / "cfg.json", path / "sae_weights.safetensors"
    if not weights_file.exists():
        refuse_pickles_instead_of_weights(path)
    check_not_pickle(weights_file)  # safetensors would only call a pickle "corrupted"
    if not cfg_file.exists() or not weights_file.exists():
        raise MLSAEError(f"{path} holds no SAE (cfg.json + sae_weights.safetensors); pass an MLSAE directory")
    cfg_dict = read_cfg(path)
    architecture = cfg_dict.get("architecture")
    if architecture != ARCHITECTURE:
        raise MLSAEError(
            f"{path} holds a SAELens SAE of architecture {architecture!r}, not an MLSAE "
            f"({ARCHITECTURE!r}); load it with sae_lens.SAE.load_from_disk instead"
        )
    check_sae_dir(path, cfg_dict)  # names a wrong shape, missing tensor, int dtype or NaN
    try:
        return SAE.load_from_disk(path, device=device)
    except MLSAEError:
        raise
    except Exception as exc:  # safetensors / torch raise several types for damaged files
        raise MLSAEError(
            f"could not load the SAE weights in {path} ({type(exc).__name__}: {exc}); the file is "
            "truncated or corrupted — retrain or restore it from a checkpoint"
        ) from exc
