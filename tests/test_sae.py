"""MultiLayerSAE math, SAELens integration and file round trips."""

import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.saes.sae import TrainStepInput

from mlsae_lens import (
    MLSAEError,
    MultiLayerSAE,
    MultiLayerSAEConfig,
    MultiLayerTrainingSAE,
    MultiLayerTrainingSAEConfig,
)
from mlsae_lens.normalization import (
    NORMALIZATION_MODES,
    STANDARDIZE_EPS,
    denormalize,
    normalize,
    renormalize,
)
from mlsae_lens.run_files import load_sae
from mlsae_lens.sae import geometric_median
from mlsae_lens.sae_mixin import decode_topk_rows, scatter_topk

D_IN, D_SAE, K, N_LAYERS = 12, 48, 4, 3


def make_training_sae(normalization: str = "standardize", **kwargs) -> MultiLayerTrainingSAE:
    cfg = MultiLayerTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=K, n_layers=N_LAYERS, normalization=normalization, **kwargs
    )
    sae = MultiLayerTrainingSAE(cfg)
    sae.layer_means.copy_(torch.randn(N_LAYERS, D_IN))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    return sae


def step_input(x: torch.Tensor, dead: torch.Tensor | None = None) -> TrainStepInput:
    return TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
    )


@pytest.mark.parametrize("mode", NORMALIZATION_MODES)
def test_normalize_then_denormalize_is_identity(mode: str) -> None:
    """Exact for center/none, and for the legacy standardize (which multiplies back by std + eps)."""
    x = torch.randn(7, N_LAYERS, D_IN) * 5 + 3
    x_norm, stats = normalize(x, mode, torch.randn(N_LAYERS, D_IN), "legacy")
    torch.testing.assert_close(denormalize(x_norm, stats), x, rtol=1e-5, atol=1e-5)
    if mode != "standardize":
        x_norm, stats = normalize(x, mode, torch.randn(N_LAYERS, D_IN))
        torch.testing.assert_close(denormalize(x_norm, stats), x, rtol=1e-5, atol=1e-5)


def test_reference_standardize_divides_by_std_plus_eps_and_multiplies_back_by_std() -> None:
    x = torch.randn(7, N_LAYERS, D_IN, dtype=torch.float64) * 1e-3 + 3
    mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
    x_norm, stats = normalize(x, "standardize")
    torch.testing.assert_close(x_norm, (x - mean) / (std + STANDARDIZE_EPS), rtol=1e-12, atol=0)
    x_hat = torch.randn_like(x_norm)
    torch.testing.assert_close(denormalize(x_hat, stats), x_hat * std + mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(renormalize(denormalize(x_hat, stats), stats), x_hat)
    # The way in does not depend on the convention: the latents never do.
    torch.testing.assert_close(normalize(x, "standardize", convention="legacy")[0], x_norm)


def test_standardize_gives_zero_mean_unit_std_per_vector() -> None:
    x = torch.randn(5, N_LAYERS, D_IN) * 10 + 4
    x_norm, _ = normalize(x, "standardize")
    torch.testing.assert_close(x_norm.mean(-1), torch.zeros(5, N_LAYERS), atol=1e-5, rtol=0)
    torch.testing.assert_close(x_norm.std(-1), torch.ones(5, N_LAYERS), atol=1e-4, rtol=0)


def test_center_subtracts_each_layers_own_mean() -> None:
    means = torch.randn(N_LAYERS, D_IN)
    x = means.expand(4, N_LAYERS, D_IN).clone()
    x_norm, _ = normalize(x, "center", means)
    assert x_norm.abs().max() == 0


def test_standardize_mode_code_is_invariant_to_per_vector_affine_rescaling() -> None:
    sae = make_training_sae("standardize")
    x = torch.randn(6, N_LAYERS, D_IN)
    a, b = sae.encode_topk(x), sae.encode_topk(3.0 * x + 2.0)
    torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-4)
    assert torch.equal(a.indices, b.indices)


@pytest.mark.parametrize("mode", NORMALIZATION_MODES)
def test_reconstruction_is_in_the_residual_streams_own_scale(mode: str) -> None:
    """decode(encode(x)) == denormalize(sparse decode): dense SAELens API = sparse path."""
    sae = make_training_sae(mode)
    x = torch.randn(5, N_LAYERS, D_IN) * 4 + 1
    torch.testing.assert_close(sae.decode(sae.encode(x)), sae.reconstruct(x), rtol=1e-5, atol=1e-5)


def test_sparse_decode_equals_dense_matmul() -> None:
    sae = make_training_sae()
    out = sae.encode_topk(torch.randn(9, N_LAYERS, D_IN))
    dense = scatter_topk(out, D_SAE) @ sae.W_dec
    torch.testing.assert_close(decode_topk_rows(out.values, out.indices, sae.W_dec), dense)


