"""Per-layer reconstruction and downstream metrics, and the baselines, on a tiny random model."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, TopKTrainingSAE, TopKTrainingSAEConfig
from transformer_lens import HookedTransformer

from mlsae_lens import MLSAEError
from mlsae_lens.activations import harvest_resid_post, valid_token_vectors
from mlsae_lens.baselines import PCABaseline, fold_normalization
from mlsae_lens.cli import main
from mlsae_lens.config import MultiLayerRunnerConfig
from mlsae_lens.data import TokenSplits
from mlsae_lens.eval_downstream import (
    MEAN_ABLATION,
    ZERO_ABLATION,
    clean_run,
    cross_entropy,
    next_token_log_probs,
    prediction_mask,
    splice,
    spliced_losses,
)
from mlsae_lens.eval_methods import CodeStats, evaluate_methods, frequency_histogram
from mlsae_lens.eval_run import EvalOptions, evaluate_run, parse_layers
from mlsae_lens.evals import ReconstructionStats
from mlsae_lens.normalization import renormalize
from mlsae_lens.run_training import TrainingRun
from tiny import EosTokenizer, tiny_token_splits, tiny_transformer

EOS = 0


@pytest.fixture(scope="module")
def tiny_model() -> HookedTransformer:
    return tiny_transformer(tokenizer=EosTokenizer())

@pytest.fixture(scope="module")
def tiny_splits() -> TokenSplits:
    return tiny_token_splits()

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model, tiny_splits) -> Path:
    out = tmp_path_factory.mktemp("run")
    cfg = MultiLayerRunnerConfig(
        model_name="tiny", output_dir=str(out), context_size=16, expansion_factor=4, k=4,
        training_tokens=15 * 8, batch_size_tokens=15, contexts_per_chunk=4, model_batch_size=2,
        lr=1e-3, dead_tokens_threshold=30, log_every_steps=1, seed=3,
    )
    TrainingRun(cfg, model=tiny_model, splits=tiny_splits).run()
    return out


@pytest.fixture
def run_dir(tmp_path, trained_run) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def masked_mean(values, mask):
    return float(values[mask].double().mean())


# ---------------------------------------------------------------------- splicing


def test_splicing_the_clean_activation_changes_nothing(tiny_model, tiny_splits) -> None:
    tokens = tiny_splits.test[:4]
    mask = tokens == EOS
    logits, acts = clean_run(tiny_model, tokens)
    clean_lp = next_token_log_probs(logits)
    pred = prediction_mask(mask)
    clean_ce = cross_entropy(clean_lp, tokens)
    for layer in range(tiny_model.cfg.n_layers):
        clean = acts[:, :, layer]
        ce, kl = spliced_losses(tiny_model, tokens, clean_lp, splice(clean, clean, mask), layer)
        assert masked_mean(ce, pred) - masked_mean(clean_ce, pred) == pytest.approx(0, abs=1e-6)
        assert masked_mean(kl, pred) == pytest.approx(0, abs=1e-6)
    stats = CodeStats(3, None, shared=False)
    x = valid_token_vectors(acts, mask)
    stats.update(x, x.clone(), None)
    assert torch.equal(stats.sum_sq_err, torch.zeros(3, dtype=torch.float64))  # FVU 0 for x̂ = x


def test_zero_ablation_matches_a_hooked_run_and_ce_by_hand(tiny_model, tiny_splits) -> None:
    tokens, mask = tiny_splits.test, tiny_splits.test == EOS
    sae = load_sae_for(tiny_model)
    raw = evaluate_methods(sae, tiny_model, tokens, mask, layers=[0, 2], n_tokens=10_000,
                           downstream_tokens=10_000, with_pca=False, batch_size=3)
    down = raw["downstream"]
    for index, layer in enumerate([0, 2]):

        def zero(act, hook):
            return torch.where(mask[..., None], act, torch.zeros_like(act))

        with torch.no_grad():
            logits = tiny_model.run_with_hooks(
                tokens, fwd_hooks=[(f"blocks.{layer}.hook_resid_post", zero)]
            )
            clean = tiny_model(tokens)
        logp = torch.log_softmax(logits[:, :-1].double(), -1)
        clean_logp = torch.log_softmax(clean[:, :-1].double(), -1)
        keep = (tokens[:, :-1] != EOS) & (tokens[:, 1:] != EOS)
        nll = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)[keep]
        kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1)[keep]
        ce_zero, kl_zero = down.mean(ZERO_ABLATION)
        assert down.n == int(keep.sum())
        assert float(ce_zero[index]) == pytest.approx(float(nll.mean()), rel=1e-5)
        assert float(kl_zero[index]) == pytest.approx(float(kl.mean()), rel=1e-4)
        clean_nll = -clean_logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)[keep]
        assert down.clean_ce / down.n == pytest.approx(float(clean_nll.mean()), rel=1e-5)
        # mean-ablation replaces the layer by its mean over the evaluated tokens
        acts = valid_token_vectors(harvest_resid_post(tiny_model, tokens), mask)
        assert torch.allclose(raw["layer_means"][layer], acts[:, layer].mean(0), atol=1e-5)
        assert float(down.mean(MEAN_ABLATION)[0][index]) != float(ce_zero[index])


def load_sae_for(model):
    """A random untrained MLSAE that fits ``model`` (downstream math does not need training)."""
    from mlsae_lens.sae import MultiLayerSAE, MultiLayerSAEConfig

    torch.manual_seed(0)
    sae = MultiLayerSAE(MultiLayerSAEConfig(d_in=16, d_sae=32, k=4, n_layers=3, device="cpu"))
    return sae.eval()


def test_special_positions_are_masked_in_splices_and_losses(tiny_model, tiny_splits) -> None:
    tokens = tiny_splits.test[:3]
    mask = tokens == EOS
    logits, acts = clean_run(tiny_model, tokens)
    clean_lp = next_token_log_probs(logits)
    pred = prediction_mask(mask)
    assert not pred[:, 6].any() and not pred[:, 7].any()  # target EOS, input EOS
    clean = acts[:, :, 1]
    noise = torch.randn_like(clean)
    corrupted = torch.where(mask[..., None], torch.full_like(clean, 1e4), clean + 0.1 * noise)
    spliced = splice(clean, corrupted, mask)
    assert torch.equal(spliced[mask], clean[mask])  # special positions keep the clean activation
    ce_a, kl_a = spliced_losses(tiny_model, tokens, clean_lp, spliced, 1)
    ce_b, kl_b = spliced_losses(tiny_model, tokens, clean_lp, splice(clean, clean + 0.1 * noise, mask), 1)
    assert torch.equal(ce_a, ce_b) and torch.equal(kl_a, kl_b)


# ---------------------------------------------------------------------- statistics


def test_frequency_histogram_counts_every_latent_once() -> None:
    counts = torch.tensor([0, 1, 10, 100, 1000, 0])
    hist = frequency_histogram(counts, 1000, bins=3)
    assert hist["log10_edges"] == pytest.approx([-3, -2, -1, 0])
    assert hist["counts"] == [1, 1, 2] and hist["never_active"] == 2 and hist["n_latents"] == 6


def test_pca_baseline_reaches_the_eigenvalue_floor(tiny_model, tiny_splits) -> None:
    sae = load_sae_for(tiny_model)
    acts = valid_token_vectors(harvest_resid_post(tiny_model, tiny_splits.test), tiny_splits.test == EOS)
    x_norm, _ = sae.normalize_input(acts)
    stats = ReconstructionStats(3, 16, 32)
    out = sae.encode_full(acts)
    stats.update(x_norm, sae.decode_topk_normalized(out.topk), out.topk.values, out.topk.indices)
    floor = stats.compute(4).pca_fvu
    recon, _ = PCABaseline(sae, *stats.pca(4)).reconstruct(acts)
    recon_norm = renormalize(recon, out.norm_stats)
    fvu = (recon_norm - x_norm).double().pow(2).sum((0, 2)) / stats.layer_variance_sums()
    assert torch.allclose(fvu, floor, atol=1e-4)


@pytest.mark.parametrize("mode", ["standardize", "center"])
def test_folded_per_layer_sae_reads_raw_activations(mode) -> None:
    from mlsae_lens.normalization import denormalize, normalize

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=8, d_sae=16, k=3, device="cpu"))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(5, 1, 8) * 3 + 1
    means = torch.randn(1, 8)
    x_norm, stats = normalize(x, mode, means)
    with torch.no_grad():
        expected = denormalize(sae(x_norm[:, 0])[:, None], stats)[:, 0]
        fold_normalization(sae, mode, means[0])
        got = sae(x[:, 0])
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_parse_layers_and_options_reject_bad_input() -> None:
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("2,0,-1", 4) == [0, 2, 3]
    for spec in ("a,b", "", "0,9"):
        with pytest.raises(MLSAEError, match="--layers"):
            parse_layers(spec, 4)
    with pytest.raises(MLSAEError, match="--tokens"):
        EvalOptions(tokens=0)
    with pytest.raises(MLSAEError, match="--baseline"):
        EvalOptions(baselines=("ica",))


# ---------------------------------------------------------------------- the command


def test_eval_run_writes_baselines_metrics_and_report(run_dir, tiny_model, tiny_splits) -> None:
    options = EvalOptions(tokens=60, downstream_tokens=30, baselines=("pca", "saelens-per-layer"),
                          layers="0,2", batch_size=2)
    data = evaluate_run(run_dir, options, model=tiny_model, splits=tiny_splits)
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved["layers"] == [0, 2] and set(saved["methods"]) == {"mlsae", "pca", "saelens-per-layer"}
    assert len(saved["per_layer"]["fvu"]) == 3 and "pca_mean_fvu" in saved  # legacy keys stay
    for method in saved["methods"].values():
        for key in ("fvu", "delta_ce", "kl_div_with_sae", "ce_loss_score"):
            assert len(method["per_layer"][key]) == 2, key
    mlsae = saved["methods"]["mlsae"]
    assert mlsae["per_layer"]["fvu"] == pytest.approx([saved["per_layer"]["fvu"][i] for i in (0, 2)])
    assert sum(mlsae["frequency_histogram"]["counts"]) + mlsae["frequency_histogram"]["never_active"] == 64
    per_layer = saved["methods"]["saelens-per-layer"]
    assert per_layer["n_parameters"] == 2 * mlsae["n_parameters"]
    assert per_layer["training_seconds"] > 0 and per_layer["per_layer"]["l0"][0] <= 4
    for layer in (0, 2):
        sae = SAE.load_from_disk(run_dir / "baselines" / "saelens-per-layer" / f"layer_{layer}")
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
        assert sae.cfg.normalize_activations == "layer_norm"  # reads raw hook_resid_post
    text = (run_dir / "report.html").read_text()
    assert "<h2>Evaluation: MLSAE vs baselines</h2>" in text and "SAELens TopK per layer" in text
    # a second evaluation reuses the saved SAEs and gives the same numbers
    again = evaluate_run(run_dir, options, model=tiny_model, splits=tiny_splits, report=False)
    assert again["methods"]["saelens-per-layer"]["per_layer"] == data["methods"]["saelens-per-layer"]["per_layer"]


def test_eval_cli_rejects_bad_input_with_one_line(tmp_path, run_dir, capsys) -> None:
    assert main(["eval", str(tmp_path)]) == 2
    assert "not an mlsae-lens run directory" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--tokens", "0"]) == 2
    assert "argument --tokens: must be positive, got 0" in capsys.readouterr().err  # argparse, before any load


def test_downstream_reads_only_the_contexts_its_budget_needs(tiny_model, tiny_splits) -> None:
    tokens, mask = tiny_splits.test, tiny_splits.test == EOS  # 15 valid tokens per context
    raw = evaluate_methods(load_sae_for(tiny_model), tiny_model, tokens, mask, layers=[1],
                           n_tokens=100, downstream_tokens=20, with_pca=False, batch_size=8)
    assert raw["reconstruction"].n_tokens == 100
    assert raw["downstream"].n == 2 * 13  # two contexts, 13 predicted positions each


def test_a_second_eval_with_fewer_options_keeps_what_the_first_computed(run_dir, tiny_model, tiny_splits, caplog) -> None:
    full = evaluate_run(run_dir, EvalOptions(tokens=60, downstream_tokens=30, baselines=("pca",), batch_size=2),
                        model=tiny_model, splits=tiny_splits, report=False)
    with caplog.at_level(logging.INFO, logger="mlsae_lens"):
        evaluate_run(run_dir, EvalOptions(tokens=40, downstream_tokens=0, batch_size=2),
                     model=tiny_model, splits=tiny_splits)
    saved = json.loads((run_dir / "eval.json").read_text())
    # PCA and the downstream section survive, marked with the options they were computed with
    assert saved["methods"]["pca"]["per_layer"] == full["methods"]["pca"]["per_layer"]
    assert saved["methods"]["pca"]["evaluated_with"]["tokens"] == 60
    assert saved["downstream"]["n_predicted_positions"] == full["downstream"]["n_predicted_positions"]
    assert saved["kept_from_previous_eval"] == ["downstream", "method pca"]
    mlsae = saved["methods"]["mlsae"]
    assert saved["n_tokens"] == 40 and mlsae["per_layer"]["fvu"] != full["methods"]["mlsae"]["per_layer"]["fvu"]
    assert mlsae["per_layer"]["delta_ce"] == full["methods"]["mlsae"]["per_layer"]["delta_ce"]
    assert "pca_mean_fvu" in saved  # the legacy top-level summary is always recomputed
    assert "kept pca from the previous evaluation" in caplog.text and "kept the downstream section" in caplog.text
    assert "PCA rank" in (run_dir / "report.html").read_text()  # the report still shows it
    # recomputing PCA replaces it and it is no longer marked as kept
    again = evaluate_run(run_dir, EvalOptions(tokens=40, downstream_tokens=0, baselines=("pca",), batch_size=2),
                         model=tiny_model, splits=tiny_splits, report=False)
    assert "evaluated_with" not in again["methods"]["pca"] and again["kept_from_previous_eval"] == ["downstream"]


def test_an_eval_of_other_layers_keeps_the_previous_file_beside_it(run_dir, tiny_model, tiny_splits) -> None:
    evaluate_run(run_dir, EvalOptions(tokens=40, downstream_tokens=0, baselines=("pca",), batch_size=2),
                 model=tiny_model, splits=tiny_splits, report=False)
    before = (run_dir / "eval.json").read_text()
    evaluate_run(run_dir, EvalOptions(tokens=40, downstream_tokens=0, layers="1", batch_size=2),
                 model=tiny_model, splits=tiny_splits, report=False)
    (backup,) = run_dir.glob("eval.previous-*.json")
    assert backup.read_text() == before
    assert json.loads((run_dir / "eval.json").read_text())["layers"] == [1]


def test_a_saved_per_layer_baseline_with_nan_weights_is_named_and_retrained_on_request(
    run_dir, tiny_model, tiny_splits
) -> None:
    from safetensors.torch import load_file, save_file

    options = EvalOptions(tokens=30, downstream_tokens=0, baselines=("saelens-per-layer",), layers="1",
                          batch_size=2, baseline_training_tokens=60)
    evaluate_run(run_dir, options, model=tiny_model, splits=tiny_splits, report=False)
    weights = run_dir / "baselines" / "saelens-per-layer" / "layer_1" / "sae_weights.safetensors"
    state = load_file(weights)
    state["W_enc"][0, :3] = float("nan")
    save_file(state, weights)
    with pytest.raises(MLSAEError, match="tensor W_enc in .*layer_1/sae_weights.safetensors holds 3 NaN/inf .*"
                                         "--retrain-baselines"):
        evaluate_run(run_dir, options, model=tiny_model, splits=tiny_splits, report=False)
    options.retrain_baselines = True
    data = evaluate_run(run_dir, options, model=tiny_model, splits=tiny_splits, report=False)
    assert data["methods"]["saelens-per-layer"]["mean"]["fvu"] is not None
