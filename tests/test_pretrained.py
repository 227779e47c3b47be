"""Published reference checkpoints convert to MultiLayerSAEs with the same math."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from sae_lens import SAE

from mlsae_lens import MLSAEError, MultiLayerSAE
from mlsae_lens.pretrained import convert_to_run, from_pretrained
from mlsae_lens.reference_checkpoint import reference_disk_loader
from mlsae_lens.releases import reference_huggingface_loader, release_registry

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
    """The reference format's own forward pass, written out independently (tim-lawson/mlsae
    ``autoencoder.py``: divide by ``std + eps`` on the way in, multiply by ``std`` on the way out)."""
    if standardize:
        mu = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)
        x = (x - mu) / (std + 1e-5)
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
    torch.testing.assert_close(sae.reconstruct(x), recon, rtol=1e-5, atol=1e-5)
    assert sae.cfg.standardize_convention == "reference"


def test_converted_checkpoint_matches_the_reference_on_small_and_zero_vectors(tmp_path) -> None:
    """The reference zeroes special tokens and multiplies back by std: a zero vector comes back
    as exactly 0, and a vector of std 1e-3 within float rounding (std + eps would be 1e-2 off)."""
    tensors = write_reference_checkpoint(tmp_path)
    sae = SAE.load_from_disk(tmp_path, converter=reference_disk_loader(n_layers=N_LAYERS))
    x = torch.randn(4, N_LAYERS, D_IN, generator=torch.Generator().manual_seed(3)) * 1e-3
    x[0] = 0.0
    _, recon = reference_math(x, tensors, True)
    got = sae.reconstruct(x)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    deviation = recon - recon.mean(-1, keepdim=True)
    rel = (got - recon).norm(dim=-1) / deviation.norm(dim=-1).clamp_min(1e-30)
    assert rel[1:].max() < 1e-5


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


@pytest.mark.parametrize("poison", ["nan", "int"])
def test_a_checkpoint_with_non_finite_or_integer_weights_is_refused_naming_the_tensor(tmp_path, poison) -> None:
    tensors = write_reference_checkpoint(tmp_path)
    if poison == "nan":
        tensors["decoder.weight"][0, 0] = float("nan")
        match = "tensor decoder.weight in .*model.safetensors holds 1 NaN/inf values; .*re-download"
    else:
        tensors["decoder.weight"] = tensors["decoder.weight"].to(torch.int64)
        match = "tensor decoder.weight in .*model.safetensors has dtype int64, not floating point"
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(MLSAEError, match=match):
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


# ---- tuned-lens (-lens) releases -----------------------------------------------------------


def lens_translators(n_layers: int = N_LAYERS, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Small random tuned-lens translators (I + W stays well conditioned)."""
    gen = torch.Generator().manual_seed(seed)
    return 0.2 * torch.randn(n_layers, D_IN, D_IN, generator=gen) / D_IN**0.5, torch.randn(n_layers, D_IN, generator=gen)


def write_tfm_checkpoint(path: Path, weight: torch.Tensor, bias: torch.Tensor) -> dict:
    """A -tfm checkpoint: the training module's arguments as config, SAE keys under
    `autoencoder.`, the lens under `lens.layer_translators.{i}`, and transformer weights."""
    tensors = write_reference_checkpoint(path)
    lens = {f"lens.layer_translators.{i}.{name}": t[i] for i in range(N_LAYERS) for name, t in (("weight", weight), ("bias", bias))}
    save_file({**{"autoencoder." + k: v for k, v in tensors.items()}, **lens,
               "transformer.model.gpt_neox.embed_in.weight": torch.zeros(8, D_IN),
               "lens.unembed.unembedding.weight": torch.zeros(8, D_IN)}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({
        "model_name": "EleutherAI/pythia-70m-deduped", "layers": None, "expansion_factor": D_SAE // D_IN,
        "k": K, "auxk": 256, "standardize": True, "tuned_lens": True, "dead_steps_threshold": 76,
    }))
    return tensors


def reference_lens_math(x, t, weight, bias):
    """The reference's -lens forward: translator l on layer l (`h + Linear_l(h)`), then its SAE."""
    lensed = torch.stack([x[..., l, :] + x[..., l, :] @ weight[l].T + bias[l] for l in range(x.shape[-2])], dim=-2)
    latents, recon = reference_math(lensed, t, standardize=True)
    return lensed, latents, recon


def check_matches_reference_lens_math(sae: MultiLayerSAE, tensors: dict, weight, bias) -> None:
    x = torch.randn(5, N_LAYERS, D_IN) * 3 + 1
    lensed, latents, recon_lens = reference_lens_math(x, tensors, weight, bias)
    assert sae.cfg.tuned_lens
    torch.testing.assert_close(sae.encode(x), latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae.reconstruct(x, basis="lens"), recon_lens, rtol=1e-4, atol=1e-4)
    # The model-basis reconstruction is the exact preimage of the reference's lens-basis one.
    recon_model = sae.reconstruct(x)
    relensed = torch.stack([recon_model[..., l, :] + recon_model[..., l, :] @ weight[l].T + bias[l]
                            for l in range(N_LAYERS)], dim=-2)
    torch.testing.assert_close(relensed, recon_lens, rtol=1e-4, atol=1e-4)


