"""Tuned-lens MLSAEs on a tiny random TransformerLens model: index mapping, exact inverse,
file formats, lens training, and the runner's --tuned-lens."""

from pathlib import Path

import pytest
import torch
from sae_lens import SAE
from safetensors.torch import load_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mlsae_lens import MLSAEError
from mlsae_lens.config import MultiLayerRunnerConfig
from mlsae_lens.data import TokenSplits
from mlsae_lens.lens import (
    LENS_PARAMS,
    LensTrainingConfig,
    evaluate_lens,
    hidden_state_pool,
    lens_for_model,
    load_lens,
    resid_post_translators,
    save_lens,
    train_lens,
)
from mlsae_lens.sae import MultiLayerSAE, MultiLayerSAEConfig
from mlsae_lens.run_training import TrainingRun
from tiny import EosTokenizer, tiny_token_splits, tiny_transformer

N_LAYERS, D = 3, 16


@pytest.fixture(scope="module")
def tiny_model() -> HookedTransformer:
    return tiny_transformer(n_layers=N_LAYERS, d_model=D)

@pytest.fixture(scope="module")
def tiny_splits() -> TokenSplits:
    return tiny_token_splits()

@pytest.fixture(autouse=True)
def with_tokenizer(tiny_model: HookedTransformer):
    tiny_model.tokenizer = EosTokenizer()
    yield


def known_lens(model: HookedTransformer):
    """A lens whose translator i is the known matrix (i + 1) * 0.1 * P_i (P_i distinct)."""
    lens = lens_for_model(model)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for i, translator in enumerate(lens.layer_translators):
            translator.weight.copy_((i + 1) * 0.1 * torch.randn(D, D, generator=gen) / D**0.5)
            translator.bias.copy_(torch.full((D,), float(i + 1)))
    return lens


def lens_sae(weight=None, bias=None, normalization="standardize") -> MultiLayerSAE:
    sae = MultiLayerSAE(MultiLayerSAEConfig(
        d_in=D, d_sae=4 * D, k=4, n_layers=N_LAYERS, normalization=normalization, tuned_lens=True,
        dtype="float32", device="cpu",
    ))
    if weight is not None:
        sae.set_tuned_lens(weight, bias)
    return sae


def test_resid_post_of_layer_l_goes_through_translator_l_plus_one(tiny_model):
    lens = known_lens(tiny_model)
    weight, bias = resid_post_translators(lens)
    for layer in range(N_LAYERS - 1):
        assert torch.equal(weight[layer], lens.layer_translators[layer + 1].weight)
        assert torch.equal(bias[layer], torch.full((D,), float(layer + 2)))
    assert not weight[-1].any() and not bias[-1].any()  # the last layer: identity

    sae = lens_sae(weight, bias)
    x = torch.randn(5, N_LAYERS, D)
    y = sae.to_lens_basis(x)
    for layer in range(N_LAYERS - 1):
        expected = lens.transform_hidden(x[:, layer], idx=layer + 1)
        torch.testing.assert_close(y[:, layer], expected)
    assert torch.equal(y[:, -1], x[:, -1])
    # the lens truly sits at the last hidden state: unembedding resid_post of the last layer
    # through the (identity) lens gives the model's logits
    tokens = torch.randint(1, 64, (2, 8))
    _, cache = tiny_model.run_with_cache(tokens)
    final = cache[f"blocks.{N_LAYERS - 1}.hook_resid_post"]
    torch.testing.assert_close(lens.unembed(final), tiny_model(tokens), rtol=1e-5, atol=1e-5)


def test_translate_then_inverse_is_the_identity(tiny_model):
    weight, bias = resid_post_translators(known_lens(tiny_model))
    sae = lens_sae(weight, bias)
    x = torch.randn(7, 2, N_LAYERS, D)
    torch.testing.assert_close(sae.from_lens_basis(sae.to_lens_basis(x)), x, rtol=0, atol=1e-5)
    for layer in range(N_LAYERS):
        got = sae.from_lens_basis(sae.to_lens_basis(x[..., layer, :], layer=layer), layer=layer)
        torch.testing.assert_close(got, x[..., layer, :], rtol=0, atol=1e-5)
    # against a brute-force dense inverse (not the diagonal approximation)
    y = torch.randn(4, N_LAYERS, D)
    inv = torch.linalg.inv(torch.eye(D) + weight.double())
    brute = torch.einsum("lij,nlj->nli", inv, y.double() - bias.double()).float()
    torch.testing.assert_close(sae.from_lens_basis(y), brute, rtol=0, atol=1e-5)
    # reconstruct() returns the model basis, basis="lens" the lens basis
    torch.testing.assert_close(sae.reconstruct(x), sae.from_lens_basis(sae.reconstruct(x, basis="lens")))
    # the cached factorization follows in-place updates of the buffer
    sae.set_tuned_lens(torch.zeros_like(weight), torch.zeros_like(bias))
    torch.testing.assert_close(sae.from_lens_basis(y), y, rtol=0, atol=1e-6)


