"""Your own model: tiny random Llama and GPT-NeoX saved to a directory, through TransformerBridge.

Everything is offline: ``transformers`` builds the models from configs, ``tokenizers`` trains
their tokenizer, and ``save_pretrained`` writes the directory that ``--model-name`` reads.
"""

import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, SAETransformerBridge
from sae_lens.saes.sae import SAEMetadata
from transformers import AutoModelForCausalLM, BertConfig, BertModel

from hf_tiny import corpus_text, save_tiny_causal_lm
from mlsae_lens import MultiLayerSAE, MultiLayerSAEConfig
from mlsae_lens.activations import harvest_resid_post, resid_post_hook_names
from mlsae_lens.bridge import is_bridge
from mlsae_lens.cli import main
from mlsae_lens.errors import MLSAEError
from mlsae_lens.eval_downstream import clean_run, logits_from_layer
from mlsae_lens.layer_view import steering_hook
from mlsae_lens.lens import harvest_hidden_states, lens_for_model
from mlsae_lens.models import load_model, model_provenance

KINDS = ["llama", "gpt_neox"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_models")
    return {kind: save_tiny_causal_lm(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(corpus_text())
    return path


def hf_reference(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def random_tokens(model, shape=(3, 12)) -> torch.Tensor:
    return torch.randint(1, model.cfg.d_vocab, shape, generator=torch.Generator().manual_seed(2))


# --- Loading and harvesting -----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_harvest_equals_hf_hidden_states(model_dirs, kind):
    model = load_model(str(model_dirs[kind]))
    assert is_bridge(model) and model_provenance(model)["backend"] == "bridge"
    hf = hf_reference(model_dirs[kind])
    tokens = random_tokens(model)
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    acts = harvest_resid_post(model, tokens)
    n = model.cfg.n_layers
    assert acts.shape == (*tokens.shape, n, model.cfg.d_model)
    for layer in range(n - 1):
        torch.testing.assert_close(acts[:, :, layer], hidden[layer + 1], atol=1e-5, rtol=0)
    # Convention: HF's last hidden state is after the final norm; resid_post is before it.
    final_norm = hf.model.norm if kind == "llama" else hf.gpt_neox.final_layer_norm
    with torch.no_grad():
        torch.testing.assert_close(final_norm(acts[:, :, n - 1]), hidden[n], atol=1e-5, rtol=0)
    assert (acts[:, :, n - 1] - hidden[n]).abs().max() > 1e-2


def test_harvest_stops_before_the_final_norm_and_unembedding(model_dirs):
    model = load_model(str(model_dirs["llama"]))
    calls = []
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in (model.ln_final, model.unembed)]
    try:
        harvest_resid_post(model, random_tokens(model))
        assert calls == []
        model(random_tokens(model))
        assert len(calls) == 2  # the hooks do fire on a full forward
    finally:
        for handle in handles:
            handle.remove()
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())  # harvest hooks removed


@pytest.mark.parametrize("kind", KINDS)
def test_splice_and_lens_helpers_match_hf(model_dirs, kind):
    model = load_model(str(model_dirs[kind]))
    hf = hf_reference(model_dirs[kind])
    tokens = random_tokens(model)
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
    logits, acts = clean_run(model, tokens)
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(acts, harvest_resid_post(model, tokens))
    # Running on from an unchanged layer gives the clean logits; a changed one changes them.
    torch.testing.assert_close(logits_from_layer(model, acts[:, :, 0], 0, tokens), out.logits, atol=1e-5, rtol=0)
    assert (logits_from_layer(model, acts[:, :, 0] * 2, 0, tokens) - out.logits).abs().max() > 1e-3
    hidden = harvest_hidden_states(model, tokens)
    for i, expected in enumerate(out.hidden_states[:-1]):
        torch.testing.assert_close(hidden[:, :, i], expected, atol=1e-5, rtol=0)
    lens = lens_for_model(model)
    torch.testing.assert_close(lens.unembed(hidden[:, :, -1]), out.logits, atol=1e-5, rtol=0)


# --- Bad input: one line naming the problem and what is supported ----------------------------


def test_directory_without_config_is_named(tmp_path):
    with pytest.raises(MLSAEError, match="has no config.json.*save_pretrained"):
        load_model(str(tmp_path))


def test_a_bert_is_not_a_causal_lm(tmp_path):
    BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=4, intermediate_size=32)).save_pretrained(tmp_path)
    with pytest.raises(MLSAEError, match="holds a BertModel, not a causal language model.*LlamaForCausalLM"):
        load_model(str(tmp_path))