def test_tfm_lens_checkpoint_gives_the_reference_latents_and_reconstructions(tmp_path) -> None:
    weight, bias = lens_translators()
    tensors = write_tfm_checkpoint(tmp_path, weight, bias)
    sae = from_pretrained("mlsae-pythia-70m-deduped", "x64-k32-lens-tfm", local_dir=tmp_path)
    check_matches_reference_lens_math(sae, tensors, weight, bias)
    assert "one block off" in sae.cfg.metadata.lens_convention


def test_the_disk_converter_reads_a_tfm_checkpoint_with_its_lens(tmp_path) -> None:
    weight, bias = lens_translators()
    tensors = write_tfm_checkpoint(tmp_path, weight, bias)
    sae = SAE.load_from_disk(tmp_path, converter=reference_disk_loader(n_layers=N_LAYERS))
    check_matches_reference_lens_math(sae, tensors, weight, bias)


@pytest.mark.parametrize("lens_format", ["tuned_lens_dir", "safetensors"])
def test_plain_lens_checkpoint_with_a_separately_supplied_lens_gives_the_reference_math(tmp_path, lens_format) -> None:
    weight, bias = lens_translators()
    tensors = write_reference_checkpoint(tmp_path / "sae")
    state = {f"{i}.{name}": t[i].clone() for i in range(N_LAYERS) for name, t in (("weight", weight), ("bias", bias))}
    if lens_format == "tuned_lens_dir":  # what TunedLens.save writes
        lens = tmp_path / "lens"
        lens.mkdir()
        torch.save(state, lens / "params.pt")
        (lens / "config.json").write_text(json.dumps({"d_model": D_IN, "num_hidden_layers": N_LAYERS}))
    else:
        lens = tmp_path / "lens.safetensors"
        save_file(state, lens)
    load = from_pretrained if lens_format == "tuned_lens_dir" else MultiLayerSAE.from_pretrained
    sae = load("mlsae-pythia-70m-deduped", "x64-k32-lens", local_dir=str(tmp_path / "sae"), lens=lens)
    check_matches_reference_lens_math(sae, tensors, weight, bias)
    assert sae.cfg.metadata.tuned_lens_source == str(lens)


def test_a_supplied_lens_with_nan_is_refused_naming_the_tensor(tmp_path) -> None:
    weight, bias = lens_translators()
    bias[2, 5] = float("inf")
    write_reference_checkpoint(tmp_path / "sae")
    state = {f"{i}.{name}": t[i].clone() for i in range(N_LAYERS) for name, t in (("weight", weight), ("bias", bias))}
    save_file(state, tmp_path / "lens.safetensors")
    with pytest.raises(MLSAEError, match="tensor lens_bias in the state dict holds 1 NaN/inf values"):
        from_pretrained("mlsae-pythia-70m-deduped", "x64-k32-lens", local_dir=str(tmp_path / "sae"),
                        lens=tmp_path / "lens.safetensors")