def test_tuned_lens_mlsae_round_trips_bitwise_through_load_from_disk(tiny_model, tmp_path):
    weight, bias = resid_post_translators(known_lens(tiny_model))
    sae = lens_sae(weight, bias, normalization="center")
    sae.layer_means.normal_()
    sae.save_model(tmp_path)
    loaded = SAE.load_from_disk(str(tmp_path))
    assert isinstance(loaded, MultiLayerSAE) and loaded.cfg.tuned_lens
    original, restored = sae.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys() >= {"lens_weight", "lens_bias"}
    for name, tensor in original.items():
        assert torch.equal(tensor, restored[name]), name
    x = torch.randn(3, N_LAYERS, D)
    assert torch.equal(loaded.reconstruct(x), sae.reconstruct(x))
    plain = MultiLayerSAE(MultiLayerSAEConfig(d_in=D, d_sae=4 * D, k=4, n_layers=N_LAYERS))
    assert "lens_weight" not in plain.state_dict()


def test_layer_view_applies_the_translator_and_its_inverse(tiny_model):
    weight, bias = resid_post_translators(known_lens(tiny_model))
    sae = lens_sae(weight, bias)
    x = torch.randn(6, N_LAYERS, D)
    full = sae.reconstruct(x)
    codes = sae.encode(x)
    for layer in range(N_LAYERS):
        view = sae.layer_view(layer)
        torch.testing.assert_close(view.encode(x[:, layer]), codes[:, layer])
        torch.testing.assert_close(view(x[:, layer]), full[:, layer], rtol=1e-5, atol=1e-5)
    with pytest.raises(MLSAEError, match="tuned-lens"):
        sae.layer_view(0).to_topk_sae()


def test_training_a_tiny_lens_reduces_its_kl(tiny_model, tiny_splits):
    from mlsae_lens.data import special_token_mask

    lens = lens_for_model(tiny_model)
    mask = special_token_mask(tiny_splits.train, tiny_model.tokenizer)
    pool = hidden_state_pool(tiny_model, tiny_splits.train, mask, 400, 8)
    before = evaluate_lens(lens, pool)
    log = train_lens(lens, pool, LensTrainingConfig(steps=40, tokens_per_step=64))
    after = evaluate_lens(lens, pool)
    assert log[-1]["kl"] < log[0]["kl"]
    for old, new in zip(before[:-1], after[:-1]):
        assert old["tuned_lens_kl"] == pytest.approx(old["logit_lens_kl"])  # identity at init
        assert new["tuned_lens_kl"] < new["logit_lens_kl"]
    assert after[-1]["tuned_lens_kl"] == pytest.approx(0.0, abs=1e-6)  # the final layer itself


def test_lens_dir_written_by_lens_save_reads_back_equal(tiny_model, tmp_path):
    lens = known_lens(tiny_model)
    save_lens(lens, tmp_path / "lens")
    assert (tmp_path / "lens" / LENS_PARAMS).is_file()
    loaded = load_lens(str(tmp_path / "lens"), tiny_model)
    for a, b in zip(lens.layer_translators.state_dict().items(), loaded.layer_translators.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1])


class Exploit:
    def __reduce__(self):
        return (print, ("this would have run code",))


def test_a_params_pt_that_is_not_a_plain_state_dict_is_refused(tiny_model, tmp_path):
    lens = lens_for_model(tiny_model)
    save_lens(lens, tmp_path)
    torch.save({"0.weight": Exploit()}, tmp_path / LENS_PARAMS)
    with pytest.raises(MLSAEError, match="not a plain tensor state dict"):
        load_lens(str(tmp_path), tiny_model)


