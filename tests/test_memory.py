"""Model batch sizes chosen from free memory, and update_sparse's bounded temporaries."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import mlsae_lens.analysis.layer_stats as layer_stats
from mlsae_lens import MLSAEError
from mlsae_lens.analysis import LayerDistributionStats
from mlsae_lens.cli import build_parser, config_from_args
from mlsae_lens.config import MultiLayerRunnerConfig
from mlsae_lens.memory import (
    MAX_BATCH_CPU,
    MAX_BATCH_CUDA,
    auto_model_batch_size,
    available_memory_bytes,
    forward_bytes_per_context,
    resolve_model_batch_size,
)
from mlsae_lens.run_training import TrainingRun
from tiny import EosTokenizer, tiny_token_splits, tiny_transformer

MiB = 2**20


def model_cfg(n_layers: int = 30, d_model: int = 576, **overrides) -> SimpleNamespace:
    """The sizes of SmolLM2-135M (the embedded model) unless overridden."""
    sizes = dict(n_layers=n_layers, d_model=d_model, n_heads=9, d_head=64, d_mlp=1536, d_vocab=49152)
    return SimpleNamespace(**{**sizes, **overrides})


def test_estimate_grows_with_context_size_layers_logits_and_extra_bytes() -> None:
    by_ctx = [forward_bytes_per_context(model_cfg(), ctx) for ctx in (16, 64, 128, 512)]
    by_layers = [forward_bytes_per_context(model_cfg(n_layers=n), 128) for n in (1, 6, 30)]
    assert by_ctx == sorted(by_ctx) and len(set(by_ctx)) == 4
    assert by_layers == sorted(by_layers) and len(set(by_layers)) == 3
    assert forward_bytes_per_context(model_cfg(), 128, logits=True) > by_ctx[2]
    assert forward_bytes_per_context(model_cfg(), 128, extra_bytes_per_token=10) == by_ctx[2] + 1280


def test_estimate_counts_the_cache_of_every_layer_and_one_block_by_hand() -> None:
    cfg = model_cfg(n_layers=2, d_model=8, n_heads=2, d_head=4, d_mlp=16, d_vocab=10)
    ctx = 5
    cache = 2 * 2 * 8  # cached resid_post of 2 layers + their stacked copy
    block = 6 * 8 + 4 * 2 * 4 + 2 * 2 * ctx + 3 * 16
    assert forward_bytes_per_context(cfg, ctx) == 4 * ctx * (cache + block)
    assert forward_bytes_per_context(cfg, ctx, logits=True) == 4 * ctx * (cache + block + 2 * 10)


def test_small_free_memory_gives_a_small_batch_and_the_clamp_holds() -> None:
    per_context = forward_bytes_per_context(model_cfg(), 128)
    assert auto_model_batch_size(model_cfg(), 128, "cpu", free_bytes=0) == 1
    assert auto_model_batch_size(model_cfg(), 128, "cpu", free_bytes=10 * per_context, fraction=0.5) == 5
    assert auto_model_batch_size(model_cfg(), 128, "cpu", free_bytes=4 * per_context) == 1  # a quarter
    assert auto_model_batch_size(model_cfg(), 128, "cpu", free_bytes=2**50) == MAX_BATCH_CPU
    assert auto_model_batch_size(model_cfg(), 128, "cuda", free_bytes=2**50) == MAX_BATCH_CUDA
    with pytest.raises(MLSAEError, match="fraction"):
        auto_model_batch_size(model_cfg(), 128, "cpu", fraction=0)


def test_auto_reads_the_free_memory_of_this_machine() -> None:
    free = available_memory_bytes("cpu")
    assert 0 < free
    with open("/proc/meminfo") as f:  # psutil and /proc/meminfo agree to within what churns
        meminfo = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert abs(free - meminfo) < 0.2 * meminfo
    per_context = forward_bytes_per_context(model_cfg(), 128)
    expected = max(1, min(MAX_BATCH_CPU, free // 4 // per_context))
    assert abs(auto_model_batch_size(model_cfg(), 128, "cpu") - expected) <= 1


def test_an_explicit_batch_size_wins_and_auto_is_logged(caplog) -> None:
    assert resolve_model_batch_size(3, model_cfg(), 128, "cpu", free_bytes=0) == 3
    with pytest.raises(MLSAEError, match="--batch-size must be positive"):
        resolve_model_batch_size(0, model_cfg(), 128, "cpu", what="--batch-size")
    with caplog.at_level(logging.INFO, logger="mlsae_lens.memory"):
        assert resolve_model_batch_size(None, model_cfg(), 128, "cpu", free_bytes=0) == 1
    assert "--model-batch-size auto = 1" in caplog.text


def test_cli_defaults_to_auto_and_the_flag_overrides_it() -> None:
    parser = build_parser()
    assert config_from_args(parser.parse_args(["train"])).model_batch_size is None
    assert config_from_args(parser.parse_args(["train", "--model-batch-size", "5"])).model_batch_size == 5
    assert parser.parse_args(["analyze", "run"]).batch_size is None
    assert parser.parse_args(["eval", "run", "--batch-size", "4"]).batch_size == 4
    assert parser.parse_args(["train-lens"]).model_batch_size is None
    with pytest.raises(MLSAEError, match="--model-batch-size must be positive"):
        MultiLayerRunnerConfig(model_batch_size=0)


# ---------------------------------------------------------------------- the training runner


def tiny_config(out: Path, **overrides) -> MultiLayerRunnerConfig:
    base = dict(
        model_name="tiny", output_dir=str(out), context_size=16, expansion_factor=4, k=4,
        training_tokens=15 * 6, batch_size_tokens=15, contexts_per_chunk=4, model_batch_size=None,
        lr=1e-3, checkpoint_every_tokens=45, log_every_steps=1, seed=3,
    )
    return MultiLayerRunnerConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def tiny_model():
    model = tiny_transformer()
    model.tokenizer = EosTokenizer()
    return model


def test_a_run_with_auto_batch_equals_one_given_that_value_and_records_it(tmp_path, tiny_model) -> None:
    splits = tiny_token_splits()
    auto = TrainingRun(tiny_config(tmp_path / "auto"), model=tiny_model, splits=splits)
    chosen = auto.cfg.model_batch_size
    assert chosen == auto_model_batch_size(tiny_model.cfg, 16, auto.device)  # tiny: the cap
    auto.run()
    assert json.loads((tmp_path / "auto" / "run.json").read_text())["model_batch_size"] == chosen
    given = tiny_config(tmp_path / "given", model_batch_size=chosen)
    TrainingRun(given, model=tiny_model, splits=splits).run()
    a = load_file(tmp_path / "auto" / "sae_weights.safetensors")
    b = load_file(tmp_path / "given" / "sae_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_resume_with_auto_reuses_the_recorded_batch_and_refuses_another(tmp_path, tiny_model) -> None:
    splits = tiny_token_splits()
    out = tmp_path / "run"
    TrainingRun(tiny_config(out, model_batch_size=2), model=tiny_model, splits=splits).run()
    for name in ("cfg.json", "sae_weights.safetensors"):  # as if interrupted after the last checkpoint
        (out / name).unlink()
    longer = dict(resume=True, training_tokens=15 * 9)
    resumed = TrainingRun(tiny_config(out, **longer), model=tiny_model, splits=splits)
    assert resumed.cfg.model_batch_size == 2  # not the memory-based choice (the cap here)
    resumed.run()
    assert json.loads((out / "run.json").read_text())["model_batch_size"] == 2
    for name in ("cfg.json", "sae_weights.safetensors"):
        (out / name).unlink()
    with pytest.raises(MLSAEError, match="model_batch_size"):
        TrainingRun(tiny_config(out, model_batch_size=3, **longer), model=tiny_model, splits=splits)


# ---------------------------------------------------------------------- update_sparse pieces


@pytest.mark.parametrize("weighting", ["uniform_tokens", "activation_mass"])
def test_update_sparse_in_small_pieces_is_bitwise_one_piece(monkeypatch, weighting) -> None:
    gen = torch.Generator().manual_seed(0)
    n_tokens, n_layers, n_latents, k = 37, 3, 20, 4
    indices = torch.rand(n_tokens, n_layers, n_latents, generator=gen).argsort(-1)[..., :k]
    values = torch.rand(n_tokens, n_layers, k, generator=gen) * (torch.rand(n_tokens, n_layers, k, generator=gen) > 0.3)
    mask = torch.rand(n_tokens, generator=gen) > 0.2
    results = []
    for entries in (2**40, 1, n_layers * k * 5):  # one piece, one token per piece, five tokens
        monkeypatch.setattr(layer_stats, "SPARSE_CHUNK_ENTRIES", entries)
        stats = LayerDistributionStats(n_layers, n_latents, weighting=weighting)
        stats.update_sparse(indices, values, mask)
        results.append(stats.state_dict())
    for other in results[1:]:
        for key, value in results[0].items():
            assert torch.equal(value, other[key]) if isinstance(value, torch.Tensor) else value == other[key]