def test_a_plain_lens_checkpoint_without_its_lens_offline_names_the_fix(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_reference_checkpoint(tmp_path)
    with pytest.raises(MLSAEError, match=r"pretrained lens 'EleutherAI/pythia-70m-deduped'.*--lens DIR"):
        from_pretrained("mlsae-pythia-70m-deduped", "x64-k32-lens", local_dir=tmp_path)


def test_a_lens_for_a_checkpoint_trained_without_one_is_refused(tmp_path) -> None:
    write_reference_checkpoint(tmp_path / "sae")
    weight, bias = lens_translators()
    save_file({f"{i}.weight": weight[i] for i in range(N_LAYERS)}, tmp_path / "lens.safetensors")
    with pytest.raises(MLSAEError, match="trained without a tuned lens"):
        from_pretrained("mlsae-pythia-70m-deduped", "x64-k32", local_dir=tmp_path / "sae", lens=tmp_path / "lens.safetensors")


def test_a_lens_for_another_model_is_refused(tmp_path) -> None:
    write_reference_checkpoint(tmp_path / "sae")
    weight, bias = lens_translators(n_layers=N_LAYERS - 1)
    save_file({f"{i}.weight": weight[i] for i in range(N_LAYERS - 1)}, tmp_path / "lens.safetensors")
    with pytest.raises(MLSAEError, match="needs translators 0..5; is the lens for this model"):
        from_pretrained("mlsae-pythia-70m-deduped", "x64-k32-lens", local_dir=tmp_path / "sae", lens=tmp_path / "lens.safetensors")


def test_registry_lists_lens_releases_with_their_pretrained_lens() -> None:
    from mlsae_lens.releases import is_lens_sae_id, resolve_release

    for model in ("70m", "160m", "410m"):
        repo_id, entry = resolve_release(f"mlsae-pythia-{model}-deduped", "x64-k32-lens")
        assert repo_id == f"tim-lawson/mlsae-pythia-{model}-deduped-x64-k32-lens"
        assert entry["tuned_lens"] == f"EleutherAI/pythia-{model}-deduped"
    assert resolve_release("mlsae-pythia-70m-deduped", "x64-k32-lens-tfm")[0].endswith("-x64-k32-lens-tfm")
    assert is_lens_sae_id("x64-k32-lens-tfm") and not is_lens_sae_id("x64-k32-tfm")


# ---- mlsae-lens pretrained list / convert ------------------------------------------------


def test_pretrained_list_prints_the_registry(capsys) -> None:
    from mlsae_lens.cli import main

    assert main(["pretrained", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if "tim-lawson/mlsae-pythia-160m-deduped-x64-k32-lens" in line)
    assert row.split() == ["mlsae-pythia-160m-deduped", "x64-k32-lens", "tim-lawson/mlsae-pythia-160m-deduped-x64-k32-lens",
                           "pythia-160m-deduped", "12", "yes"]
    assert any(line.split()[-2:] == ["26", "no"] for line in lines)


def test_pretrained_convert_writes_a_run_directory_that_loads_back(tmp_path, capsys) -> None:
    from mlsae_lens.cli import main
    from mlsae_lens.config import MultiLayerRunnerConfig
    from mlsae_lens.run_files import load_sae

    weight, bias = lens_translators()
    write_tfm_checkpoint(tmp_path / "ref", weight, bias)
    out = tmp_path / "run"
    argv = ["pretrained", "convert", "mlsae-pythia-70m-deduped", "x64-k32-lens-tfm",
            "--local-dir", str(tmp_path / "ref"), "--output", str(out), "--context-size", "256"]
    assert main(argv) == 0
    assert f"mlsae-lens analyze {out}" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"cfg.json", "sae_weights.safetensors", "run.json"}
    loaded = load_sae(out)
    expected = from_pretrained("mlsae-pythia-70m-deduped", "x64-k32-lens-tfm", local_dir=tmp_path / "ref")
    assert loaded.state_dict().keys() == expected.state_dict().keys()
    for name, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    run = json.loads((out / "run.json").read_text())
    cfg = MultiLayerRunnerConfig.from_dict(run)
    assert (cfg.model_name, cfg.expansion_factor, cfg.k, cfg.context_size) == ("pythia-70m-deduped", D_SAE // D_IN, K, 256)
    assert run["converted_from"]["repo_id"] == "tim-lawson/mlsae-pythia-70m-deduped-x64-k32-lens-tfm"
    assert "one block off" in run["converted_from"]["lens_convention"]

    # An existing run is kept unless --overwrite; a foreign non-empty directory always.
    assert main(argv) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main([*argv[:-4], "--output", str(tmp_path / "other"), "--overwrite"]) == 2
    assert "holds no mlsae-lens run" in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_pretrained_convert_without_the_hub_or_local_dir_gives_one_message(tmp_path, monkeypatch, capsys) -> None:
    from huggingface_hub import constants

    from mlsae_lens.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["pretrained", "convert", "mlsae-pythia-70m-deduped", "x64-k32", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot download tim-lawson/mlsae-pythia-70m-deduped-x64-k32" in err[0]
    assert "--local-dir" in err[0] and not (tmp_path / "run").exists()


class CharTokenizer:
    """Enough of a tokenizer for the analysis' prompt heatmap on the tiny model."""

    eos_token_id, bos_token_id, pad_token_id, unk_token_id = 0, None, None, None
    padding_side = "right"

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [1 + ord(c) % 63 for c in text]}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(31 + i) for i in ids)


def test_a_converted_lens_run_is_analysed_like_a_trained_one(tmp_path) -> None:
    from mlsae_lens.analysis_options import AnalysisOptions
    from mlsae_lens.analyze import analyze_run
    from tiny import tiny_token_splits, tiny_transformer

    weight, bias = lens_translators()
    write_tfm_checkpoint(tmp_path / "ref", weight, bias)
    out = convert_to_run("mlsae-pythia-70m-deduped", "x64-k32-lens-tfm", tmp_path / "run", local_dir=tmp_path / "ref")
    model = tiny_transformer(n_layers=N_LAYERS, d_model=D_IN, tokenizer=CharTokenizer())  # Pythia's shape
    analyze_run(out, AnalysisOptions(tokens=32, batch_size=4, prompt="John gave Mary", top_contexts=False),
                model=model, splits=tiny_token_splits(), device="cpu")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics and (out / "report.html").is_file()