def test_topk_keeps_exactly_k_nonnegative_latents_per_vector() -> None:
    sae = make_training_sae()
    acts = sae.encode(torch.randn(8, N_LAYERS, D_IN))
    assert acts.shape == (8, N_LAYERS, D_SAE)
    assert ((acts != 0).sum(-1) <= K).all()
    assert (acts >= 0).all()


def test_wrong_activation_shape_names_the_expected_shape() -> None:
    sae = make_training_sae()
    with pytest.raises(MLSAEError, match=r"n_layers=3, d_in=12"):
        sae.encode_topk(torch.randn(4, N_LAYERS + 1, D_IN))


@pytest.mark.parametrize(
    ("k", "d_sae", "n_layers", "match"),
    [(0, 48, 3, "0 < k < d_sae"), (48, 48, 3, "0 < k < d_sae"), (-1, 48, 3, "0 < k"),
     (4, 0, 3, "d_sae must be positive"), (4, 48, 0, "n_layers must be positive")],
)
def test_impossible_sizes_are_refused_with_the_fix(k: int, d_sae: int, n_layers: int, match: str) -> None:
    with pytest.raises(MLSAEError, match=match):
        MultiLayerSAEConfig(d_in=D_IN, d_sae=d_sae, k=k, n_layers=n_layers)


def test_per_layer_fvu_loss_matches_a_manual_computation() -> None:
    sae = make_training_sae("none")
    x = torch.randn(16, N_LAYERS, D_IN)
    out = sae.training_forward_pass(step_input(x))
    recon = sae.reconstruct(x)
    manual = torch.stack(
        [((recon[:, l] - x[:, l]) ** 2).sum() / ((x[:, l] - x[:, l].mean(0)) ** 2).sum() for l in range(N_LAYERS)]
    )
    torch.testing.assert_close(out.layer_fvu, manual, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.loss, manual.mean(), rtol=1e-4, atol=1e-6)  # no dead latents: no AuxK


def test_auxk_is_zero_without_dead_latents_and_positive_with_them() -> None:
    sae = make_training_sae()
    x = torch.randn(16, N_LAYERS, D_IN)
    none_dead = sae.training_forward_pass(step_input(x, torch.zeros(D_SAE, dtype=torch.bool)))
    assert none_dead.losses["auxiliary_reconstruction_loss"] == 0
    some_dead = sae.training_forward_pass(step_input(x, torch.arange(D_SAE) < 10))
    assert some_dead.losses["auxiliary_reconstruction_loss"] > 0


def test_auxk_gradient_reaches_only_dead_latents_encoder_columns() -> None:
    sae = make_training_sae("none", aux_k=3)
    x = torch.randn(16, N_LAYERS, D_IN)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[5, 17, 30, 41]] = True
    out = sae.training_forward_pass(step_input(x, dead))
    out.losses["auxiliary_reconstruction_loss"].backward()
    touched = sae.W_enc.grad.abs().sum(0) > 0
    assert touched.any()
    assert not touched[~dead].any()


def test_auxk_matches_a_manual_computation_on_a_constructed_case() -> None:
    sae = make_training_sae("none", aux_k=2)
    x = torch.randn(10, N_LAYERS, D_IN)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[1, 2, 3]] = True
    out = sae.training_forward_pass(step_input(x, dead))
    error = (sae.reconstruct(x) - x).detach()
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    masked = pre.masked_fill(~dead, -torch.inf)
    top = masked.topk(2, dim=-1)
    aux = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu()) @ sae.W_dec
    var = ((x - x.mean(0)) ** 2).sum(dim=(0, 2))
    expected = (((aux - error) ** 2).sum(dim=(0, 2)) / var).mean() * min(3 / 2, 1.0)
    torch.testing.assert_close(out.losses["auxiliary_reconstruction_loss"], expected, rtol=1e-4, atol=1e-6)


def test_decoder_rows_unit_norm_and_gradient_has_no_radial_component() -> None:
    sae = make_training_sae()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))
    out = sae.training_forward_pass(step_input(torch.randn(16, N_LAYERS, D_IN)))
    out.loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    radial = (sae.W_dec.grad * sae.W_dec).sum(-1)
    assert radial.abs().max() < 1e-6


def test_geometric_median_minimises_sum_of_distances_and_resists_outliers() -> None:
    torch.manual_seed(0)
    points = torch.randn(50, 3)
    points[0] = 1000.0
    median = geometric_median(points)
    cost = lambda m: (points - m).norm(dim=-1).sum()  # noqa: E731
    for _ in range(20):
        assert cost(median) <= cost(median + 0.01 * torch.randn(3)) + 1e-3
    assert median.norm() < 1.0  # the mean is pulled to ~20 by the outlier


def test_save_then_sae_lens_load_from_disk_round_trips_bitwise(tmp_path: Path) -> None:
    sae = make_training_sae("center")
    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert isinstance(loaded, MultiLayerSAE)
    assert loaded.cfg.n_layers == N_LAYERS and loaded.cfg.k == K and loaded.cfg.normalization == "center"
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = torch.randn(4, N_LAYERS, D_IN)
    assert torch.equal(loaded(x), sae(x))
    again = TrainingSAE.load_from_disk(tmp_path)
    assert isinstance(again, MultiLayerTrainingSAE)