def test_bad_lens_sources_raise_one_clear_error(tiny_model, tmp_path, monkeypatch):
    with pytest.raises(MLSAEError, match="no tuned-lens directory"):
        load_lens(str(tmp_path / "missing"), tiny_model)
    with pytest.raises(MLSAEError, match="missing params.pt, config.json"):
        load_lens(str(tmp_path), tiny_model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MLSAEError, match="hub cannot be reached"):
        load_lens("pretrained", tiny_model)
    other = HookedTransformer(HookedTransformerConfig(
        n_layers=2, d_model=D, n_ctx=8, d_head=4, n_heads=4, d_vocab=64, attn_only=True, device="cpu"))
    save_lens(lens_for_model(other), tmp_path / "other")
    with pytest.raises(MLSAEError, match="made for d_model=16, 2 layers"):
        load_lens(str(tmp_path / "other"), tiny_model)


def test_runner_trains_with_frozen_translators_saved_in_the_sae(tiny_model, tiny_splits, tmp_path):
    lens = known_lens(tiny_model)
    save_lens(lens, tmp_path / "lens")
    cfg = MultiLayerRunnerConfig(
        model_name="tiny", output_dir=str(tmp_path / "run"), context_size=16, expansion_factor=4, k=4,
        training_tokens=60, batch_size_tokens=15, contexts_per_chunk=4, model_batch_size=2, lr=1e-3,
        normalization="center", center_estimation_tokens=60, tuned_lens=str(tmp_path / "lens"), seed=3,
    )
    runner = TrainingRun(cfg, model=tiny_model, splits=tiny_splits)
    assert not any(name.startswith("lens_") for name, _ in runner.sae.named_parameters())
    runner.run()
    weight, bias = resid_post_translators(lens)
    saved = load_file(Path(cfg.output_dir) / "sae_weights.safetensors")
    assert torch.equal(saved["lens_weight"], weight) and torch.equal(saved["lens_bias"], bias)
    sae = SAE.load_from_disk(cfg.output_dir)
    assert sae.cfg.tuned_lens and sae.cfg.metadata.tuned_lens_source == str(tmp_path / "lens")
    # center mode: the layer means were taken in the lens basis
    from mlsae_lens.activations import estimate_layer_means
    from mlsae_lens.data import special_token_mask

    raw = estimate_layer_means(tiny_model, tiny_splits.train,
                               special_token_mask(tiny_splits.train, tiny_model.tokenizer), 60, 2)
    torch.testing.assert_close(sae.layer_means, sae.to_lens_basis(raw), rtol=1e-5, atol=1e-5)


def test_per_layer_saelens_baseline_of_a_tuned_lens_run_trains_in_the_model_basis(tiny_model, tiny_splits, tmp_path):
    import json
    import math

    from mlsae_lens.activations import estimate_layer_means
    from mlsae_lens.baselines import model_basis_layer_means
    from mlsae_lens.data import special_token_mask
    from mlsae_lens.eval_run import EvalOptions, evaluate_run

    save_lens(known_lens(tiny_model), tmp_path / "lens")
    cfg = MultiLayerRunnerConfig(
        model_name="tiny", output_dir=str(tmp_path / "run"), context_size=16, expansion_factor=4, k=4,
        training_tokens=45, batch_size_tokens=15, contexts_per_chunk=4, model_batch_size=2, lr=1e-3,
        normalization="center", center_estimation_tokens=60, tuned_lens=str(tmp_path / "lens"), seed=3,
    )
    runner = TrainingRun(cfg, model=tiny_model, splits=tiny_splits)
    runner.run()
    raw = estimate_layer_means(tiny_model, tiny_splits.train,
                               special_token_mask(tiny_splits.train, tiny_model.tokenizer), 60, 2)
    # the lens-basis means mapped back are the raw means (the lens is affine)
    torch.testing.assert_close(model_basis_layer_means(runner.sae), raw, rtol=1e-4, atol=1e-4)
    options = EvalOptions(tokens=30, downstream_tokens=15, baselines=("saelens-per-layer",), layers="0,2", batch_size=2)
    evaluate_run(cfg.output_dir, options, model=tiny_model, splits=tiny_splits, report=False)
    saved = json.loads((Path(cfg.output_dir) / "eval.json").read_text())
    per_layer = saved["methods"]["saelens-per-layer"]
    assert all(math.isfinite(v) for v in per_layer["per_layer"]["fvu"])
    for layer in (0, 2):  # each folded SAE adds the raw (model-basis) mean back: b_dec carries it
        sae = SAE.load_from_disk(Path(cfg.output_dir) / "baselines" / "saelens-per-layer" / f"layer_{layer}")
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
    info = json.loads((Path(cfg.output_dir) / "baselines" / "saelens-per-layer" / "training.json").read_text())
    assert info["basis"].startswith("model")