def test_an_architecture_the_bridge_lacks_lists_the_supported_ones(model_dirs, tmp_path):
    config = json.loads((model_dirs["llama"] / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MLSAEError, match="NoSuchModelForCausalLM, which TransformerLens' TransformerBridge "
                       "does not support; supported causal LMs: .*GPTNeoXForCausalLM"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(("remove", "message"), [
    ("model.safetensors", "has no weights"),
    ("tokenizer", "has no loadable tokenizer"),
])
def test_missing_weights_or_tokenizer_are_named(model_dirs, tmp_path, remove, message):
    for item in model_dirs["llama"].iterdir():
        if not (remove == "tokenizer" and item.name.startswith("tokenizer")) and item.name != remove:
            (tmp_path / item.name).write_bytes(item.read_bytes())
    with pytest.raises(MLSAEError, match=message):
        load_model(str(tmp_path))


def test_a_path_that_is_not_a_directory_and_hooked_with_a_directory(model_dirs, tmp_path):
    with pytest.raises(MLSAEError, match="is not a directory"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(MLSAEError, match="only --model-backend bridge loads"):
        load_model(str(model_dirs["llama"]), backend="hooked")


def test_cli_bad_model_directory_exits_2_with_one_line(tmp_path, corpus, capsys):
    code = main(["train", "--model-name", str(tmp_path), "--dataset", str(corpus),
                 "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "has no config.json" in err and len(err.splitlines()) == 1
    assert not list((tmp_path / "run").glob("*")) if (tmp_path / "run").exists() else True  # nothing written


def test_cli_bad_device_exits_2_with_one_line(model_dirs, tmp_path, corpus, capsys):
    code = main(["train", "--model-name", str(model_dirs["llama"]), "--dataset", str(corpus),
                 "--device", "tpu", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--device 'tpu' is not a device" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before anything is written


# --- Every command on a bridge model, through the CLI ----------------------------------------

TRAIN = ["--context-size", "32", "--training-tokens", "128", "--batch-size-tokens", "32",
         "--expansion-factor", "2", "--k", "4", "--contexts-per-chunk", "4", "--model-batch-size", "4"]


@pytest.mark.parametrize("kind", KINDS)
def test_train_analyze_eval_explore_end_to_end(model_dirs, corpus, tmp_path, kind):
    run = tmp_path / "run"
    assert main(["train", "--model-name", str(model_dirs[kind]), "--dataset", str(corpus),
                 *TRAIN, "--output-dir", str(run)]) == 0
    sae = SAE.load_from_disk(run)
    assert isinstance(sae, MultiLayerSAE) and (sae.cfg.n_layers, sae.cfg.d_in) == (2, 16)
    assert json.loads((run / "run.json").read_text())["model_backend"] == "bridge"
    assert main(["analyze", str(run), "--tokens", "128"]) == 0
    assert json.loads((run / "metrics.json").read_text())
    baselines = ["--baseline", "pca"] + (["--baseline", "saelens-per-layer"] if kind == "llama" else [])
    assert main(["eval", str(run), "--tokens", "128", "--downstream-tokens", "32",
                 *baselines, "--baseline-training-tokens", "64"]) == 0
    metrics = json.loads((run / "eval.json").read_text())
    assert "saelens-per-layer" in json.dumps(metrics) or kind != "llama"
    assert main(["explore", str(run), "--max-latents", "4"]) == 0
    assert (run / "explore.html").stat().st_size > 0


def test_train_lens_cache_and_lens_training_on_a_bridge_model(model_dirs, corpus, tmp_path):
    model = str(model_dirs["gpt_neox"])
    lens = tmp_path / "lens"
    assert main(["train-lens", model, "--dataset", str(corpus), "--context-size", "32", "--steps", "2",
                 "--tokens-per-step", "32", "--pool-tokens", "128", "--eval-tokens", "32",
                 "--output", str(lens)]) == 0
    assert (lens / "params.pt").exists()
    cache = tmp_path / "cache"
    common = ["--model-name", model, "--dataset", str(corpus), "--context-size", "32", "--training-tokens", "128",
              "--batch-size-tokens", "32", "--contexts-per-chunk", "4", "--model-batch-size", "4"]
    assert main(["cache", *common, "--output", str(cache)]) == 0
    assert main(["train", *common, "--expansion-factor", "2", "--k", "4", "--tuned-lens", str(lens), "--activation-cache", str(cache),
                 "--output-dir", str(tmp_path / "run")]) == 0
    assert SAE.load_from_disk(tmp_path / "run").cfg.tuned_lens


# --- SAELens' SAETransformerBridge and steering -----------------------------------------------


def random_mlsae(model) -> MultiLayerSAE:
    n, d = model.cfg.n_layers, model.cfg.d_model
    sae = MultiLayerSAE(MultiLayerSAEConfig(
        d_in=d, d_sae=4 * d, k=4, n_layers=n, normalization="standardize",
        metadata=SAEMetadata(model_name="tiny", hook_names=resid_post_hook_names(n),
                             context_size=12, prepend_bos=False),
    ))
    with torch.no_grad():
        sae.b_dec.normal_(std=0.5)
    return sae


@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_layer_view_under_sae_transformer_bridge_equals_the_plain_splice(model_dirs, kind):
    model = load_model(str(model_dirs[kind]), sae_transformer=True)
    assert isinstance(model, SAETransformerBridge)
    mlsae, tokens = random_mlsae(model), random_tokens(model)
    acts = harvest_resid_post(model, tokens)
    for layer in range(model.cfg.n_layers):
        recon = mlsae.reconstruct(acts)[:, :, layer]
        hook = (f"blocks.{layer}.hook_resid_post", lambda act, hook, r=recon: r.to(act.dtype))
        expected = model.run_with_hooks(tokens, fwd_hooks=[hook])
        view = mlsae.layer_view(layer)
        torch.testing.assert_close(model.run_with_saes(tokens, saes=[view]), expected, atol=1e-5, rtol=0)
        _, cache = model.run_with_cache_with_saes(tokens, saes=[view])
        latents = cache[model.get_sae_hook_name(view)]
        code = mlsae.encode_topk(acts)
        dense = torch.zeros_like(latents).scatter_(-1, code.indices[:, :, layer], code.values[:, :, layer])
        torch.testing.assert_close(latents, dense, atol=1e-5, rtol=0)
        assert not model.acts_to_saes


@torch.no_grad()
@pytest.mark.parametrize("sae_transformer", [False, True])
def test_steering_hook_on_a_bridge_model(model_dirs, sae_transformer):
    """On SAELens' SAETransformerBridge too, whose hook_dict drops the alias names."""
    model = load_model(str(model_dirs["llama"]), sae_transformer=sae_transformer)
    mlsae, tokens = random_mlsae(model), random_tokens(model)
    clean = model(tokens)
    steered = model.run_with_hooks(tokens, fwd_hooks=[steering_hook(mlsae, latent=3, layer=0, scale=5.0)])
    assert (steered - clean).abs().max() > 1e-3
    torch.testing.assert_close(model(tokens), clean)  # the hook is gone afterwards


def test_k_is_checked_against_a_local_model_config_before_loading(model_dirs, corpus, tmp_path, capsys):
    """A local directory's config.json gives d_model without loading the weights."""
    d_model = json.loads((model_dirs["llama"] / "config.json").read_text())["hidden_size"]
    code = main(["train", "--model-name", str(model_dirs["llama"]), "--dataset", str(corpus), "--expansion-factor",
                 "1", "--k", str(d_model), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"--k {d_model} must be below the SAE's {d_model} latents" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()