def test_files_are_sae_lens_format(tmp_path: Path) -> None:
    make_training_sae().save_inference_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "multilayer_topk"
    assert {"d_in", "d_sae", "k", "n_layers", "normalization"} <= cfg.keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_truncated_weights_give_one_clear_error(tmp_path: Path) -> None:
    make_training_sae().save_inference_model(tmp_path)
    weights = tmp_path / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(MLSAEError, match="truncated or corrupted"):
        load_sae(tmp_path)


def test_cfg_of_another_architecture_is_refused_by_name(tmp_path: Path) -> None:
    make_training_sae().save_inference_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["architecture"] = "topk"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(MLSAEError, match="architecture 'topk', not an MLSAE"):
        load_sae(tmp_path)


def test_missing_sae_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(MLSAEError, match="holds no SAE"):
        load_sae(tmp_path)


# ---- standardize convention: reference (times std) for new SAEs, legacy for old files -----


def test_new_sae_reconstructs_as_x_hat_times_std_plus_mean() -> None:
    sae = make_training_sae("standardize")
    assert sae.cfg.standardize_convention == "reference"
    x = torch.randn(6, N_LAYERS, D_IN) * 4 + 1
    x_hat = sae.decode_topk_normalized(sae.encode_topk(x))
    expected = x_hat * x.std(-1, keepdim=True) + x.mean(-1, keepdim=True)
    torch.testing.assert_close(sae.reconstruct(x), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sae.decode(sae.encode(x)), expected, rtol=1e-6, atol=1e-6)


def test_zero_vector_comes_back_as_zero() -> None:
    """std = 0 and mean = 0: whatever the code (here the biases' own), x_hat · 0 + 0 = 0."""
    sae = make_training_sae("standardize")
    x = torch.zeros(2, N_LAYERS, D_IN)
    code = sae.encode(x)
    assert code.abs().sum() > 0  # not a trivially zero code: the biases fire latents
    assert torch.equal(sae.reconstruct(x), x)
    assert torch.equal(sae.decode(code), x)
    assert torch.equal(sae.decode(sae.encode(x) * 0), x)  # a zero code too
    sae.cfg.standardize_convention = "legacy"
    assert sae.reconstruct(x).norm() > 0  # the old convention: x_hat · 1e-5


def test_legacy_cfg_json_loads_as_legacy_and_reproduces_the_old_numbers(tmp_path: Path) -> None:
    sae = make_training_sae("standardize")
    sae.save_inference_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["standardize_convention"] == "reference"
    del cfg["standardize_convention"]  # a cfg.json written before the field existed
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    x = torch.randn(5, N_LAYERS, D_IN) * 3 - 2
    x_hat = sae.decode_topk_normalized(sae.encode_topk(x))
    old = x_hat * (x.std(-1, keepdim=True) + STANDARDIZE_EPS) + x.mean(-1, keepdim=True)
    for loaded in (load_sae(tmp_path), TrainingSAE.load_from_disk(tmp_path)):
        assert loaded.cfg.standardize_convention == "legacy"
        torch.testing.assert_close(loaded.reconstruct(x), old, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(loaded.reconstruct(x), sae.reconstruct(x), rtol=0, atol=1e-7)
    # Saved again it stays legacy (the field is now written out).
    load_sae(tmp_path).save_model(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "cfg.json").read_text())["standardize_convention"] == "legacy"
    assert load_sae(tmp_path / "again").cfg.standardize_convention == "legacy"


def test_unknown_standardize_convention_is_refused() -> None:
    with pytest.raises(MLSAEError, match="standardize_convention 'std'"):
        MultiLayerSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, n_layers=N_LAYERS, standardize_convention="std")
@pytest.mark.parametrize("poison", ["nan", "shape"])
def test_sae_lens_own_loading_refuses_bad_weights_too(tmp_path: Path, poison: str) -> None:
    """``SAE.load_from_disk`` (not only mlsae-lens' load_sae) goes through the loading hook. (Its
    disk loader casts every tensor to the config's dtype first, so an integer tensor is only
    caught by load_sae, which reads the file's header.)"""
    from safetensors.torch import load_file, save_file
    from sae_lens import SAE

    make_training_sae().save_inference_model(tmp_path)
    weights = tmp_path / "sae_weights.safetensors"
    state = load_file(weights)
    if poison == "nan":
        state["b_enc"][0] = float("inf")
        match = "tensor b_enc in the state dict holds 1 NaN/inf values"
    else:
        state["W_dec"] = state["W_dec"][:, :-1].contiguous()
        match = r"tensor W_dec in the state dict has shape \[\d+, \d+\], but this MLSAE's config"
    save_file(state, weights)
    with pytest.raises(MLSAEError, match=match):
        SAE.load_from_disk(tmp_path)
