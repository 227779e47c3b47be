"""Pretrained MLSAEs: a release registry and a converter for the published checkpoints.

The paper's authors published their MLSAEs as ``tim-lawson/mlsae-<model>-x<R>-k<k>`` with
their own layout (facts in ``shared/notes/reference-implementation.md``):

* ``config.json``: ``n_inputs``, ``n_latents``, ``k``, ``standardize`` (and AuxK fields);
* ``model.safetensors``: ``encoder.weight`` [n_latents, n_inputs] (no encoder bias),
  ``decoder.weight`` [n_inputs, n_latents], ``pre_encoder_bias`` [n_inputs]
  (``-tfm`` repositories prefix these with ``autoencoder.``).

Their math — standardize per vector, subtract ``pre_encoder_bias``, encode, top-k, ReLU,
decode, add the bias back, de-standardize — is exactly a :class:`MultiLayerSAE` with
``W_enc = encoder.weight.T``, ``b_enc = 0``, ``W_dec = decoder.weight.T``,
``b_dec = pre_encoder_bias`` and ``normalization = "standardize"`` (or ``none``). The loaders
follow SAELens' converter protocols, so ``SAE.from_pretrained(..., converter=...)`` and
``SAE.load_from_disk(..., converter=...)`` work as well as :func:`from_pretrained`.
"""

import json
import logging
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from mlsae_lens.checkpoint import check_not_pickle, refuse_pickles_instead_of_weights
from mlsae_lens.errors import MLSAEError
from mlsae_lens.sae import ARCHITECTURE, MultiLayerSAE

logger = logging.getLogger(__name__)

REFERENCE_KEYS = ("encoder.weight", "decoder.weight", "pre_encoder_bias")
TFM_PREFIX = "autoencoder."


@cache
def release_registry() -> dict[str, dict[str, Any]]:
    """The releases shipped in ``mlsae_lens/pretrained_saes.yaml``."""
    text = resources.files("mlsae_lens").joinpath("pretrained_saes.yaml").read_text()
    return yaml.safe_load(text)["releases"]


def resolve_release(release: str, sae_id: str) -> tuple[str, dict[str, Any]]:
    """``(repo_id, release entry)`` for a registered release and SAE id."""
    releases = release_registry()
    if release not in releases:
        raise MLSAEError(
            f"unknown release {release!r}; known releases: {', '.join(sorted(releases))}"
        )
    entry = releases[release]
    if sae_id not in entry["saes"]:
        raise MLSAEError(
            f"release {release!r} has no SAE {sae_id!r}; it has: {', '.join(entry['saes'])}"
        )
    return entry["repo_id_template"].format(sae_id=sae_id), entry


def reference_state_to_mlsae(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], n_layers: int, model_name: str | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Convert a reference checkpoint to our ``cfg.json`` dict and state dict."""
    tensors = {k.removeprefix(TFM_PREFIX): v for k, v in tensors.items()}
    missing = [key for key in REFERENCE_KEYS if key not in tensors]
    if missing:
        raise MLSAEError(
            f"not a reference MLSAE checkpoint: model.safetensors lacks {', '.join(missing)}; "
            "expected encoder.weight, decoder.weight and pre_encoder_bias"
        )
    try:
        d_in, d_sae, k = int(config["n_inputs"]), int(config["n_latents"]), int(config["k"])
    except KeyError as exc:
        raise MLSAEError(f"reference config.json lacks {exc.args[0]!r}; it needs n_inputs, n_latents and k") from None
    encoder, decoder = tensors["encoder.weight"].float(), tensors["decoder.weight"].float()
    if encoder.shape != (d_sae, d_in) or decoder.shape != (d_in, d_sae):
        raise MLSAEError(
            f"reference checkpoint shapes do not match its config: encoder {list(encoder.shape)}, "
            f"decoder {list(decoder.shape)}, expected [{d_sae}, {d_in}] and [{d_in}, {d_sae}]"
        )
    cfg = {
        "architecture": ARCHITECTURE,
        "d_in": d_in,
        "d_sae": d_sae,
        "k": k,
        "n_layers": n_layers,
        "normalization": "standardize" if config.get("standardize", True) else "none",
        "dtype": "float32",
        "apply_b_dec_to_input": True,
        "metadata": {
            "model_name": model_name,
            "hook_names": [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)],
            "converted_from": "tim-lawson/mlsae reference format",
        },
    }
    state = {
        "W_enc": encoder.T.contiguous(),
        "b_enc": torch.zeros(d_sae),
        "W_dec": decoder.T.contiguous(),
        "b_dec": tensors["pre_encoder_bias"].float().clone(),
        "layer_means": torch.zeros(n_layers, d_in),
    }
    return cfg, state


def read_reference_dir(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` + ``model.safetensors`` of a downloaded reference checkpoint."""
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
        tensors = load_file(weights_file)
    except Exception as exc:  # JSON or safetensors errors
        raise MLSAEError(f"could not read the checkpoint in {path} ({type(exc).__name__}: {exc}); re-download it") from exc
    return config, tensors


def build_sae(cfg: dict[str, Any], state: dict[str, torch.Tensor], device: str = "cpu") -> MultiLayerSAE:
    from mlsae_lens.sae import MultiLayerSAEConfig

    sae = MultiLayerSAE(MultiLayerSAEConfig.from_dict(cfg))
    sae.load_state_dict(state)
    return sae.to(device)


def download(repo_id: str) -> Path:
    """``snapshot_download`` with one clear message when the hub cannot be reached."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["config.json", "model.safetensors"]))
    except Exception as exc:  # network, auth and offline-mode errors
        raise MLSAEError(
            f"cannot download {repo_id} from the Hugging Face hub ({type(exc).__name__}); connect "
            "to the internet, or download config.json and model.safetensors yourself and pass "
            "--local-dir"
        ) from exc


def from_pretrained(
    release: str, sae_id: str, local_dir: str | Path | None = None, device: str = "cpu"
) -> MultiLayerSAE:
    """Load a registered release as a :class:`MultiLayerSAE` (``local_dir`` skips the hub)."""
    repo_id, entry = resolve_release(release, sae_id)
    path = Path(local_dir) if local_dir is not None else download(repo_id)
    if entry["format"] == "sae_lens":
        from mlsae_lens.pipeline import load_sae

        return load_sae(path, device)
    config, tensors = read_reference_dir(path)
    cfg, state = reference_state_to_mlsae(config, tensors, entry["n_layers"], entry["model"])
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
    converter=reference_huggingface_loader)``."""
    entry = next(
        (e for e in release_registry().values() if repo_id.startswith(e["repo_id_template"].split("{")[0])),
        None,
    )
    if entry is None:
        raise MLSAEError(f"{repo_id} is not a registered reference release; use reference_disk_loader with n_layers")
    config, tensors = read_reference_dir(download(repo_id))
    cfg, state = reference_state_to_mlsae(config, tensors, entry["n_layers"], entry["model"])
    cfg.update(cfg_overrides or {}, device=device)
    return cfg, {k: v.to(device) for k, v in state.items()}, None


def reference_disk_loader(n_layers: int, model_name: str | None = None):
    """SAELens ``PretrainedSaeDiskLoader`` for a downloaded reference checkpoint:
    ``SAE.load_from_disk(path, converter=reference_disk_loader(n_layers=6))``."""

    def loader(path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None):
        config, tensors = read_reference_dir(Path(path))
        cfg, state = reference_state_to_mlsae(config, tensors, n_layers, model_name)
        cfg.update(cfg_overrides or {}, device=device)
        return cfg, {k: v.to(device) for k, v in state.items()}

    return loader


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
