"""Each layer of an MLSAE as an ordinary SAELens SAE: splicing, caching, steering, evals, export."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from sae_lens import SAE, HookedSAETransformer, TopKSAE
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.registry import get_sae_class
from sae_lens.saes.sae import SAEConfig, SAEMetadata
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore
from transformer_lens import HookedTransformerConfig

from mlsae_lens import MLSAEError, MultiLayerSAE, MultiLayerSAEConfig
from mlsae_lens.activations import resid_post_hook_names
from mlsae_lens.layer_view import LayerViewSAE, LayerViewSAEConfig, steering_hook
from mlsae_lens.normalization import NORMALIZATION_MODES, STANDARDIZE_EPS
from mlsae_lens.sae_mixin import scatter_topk

N_LAYERS, D_MODEL, D_SAE, K, VOCAB = 3, 16, 64, 4, 64
BATCH, SEQ = 3, 8
LAYER = 1


@pytest.fixture(scope="module")
def model() -> HookedSAETransformer:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=N_LAYERS, d_model=D_MODEL, n_ctx=32, d_head=4, n_heads=4, d_mlp=32,
        d_vocab=VOCAB, act_fn="gelu", normalization_type="LN", device="cpu",
    )
    return HookedSAETransformer(cfg).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def make_mlsae(mode: str, convention: str = "reference") -> MultiLayerSAE:
    """Random MLSAE with nonzero biases and layer means (so every term of the math matters)."""
    cfg = MultiLayerSAEConfig(
        d_in=D_MODEL, d_sae=D_SAE, k=K, n_layers=N_LAYERS, normalization=mode,
        standardize_convention=convention,
        metadata=SAEMetadata(
            model_name="tiny", hook_names=resid_post_hook_names(N_LAYERS),
            context_size=SEQ, prepend_bos=False,
        ),
    )
    sae = MultiLayerSAE(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(std=0.5)
        sae.b_dec.normal_(std=0.5)
        sae.layer_means.normal_()
    return sae


def resid_posts(model: HookedSAETransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Clean ``[batch, pos, n_layers, d_model]`` residual stream (the MLSAE's input)."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("resid_post"))
    return torch.stack([cache[name] for name in resid_post_hook_names(N_LAYERS)], dim=-2)


def splice(recon: torch.Tensor):
    """Plain TransformerLens hook replacing the residual stream by a precomputed tensor."""
    return lambda resid, hook: recon.to(resid.dtype)


@torch.no_grad()
def test_view_reads_its_layer_and_shares_the_mlsae_tensors(model, tokens) -> None:
    mlsae = make_mlsae("center")
    view = mlsae.layer_view(LAYER)
    assert isinstance(view, TopKSAE)
    assert view.cfg.metadata.hook_name == f"blocks.{LAYER}.hook_resid_post"
    assert view.cfg.metadata.model_name == "tiny"
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert getattr(view, name) is getattr(mlsae, name)
    x = resid_posts(model, tokens)
    mlsae.W_enc.mul_(-1.5)  # in place: the view must see it
    mlsae.layer_means[LAYER].add_(0.25)
    torch.testing.assert_close(view.layer_mean, mlsae.layer_means[LAYER], rtol=0, atol=0)
    torch.testing.assert_close(view.encode(x[..., LAYER, :]), mlsae.encode(x)[..., LAYER, :])
    assert mlsae.layer_view(-1).cfg.metadata.hook_name == f"blocks.{N_LAYERS - 1}.hook_resid_post"


@pytest.mark.parametrize("mode", NORMALIZATION_MODES)
@torch.no_grad()
def test_run_with_saes_gives_the_logits_of_splicing_the_mlsae_reconstruction(
    model, tokens, mode: str
) -> None:
    mlsae = make_mlsae(mode)
    recon = mlsae.reconstruct(resid_posts(model, tokens))[..., LAYER, :]
    hook = f"blocks.{LAYER}.hook_resid_post"
    expected = model.run_with_hooks(tokens, fwd_hooks=[(hook, splice(recon))])
    logits = model.run_with_saes(tokens, saes=[mlsae.layer_view(LAYER)])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, model(tokens), atol=1e-3)  # the splice did something
    assert not model.acts_to_saes  # run_with_saes removed the SAE again


@pytest.mark.parametrize("mode", NORMALIZATION_MODES)
@torch.no_grad()
def test_cached_sae_latents_are_the_mlsae_code_at_that_layer(model, tokens, mode: str) -> None:
    mlsae = make_mlsae(mode)
    code = mlsae.encode_topk(resid_posts(model, tokens))
    dense = scatter_topk(code, D_SAE)[..., LAYER, :]
    _, cache = model.run_with_cache_with_saes(tokens, saes=[mlsae.layer_view(LAYER)])
    latents = cache[f"blocks.{LAYER}.hook_resid_post.hook_sae_acts_post"]
    assert latents.shape == (BATCH, SEQ, D_SAE)
    assert torch.equal(latents != 0, dense != 0)
    torch.testing.assert_close(latents, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", NORMALIZATION_MODES)
@torch.no_grad()
def test_steering_hook_equals_raising_the_latent_through_saelens_hooks(
    model, tokens, mode: str
) -> None:
    """Raising latent j by s under run_with_saes (error term on, so only the steering
    changes the stream) must equal our hook that adds s · W_dec[j] mapped to the raw space."""
    mlsae = make_mlsae(mode)
    view = mlsae.layer_view(LAYER)
    latent, scale = 7, 3.0

    def raise_latent(acts: torch.Tensor, hook) -> torch.Tensor:
        acts = acts.clone()
        acts[..., latent] += scale
        return acts

    with model.saes(saes=[view], use_error_term=True):
        via_saelens = model.run_with_hooks(
            tokens, fwd_hooks=[(f"blocks.{LAYER}.hook_resid_post.hook_sae_acts_post", raise_latent)]
        )
    ours = model.run_with_hooks(tokens, fwd_hooks=[steering_hook(mlsae, latent, LAYER, scale)])
    torch.testing.assert_close(ours, via_saelens, rtol=1e-5, atol=1e-5)
    # And against a brute-force reference: the raw-space vector, computed by hand.
    x = resid_posts(model, tokens)[..., LAYER, :]
    delta = scale * mlsae.W_dec[latent] * (x.std(-1, keepdim=True) if mode == "standardize" else 1)
    by_hand = model.run_with_hooks(
        tokens, fwd_hooks=[(f"blocks.{LAYER}.hook_resid_post", splice(x + delta))]
    )
    torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-5)
    assert (ours - model(tokens)).abs().max() > 1e-2


@pytest.mark.parametrize("mode", NORMALIZATION_MODES)
@torch.no_grad()
def test_saelens_evals_on_a_view_agree_with_direct_per_layer_metrics(
    model, tokens, mode: str
) -> None:
    mlsae = make_mlsae(mode)
    view = mlsae.layer_view(LAYER)
    store = ActivationsStore.from_sae(
        model, view, dataset=Dataset.from_dict({"tokens": tokens.tolist()}),
        context_size=SEQ, streaming=False, store_batch_size_prompts=BATCH, device="cpu",
    )
    metrics, _ = run_evals(
        view, store, model, ActivationScaler(),
        EvalConfig(
            batch_size_prompts=BATCH, n_eval_reconstruction_batches=1, compute_ce_loss=True,
            n_eval_sparsity_variance_batches=1, compute_variance_metrics=True,
            compute_sparsity_metrics=True,
        ),
        exclude_special_tokens=False,
    )
    x_all = resid_posts(model, tokens)
    x = x_all[..., LAYER, :].reshape(-1, D_MODEL).double()
    recon = mlsae.reconstruct(x_all)[..., LAYER, :].reshape(-1, D_MODEL).double()
    mse = (x - recon).pow(2).sum(-1).mean()
    total_var = (x - x.mean(0)).pow(2).sum(-1).mean()
    l0 = (mlsae.encode_topk(x_all).values[..., LAYER, :] > 0).sum(-1).double().mean()
    quality = metrics["reconstruction_quality"]
    assert quality["mse"] == pytest.approx(mse.item(), rel=1e-4)
    assert quality["explained_variance"] == pytest.approx(1 - (mse / total_var).item(), rel=1e-4)
    assert metrics["sparsity"]["l0"] == pytest.approx(l0.item())
    hook = f"blocks.{LAYER}.hook_resid_post"
    recon_l = mlsae.reconstruct(x_all)[..., LAYER, :]
    spliced_loss = model.run_with_hooks(
        tokens, return_type="loss", fwd_hooks=[(hook, splice(recon_l))]
    )
    ce = metrics["model_performance_preservation"]
    clean_loss = model(tokens, return_type="loss")
    assert ce["ce_loss_with_sae"] == pytest.approx(spliced_loss.item(), rel=1e-5)
    assert ce["ce_loss_without_sae"] == pytest.approx(clean_loss.item(), rel=1e-5)


EXPORT_SCRIPT = r"""
import json, sys
from safetensors.torch import load_file, save_file
from sae_lens import SAE
root = sys.argv[1]
x = load_file(f"{root}/inputs.safetensors")["x"]
out, kinds = {}, {}
for mode in sys.argv[2:]:
    sae = SAE.load_from_disk(f"{root}/{mode}")
    kinds[mode] = [type(sae).__name__, sae.cfg.architecture(), sae.cfg.normalize_activations]
    out[f"{mode}.latents"] = sae.encode(x)
    out[f"{mode}.recon"] = sae(x)
