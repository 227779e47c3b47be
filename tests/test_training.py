"""The training runner on a tiny random TransformerLens model: resume, dead latents, errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformer_lens import HookedTransformer

from mlsae_lens import MLSAEError
from mlsae_lens.config import MultiLayerRunnerConfig
from mlsae_lens.data import TokenSplits
from mlsae_lens.run_training import TrainingRun
from tiny import EosTokenizer, crash_runner_at, tiny_token_splits, tiny_transformer

EOS = 0


@pytest.fixture(scope="module")
def tiny_model() -> HookedTransformer:
    return tiny_transformer()

@pytest.fixture(scope="module")
def tiny_splits() -> TokenSplits:
    return tiny_token_splits()

def tiny_config(out: Path, **overrides) -> MultiLayerRunnerConfig:
    base = dict(
        model_name="tiny", output_dir=str(out), context_size=16, expansion_factor=4, k=4,
        training_tokens=15 * 12, batch_size_tokens=15, contexts_per_chunk=4, model_batch_size=2,
        lr=1e-3, dead_tokens_threshold=30, checkpoint_every_tokens=60, log_every_steps=1, seed=3,
    )
    base.update(overrides)
    return MultiLayerRunnerConfig(**base)


@pytest.fixture(autouse=True)
def with_tokenizer(tiny_model: HookedTransformer):
    tiny_model.tokenizer = EosTokenizer()
    yield


def train(cfg, model, splits, crash_at_step: int | None = None) -> TrainingRun:
    runner = TrainingRun(cfg, model=model, splits=splits)
    if crash_at_step is not None:
        crash_runner_at(runner, crash_at_step)
    runner.run()
    return runner


def test_training_reduces_the_loss(tmp_path, tiny_model, tiny_splits) -> None:
    runner = train(tiny_config(tmp_path, training_tokens=15 * 40), tiny_model, tiny_splits)
    log = runner.trainer.log
    assert log[-1]["fvu"] < log[0]["fvu"]
    assert (tmp_path / "cfg.json").exists() and (tmp_path / "training_log.json").exists()


def test_special_tokens_are_excluded_from_training_batches(tmp_path, tiny_model, tiny_splits) -> None:
    runner = TrainingRun(tiny_config(tmp_path), model=tiny_model, splits=tiny_splits)
    n_valid = int((tiny_splits.train[runner.activations_store.context_order[:4]] != EOS).sum())
    assert runner.activations_store.harvest_chunk(0).shape == (n_valid, 3, 16)


def test_resume_after_a_crash_equals_an_uninterrupted_run_bitwise(tmp_path, tiny_model, tiny_splits) -> None:
    full = train(tiny_config(tmp_path / "a"), tiny_model, tiny_splits)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_config(tmp_path / "b"), tiny_model, tiny_splits, crash_at_step=6)
    assert not (tmp_path / "b" / "cfg.json").exists()  # nothing final was half-written
    resumed = train(tiny_config(tmp_path / "b", resume=True), tiny_model, tiny_splits)
    assert resumed.trainer.n_training_steps == full.trainer.n_training_steps
    a = load_file(tmp_path / "a" / "sae_weights.safetensors")
    b = load_file(tmp_path / "b" / "sae_weights.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert torch.equal(full.trainer.tokens_since_fired, resumed.trainer.tokens_since_fired)


def test_dead_latent_counters_count_tokens_and_reset_on_firing(tmp_path, tiny_model, tiny_splits) -> None:
    runner = TrainingRun(tiny_config(tmp_path), model=tiny_model, splits=tiny_splits)
    batch = runner.activations_store.harvest_chunk(0)[:15]
    runner.runner.initialize(runner.sae, batch)
    runner.trainer.tokens_since_fired.fill_(100)
    code = runner.sae.encode_topk(batch)  # the code the step will see
    fired = torch.zeros(runner.sae.cfg.d_sae, dtype=torch.bool)
    fired[code.indices[code.values > 0]] = True
    runner.trainer.step(batch)
    assert (runner.trainer.tokens_since_fired[fired] == 0).all()
    assert (runner.trainer.tokens_since_fired[~fired] == 115).all()


def test_dead_mask_feeds_auxk_once_threshold_reached(tmp_path, tiny_model, tiny_splits) -> None:
    runner = train(tiny_config(tmp_path, expansion_factor=16, training_tokens=15 * 8), tiny_model, tiny_splits)
    assert any(row["dead_fraction"] > 0 and row["auxk"] > 0 for row in runner.trainer.log)


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, tiny_model, tiny_splits) -> None:
    runner = TrainingRun(tiny_config(tmp_path), model=tiny_model, splits=tiny_splits)
    original = runner.trainer.step

    def poisoned(batch):
        if runner.trainer.n_training_steps == 5:
            with torch.no_grad():
                runner.sae.W_enc.fill_(float("nan"))
        return original(batch)

    runner.trainer.step = poisoned  # type: ignore[method-assign]
    with pytest.raises(MLSAEError, match=r"NaN/inf at step 5; the last good checkpoint is .*tokens_000000000060") as info:
        runner.run()
    assert f"`mlsae-lens train --output-dir {tmp_path} --overwrite --lr 0.0001`" in str(info.value)
    assert not (tmp_path / "cfg.json").exists()
    assert (tmp_path / "checkpoints" / "tokens_000000000060" / "trainer_state.safetensors").exists()
    train(tiny_config(tmp_path, overwrite=True, lr=1e-4), tiny_model, tiny_splits)  # the advised command
    assert (tmp_path / "cfg.json").exists()


def test_nan_activations_are_refused(tmp_path, tiny_model, tiny_splits) -> None:
    runner = TrainingRun(tiny_config(tmp_path), model=tiny_model, splits=tiny_splits)
    tiny_model.blocks[1].hook_resid_post.add_hook(lambda x, hook: x * float("nan"))
    try:
        with pytest.raises(MLSAEError, match="non-finite"):
            runner.run()
    finally:
        tiny_model.reset_hooks()


def test_an_output_dir_holding_another_run_is_refused(tmp_path, tiny_model, tiny_splits) -> None:
    train(tiny_config(tmp_path, training_tokens=30), tiny_model, tiny_splits)
    before = (tmp_path / "sae_weights.safetensors").read_bytes()
    with pytest.raises(MLSAEError, match="already holds a finished run; .* --overwrite"):
        TrainingRun(tiny_config(tmp_path, k=3), model=tiny_model, splits=tiny_splits)
    with pytest.raises(MLSAEError, match="holds a finished run .*nothing to resume"):
        TrainingRun(tiny_config(tmp_path, k=3, resume=True), model=tiny_model, splits=tiny_splits)
    assert (tmp_path / "sae_weights.safetensors").read_bytes() == before
    assert json.loads((tmp_path / "run.json").read_text())["k"] == 4


def test_an_unwritable_output_dir_is_named(tmp_path, tiny_model, tiny_splits) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MLSAEError, match="cannot be created: .*file is a file"):
        TrainingRun(tiny_config(blocker / "run"), model=tiny_model, splits=tiny_splits)
    if Path("/sys").is_dir():  # sysfs refuses new entries even to root (EPERM)
        with pytest.raises(MLSAEError, match="output directory /sys/mlsae-lens-run is not writable"):
            TrainingRun(tiny_config(Path("/sys/mlsae-lens-run")), model=tiny_model, splits=tiny_splits)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("k", 0, "--k must be positive"), ("expansion_factor", 0, "expansion-factor"),
     ("test_fraction", 1.5, "test-fraction"), ("normalization", "zscore", "normalization"),
     ("encoder_matmul_dtype", "float16", "--encoder-matmul-dtype must be auto, float32 or bfloat16"),
     ("auxk_matmul_dtype", "bf16", "--auxk-matmul-dtype must be auto, float32 or bfloat16")],
)
def test_bad_settings_are_refused_with_the_flag_name(tmp_path, field, value, match) -> None:
    with pytest.raises(MLSAEError, match=match):
        tiny_config(tmp_path, **{field: value})


def test_k_not_below_d_sae_is_refused(tmp_path, tiny_model, tiny_splits) -> None:
    with pytest.raises(MLSAEError, match="0 < k < d_sae"):
        TrainingRun(tiny_config(tmp_path, k=64, expansion_factor=4), model=tiny_model, splits=tiny_splits)
