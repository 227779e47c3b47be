"""Published reference checkpoints convert to MultiLayerSAEs with the same math."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from sae_lens import SAE

from mlsae_lens import MLSAEError, MultiLayerSAE
from mlsae_lens.pretrained import (
    from_pretrained,
    reference_disk_loader,
    reference_huggingface_loader,
    release_registry,
)

D_IN, D_SAE, K, N_LAYERS = 16, 64, 4, 6


def write_reference_checkpoint(path: Path, standardize: bool = True, prefix: str = "") -> dict:
    """A synthetic checkpoint in exactly the tim-lawson/mlsae layout."""
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=gen),
        "decoder.weight": torch.nn.functional.normalize(torch.randn(D_IN, D_SAE, generator=gen), dim=0),
        "pre_encoder_bias": torch.randn(D_IN, generator=gen),
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v for k, v in tensors.items()}, path / "model.safetensors")
    config = {"n_inputs": D_IN, "n_latents": D_SAE, "k": K, "standardize": standardize,
              "auxk": 256, "dead_steps_threshold": 76, "dead_threshold": 1e-3}
    (path / "config.json").write_text(json.dumps(config))
    return tensors


def reference_math(x: torch.Tensor, t: dict, standardize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference format's own forward pass, written out independently."""
    if standardize:
        mu = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True) + 1e-5
        x = (x - mu) / std
    pre = (x - t["pre_encoder_bias"]) @ t["encoder.weight"].T
    top = pre.topk(K, dim=-1)
    latents = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    recon = latents @ t["decoder.weight"].T + t["pre_encoder_bias"]
    if standardize:
        recon = recon * std + mu
    return latents, recon


@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("prefix", ["", "autoencoder."])
def test_converted_checkpoint_gives_the_reference_latents_and_reconstructions(tmp_path, standardize, prefix) -> None:
    tensors = write_reference_checkpoint(tmp_path, standardize, prefix)
    sae = SAE.load_from_disk(tmp_path, converter=reference_disk_loader(n_layers=N_LAYERS))
    assert isinstance(sae, MultiLayerSAE) and sae.cfg.n_layers == N_LAYERS
    x = torch.randn(5, N_LAYERS, D_IN) * 3 + 1
    latents, recon = reference_math(x, tensors, standardize)
    torch.testing.assert_close(sae.encode(x), latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.reconstruct(x), recon, rtol=1e-4, atol=1e-4)


def test_registered_release_loads_from_a_local_dir(tmp_path) -> None:
    tensors = write_reference_checkpoint(tmp_path)
    sae = from_pretrained("mlsae-pythia-70m-deduped", "x64-k32", local_dir=tmp_path)
    assert sae.cfg.n_layers == 6 and sae.cfg.metadata.model_name == "pythia-70m-deduped"
    x = torch.randn(3, 6, D_IN)
    torch.testing.assert_close(sae.reconstruct(x), reference_math(x, tensors, True)[1], rtol=1e-4, atol=1e-4)


def test_registry_lists_the_published_releases() -> None:
    registry = release_registry()
    assert {"mlsae-pythia-70m-deduped", "mlsae-pythia-1b-deduped"} <= registry.keys()
    assert all(entry["n_layers"] > 0 and entry["saes"] for entry in registry.values())


@pytest.mark.parametrize(("release", "sae_id", "match"), [
    ("nope", "x64-k32", "unknown release 'nope'"),
    ("mlsae-pythia-70m-deduped", "x999-k1", "has no SAE 'x999-k1'"),
])
def test_unknown_release_or_sae_is_named(release, sae_id, match, tmp_path) -> None:
    with pytest.raises(MLSAEError, match=match):
        from_pretrained(release, sae_id, local_dir=tmp_path)


def test_a_checkpoint_missing_tensors_is_refused(tmp_path) -> None:
    write_reference_checkpoint(tmp_path)
    save_file({"encoder.weight": torch.zeros(D_SAE, D_IN)}, tmp_path / "model.safetensors")
    with pytest.raises(MLSAEError, match="lacks decoder.weight, pre_encoder_bias"):
        from_pretrained("mlsae-pythia-70m-deduped", "x64-k32", local_dir=tmp_path)


def test_a_missing_local_dir_file_is_named(tmp_path) -> None:
    with pytest.raises(MLSAEError, match="config.json is missing"):
        from_pretrained("mlsae-pythia-70m-deduped", "x64-k32", local_dir=tmp_path)


def test_unreachable_hub_gives_one_clear_message(monkeypatch, tmp_path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MLSAEError, match="cannot download .* --local-dir"):
        SAE.from_pretrained("tim-lawson/mlsae-pythia-70m-deduped-x64-k32", "", converter=reference_huggingface_loader)


def test_multilayer_sae_from_pretrained_uses_the_registry(tmp_path) -> None:
    write_reference_checkpoint(tmp_path)
    sae = MultiLayerSAE.from_pretrained("mlsae-pythia-70m-deduped", "x64-k32", local_dir=str(tmp_path))
    assert sae.cfg.n_layers == 6


def test_save_pretrained_writes_sae_lens_files_and_a_model_card(tmp_path) -> None:
    from mlsae_lens.pretrained import save_pretrained

    write_reference_checkpoint(tmp_path / "ref")
    sae = from_pretrained("mlsae-pythia-70m-deduped", "x64-k32", local_dir=tmp_path / "ref")
    out = save_pretrained(sae, tmp_path / "release")
    assert {"cfg.json", "sae_weights.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    again = SAE.load_from_disk(out)
    x = torch.randn(2, 6, D_IN)
    assert torch.equal(again.reconstruct(x), sae.reconstruct(x))
    assert "pythia-70m-deduped" in (out / "README.md").read_text()