save_file({k: v.detach().contiguous() for k, v in out.items()}, f"{root}/outputs.safetensors")
print(json.dumps({"kinds": kinds, "mlsae_lens_imported": "mlsae_lens" in sys.modules}))
"""


@torch.no_grad()
def test_exported_layers_load_and_reconstruct_in_plain_saelens_without_mlsae_lens(
    model, tokens, tmp_path: Path
) -> None:
    x_all = resid_posts(model, tokens)
    x = x_all[..., LAYER, :]
    save_file({"x": x.contiguous()}, tmp_path / "inputs.safetensors")
    mlsaes = {mode: make_mlsae(mode) for mode in NORMALIZATION_MODES}
    mlsaes["legacy"] = make_mlsae("standardize", convention="legacy")
    for name, mlsae in mlsaes.items():
        mlsae.layer_view(LAYER).save_model(tmp_path / name, exact=name != "legacy")
        assert json.loads((tmp_path / name / "cfg.json").read_text())["architecture"] == "topk"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", EXPORT_SCRIPT, str(tmp_path), *mlsaes],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["mlsae_lens_imported"] is False
    outputs = load_file(tmp_path / "outputs.safetensors")
    assert report["kinds"]["standardize"][2] == "layer_norm"
    for mode, mlsae in mlsaes.items():
        assert report["kinds"][mode][:2] == ["TopKSAE", "topk"]
        out = mlsae.encode_full(x_all)
        expected_latents = scatter_topk(out.topk, D_SAE)[..., LAYER, :]
        got_latents, got = outputs[f"{mode}.latents"], outputs[f"{mode}.recon"]
        torch.testing.assert_close(got_latents, expected_latents, rtol=1e-5, atol=1e-5)
        expected = mlsae.reconstruct(x_all)[..., LAYER, :]
        if mode == "legacy":
            # SAELens multiplies back by std, a legacy MLSAE by std + eps: exactly eps·x̂_norm less.
            recon_norm = mlsae.decode_topk_normalized(out.topk)[..., LAYER, :]
            approx = expected - STANDARDIZE_EPS * recon_norm
            torch.testing.assert_close(got, approx, rtol=1e-5, atol=1e-5)
            bound = 2 * STANDARDIZE_EPS * recon_norm.abs().max() + 1e-5
            assert (got - expected).abs().max() <= bound
        else:  # exact, standardize included (float rounding only)
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_exact_export_refuses_only_a_legacy_standardize(tmp_path: Path) -> None:
    view = make_mlsae("standardize", convention="legacy").layer_view(0)
    with pytest.raises(MLSAEError, match="legacy convention .* approximately"):
        view.save_model(tmp_path / "layer", exact=True)
    assert not (tmp_path / "layer").exists() or not any((tmp_path / "layer").iterdir())
    make_mlsae("standardize").layer_view(0).save_model(tmp_path / "new", exact=True)
    assert (tmp_path / "new" / "cfg.json").is_file()


@torch.no_grad()
def test_fold_W_dec_norm_is_a_checked_no_op_on_unit_norm_rows(model, tokens) -> None:
    """sae-dashboard calls fold_W_dec_norm() on every SAE; for an MLSAE (unit-norm rows) it must
    change nothing (the weights are shared) and refuse rows that are not unit norm."""
    mlsae = make_mlsae("standardize")
    mlsae.set_decoder_norm_to_unit_norm()  # as training and the converter leave it
    view = mlsae.layer_view(LAYER)
    before = {name: getattr(mlsae, name).clone() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    x = resid_posts(model, tokens)[..., LAYER, :]
    recon = view(x)
    view.fold_W_dec_norm()
    for name, tensor in before.items():
        assert torch.equal(getattr(mlsae, name), tensor), name
    assert torch.equal(view(x), recon)
    mlsae.W_dec[3] *= 1.01
    with pytest.raises(MLSAEError, match="norm 1.01, not 1 within 1e-05"):
        view.fold_W_dec_norm()
    assert torch.equal(mlsae.W_enc, before["W_enc"])
    # A plain SAELens TopKSAE refuses the fold altogether: the reason the view needs its own.
    with pytest.raises(NotImplementedError):
        TopKSAE(view.to_topk_sae().cfg).fold_W_dec_norm()


def test_layer_view_architecture_is_registered_with_saelens() -> None:
    view = make_mlsae("none").layer_view(2)
    assert get_sae_class("multilayer_topk_layer") == (LayerViewSAE, LayerViewSAEConfig)
    cfg = SAEConfig.from_dict(view.cfg.to_dict())
    assert isinstance(cfg, LayerViewSAEConfig)
    assert (cfg.layer, cfg.normalization, cfg.k) == (2, "none", K)
    assert isinstance(SAE.get_sae_class_for_architecture(cfg.architecture())(cfg), LayerViewSAE)


def test_view_errors_name_the_fix() -> None:
    mlsae = make_mlsae("standardize")
    with pytest.raises(MLSAEError, match="out of range"):
        mlsae.layer_view(N_LAYERS)
    view = mlsae.layer_view(0)
    with pytest.raises(MLSAEError, match=r"\[\.\.\., d_in=16\]"):
        view.encode(torch.randn(2, N_LAYERS, D_MODEL + 1))
    with pytest.raises(MLSAEError, match="encode"):
        view.decode(torch.zeros(2, D_SAE))
    with pytest.raises(MLSAEError, match="latent"):
        steering_hook(mlsae, D_SAE, 0, 1.0)
    with pytest.raises(MLSAEError, match="layer"):
        steering_hook(view, 0, 1, 1.0)


def word_level_tokenizer(vocab_size: int):
    """A real (tiny, offline) Hugging Face tokenizer: token ``i`` is the word ``t{i}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0")


@torch.no_grad()
def test_sae_dashboard_builds_dashboards_for_a_layer_view(model, tmp_path: Path, monkeypatch) -> None:
    """sae-dashboard's plain call on a layer view: it folds W_dec norms, splices the view, and
    writes feature-centric HTML. Installed by scripts/setup-env.sh (--no-deps beside our pins)."""
    pytest.importorskip("sae_dashboard", reason="sae-dashboard not installed (see README: dashboards)")
    from sae_dashboard.data_writing_fns import save_feature_centric_vis
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner

    monkeypatch.setattr(model, "tokenizer", word_level_tokenizer(VOCAB))  # the HTML shows tokens
    mlsae = make_mlsae("standardize")
    mlsae.set_decoder_norm_to_unit_norm()
    before = mlsae.W_enc.clone()
    view = mlsae.layer_view(LAYER)
    tokens = torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(2))
    x = resid_posts(model, tokens)
    code = scatter_topk(mlsae.encode_topk(x), D_SAE)[..., LAYER, :]  # [batch, seq, d_sae]
    features = code.amax(dim=(0, 1)).topk(3).indices.tolist()  # latents that fire here
    cfg = SaeVisConfig(
        hook_point=view.cfg.metadata.hook_name, features=features, minibatch_size_features=4,
        minibatch_size_tokens=8, device="cpu", dtype="float32", verbose=False,
    )
    data = SaeVisRunner(cfg).run(encoder=view, model=model, tokens=tokens)
    assert torch.equal(mlsae.W_enc, before)  # the fold changed nothing
    assert sorted(data.feature_data_dict) == sorted(features)
    for feature in features:
        assert data.feature_data_dict[feature].sequence_data is not None
    # The dashboard's activations are the MLSAE's code at this layer: the same maxima.
    acts = data.feature_stats.max
    torch.testing.assert_close(
        torch.tensor(acts, dtype=torch.float32), code[..., features].amax(dim=(0, 1)), rtol=1e-5, atol=1e-5
    )
    out = tmp_path / "dashboard.html"
    save_feature_centric_vis(sae_vis_data=data, filename=out)
    html = out.read_text()
    assert "grid-container" in html and all(f'"{feature}"' in html for feature in features)
