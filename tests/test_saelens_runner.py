"""Training through SAELens' own runner API: the runner, config and store are SAELens subclasses."""

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from hf_tiny import corpus_text, save_tiny_causal_lm
from safetensors.torch import load_file
from sae_lens import ActivationsStore, LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
from test_crash_resume import tiny_config, tiny_model, tiny_splits
from tiny import EOS, crash_runner_at

from mlsae_lens import (
    MLSAEError,
    MultiLayerActivationsStore,
    MultiLayerSAERunnerConfig,
    MultiLayerSAETrainingRunner,
    MultiLayerTrainingSAE,
    MultiLayerTrainingSAEConfig,
)
from mlsae_lens.checkpoint import checkpoints_in
from mlsae_lens.run_training import TrainingRun, token_dataset

# The settings of test_crash_resume.tiny_config, spelled the SAELens way (its cosine decay to zero
# after 5 warm-up steps is SAELens' "cosineannealing" with lr_end=0).
SETTINGS = dict(
    model_name="tiny", context_size=16, training_tokens=15 * 12, train_batch_size_tokens=15,
    n_batches_in_buffer=4, store_batch_size_prompts=2, lr=1e-3, seed=3, exclude_special_tokens=[EOS],
    prepend_bos=False, device="cpu", verbose=False, lr_scheduler_name="cosineannealing", lr_end=0.0,
    lr_warm_up_steps=5,
)


def sae_config() -> MultiLayerTrainingSAEConfig:
    return MultiLayerTrainingSAEConfig(d_in=16, d_sae=128, k=4, n_layers=2)


def saelens_config(tmp_path: Path, **overrides) -> MultiLayerSAERunnerConfig:
    values = dict(SETTINGS, sae=sae_config(), dead_tokens_threshold=30, checkpoint_every_tokens=60,
                  output_path=str(tmp_path / "out"), checkpoint_path=str(tmp_path / "checkpoints"))
    return MultiLayerSAERunnerConfig(**{**values, **overrides})


def dataset() -> Dataset:
    return token_dataset(tiny_splits().train)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / "sae_weights.safetensors"), load_file(b / "sae_weights.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_saelens_style_run_returns_the_multilayer_sae_and_saelens_files(tmp_path) -> None:
    runner = MultiLayerSAETrainingRunner(saelens_config(tmp_path), override_dataset=dataset(),
                                         override_model=tiny_model())
    assert isinstance(runner, LanguageModelSAETrainingRunner)
    assert isinstance(runner.activations_store, ActivationsStore)
    batch = runner.activations_store.next_batch()
    assert batch.shape == (15, 2, 16)  # [train_batch_size_tokens, n_layers, d_in]
    sae = runner.run()
    assert isinstance(sae, MultiLayerTrainingSAE)
    out = tmp_path / "out"
    assert {"cfg.json", "sae_weights.safetensors", "runner_cfg.json", "sparsity.safetensors",
            "training_log.json"} <= {p.name for p in out.iterdir()}
    assert sae.cfg.metadata.hook_names == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert sae.cfg.metadata.l0 == pytest.approx(4.0, abs=1.0)  # SAELens' final metadata, per vector
    # SAELens' meaning of checkpoint_path: a unique run id below it.
    assert Path(runner.cfg.checkpoint_path).parent == tmp_path / "checkpoints"
    assert [p.name for p in checkpoints_in(Path(runner.cfg.checkpoint_path))] == ["tokens_000000000060",
                                                                                 "tokens_000000000120"]


def test_a_crashed_saelens_style_run_resumed_from_its_checkpoint_ends_bitwise_equal(tmp_path) -> None:
    MultiLayerSAETrainingRunner(saelens_config(tmp_path / "a"), override_dataset=dataset(),
                                override_model=tiny_model()).run()
    crashed = MultiLayerSAETrainingRunner(saelens_config(tmp_path / "b"), override_dataset=dataset(),
                                          override_model=tiny_model())
    crash_runner_at(crashed, 7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.run()
    last = checkpoints_in(Path(crashed.cfg.checkpoint_path))[-1]
    resumed = MultiLayerSAETrainingRunner(saelens_config(tmp_path / "b", resume_from_checkpoint=str(last)),
                                          override_dataset=dataset(), override_model=tiny_model())
    resumed.run()
    assert resumed.trainer.n_training_steps == 12
    assert same_weights(tmp_path / "a" / "out", tmp_path / "b" / "out")


@pytest.mark.parametrize("config_class", ["MultiLayerSAERunnerConfig", "LanguageModelSAERunnerConfig"])
def test_the_cli_path_and_the_saelens_config_path_train_the_same_sae(tmp_path, config_class) -> None:
    TrainingRun(tiny_config(tmp_path / "cli", training_tokens=15 * 12), model=tiny_model(), splits=tiny_splits()).run()
    if config_class == "MultiLayerSAERunnerConfig":
        cfg = saelens_config(tmp_path)
    else:  # SAELens' own class: the multi-layer options take their defaults
        cfg = LanguageModelSAERunnerConfig(
            sae=sae_config(), **SETTINGS, dead_feature_window=2,  # 2 steps x 15 tokens = 30 tokens
            output_path=str(tmp_path / "out"), checkpoint_path=None, logger=LoggingConfig(log_to_wandb=False),
        )
    MultiLayerSAETrainingRunner(cfg, override_dataset=dataset(), override_model=tiny_model()).run()
    assert same_weights(tmp_path / "cli", tmp_path / "out")


def test_a_config_for_another_sae_or_model_size_is_refused(tmp_path) -> None:
    from sae_lens import TopKTrainingSAEConfig

    plain = LanguageModelSAERunnerConfig(sae=TopKTrainingSAEConfig(d_in=16, d_sae=64, k=4), **SETTINGS)
    with pytest.raises(TypeError, match="MultiLayerTrainingSAEConfig"):
        MultiLayerSAETrainingRunner(plain, override_dataset=dataset(), override_model=tiny_model())
    wrong = saelens_config(tmp_path, sae=MultiLayerTrainingSAEConfig(d_in=16, d_sae=64, k=4, n_layers=3))
    with pytest.raises(MLSAEError, match="n_layers=3, d_in=16 but the model tiny has n_layers=2"):
        MultiLayerSAETrainingRunner(wrong, override_dataset=dataset(), override_model=tiny_model())
    scaled = MultiLayerTrainingSAEConfig(d_in=16, d_sae=128, k=4, n_layers=2, normalize_activations="layer_norm")
    for field, value in (("prefetch_llm_batches", True), ("compile_llm", True), ("hook_head_index", 0),
                         ("model_kwargs", {"foo": 1}), ("sae", scaled)):
        name = "sae.normalize_activations" if field == "sae" else field
        with pytest.raises(MLSAEError, match=f"{name} is not supported by MultiLayerSAETrainingRunner"):
            MultiLayerSAETrainingRunner(saelens_config(tmp_path, **{field: value}),
                                        override_dataset=dataset(), override_model=tiny_model())
    for field in ("encoder_matmul_dtype", "auxk_matmul_dtype"):  # a typo is not silently float32
        with pytest.raises(MLSAEError, match=f"{field} must be one of .*'bfloat16'.*, got 'float16'"):
            saelens_config(tmp_path, **{field: "float16"})


def test_the_store_tokenizes_a_text_dataset_and_harvests_a_bridge_model(tmp_path) -> None:
    """SAELens tokenizes and packs ``text`` rows itself; every layer of a TransformerBridge comes
    from one forward; the run trains and resumes its position from a checkpoint."""
    from mlsae_lens.models import load_model

    model = load_model(str(save_tiny_causal_lm("llama", tmp_path / "llama")), device="cpu", backend="bridge")
    text = Dataset.from_dict({"text": corpus_text(4).splitlines()})
    cfg = saelens_config(tmp_path, sae=sae_config(), model_name="llama", is_dataset_tokenized=False,
                         exclude_special_tokens=[model.tokenizer.eos_token_id], training_tokens=16 * 8,
                         train_batch_size_tokens=16)
    with pytest.warns(UserWarning, match="Dataset is not tokenized"):
        store = MultiLayerActivationsStore.from_config(model, cfg, override_dataset=text)
    first = store.next_batch()
    assert first.shape == (16, 2, 16) and torch.isfinite(first).all()
    store.save_to_checkpoint(tmp_path)  # SAELens' store checkpoint: here the (chunk, batch) position
    second = store.next_batch()
    with pytest.warns(UserWarning, match="Dataset is not tokenized"):
        fresh = MultiLayerActivationsStore.from_config(model, cfg, override_dataset=text)
    fresh.load_from_checkpoint(tmp_path)  # the same batch again, bitwise
    assert torch.equal(fresh.next_batch(), second)
    with pytest.warns(UserWarning, match="Dataset is not tokenized"):
        runner = MultiLayerSAETrainingRunner(cfg, override_dataset=text, override_model=model)
    assert isinstance(runner.run(), MultiLayerTrainingSAE)


def test_a_dataset_shorter_than_one_context_is_named(tmp_path) -> None:
    from mlsae_lens.models import load_model

    model = load_model(str(save_tiny_causal_lm("llama", tmp_path / "llama")), device="cpu", backend="bridge")
    short = Dataset.from_dict({"text": ["Paris is the capital of France.", ""]})
    cfg = saelens_config(tmp_path, model_name="llama", is_dataset_tokenized=False, context_size=64)
    with pytest.warns(UserWarning, match="Dataset is not tokenized"):
        store = MultiLayerActivationsStore.from_config(model, cfg, override_dataset=short)
    with pytest.raises(MLSAEError, match="the dataset holds no context of 64 tokens"):
        store.next_batch()


def test_saelens_train_step_log_dict_reads_a_multilayer_step(tmp_path) -> None:
    """What SAELens logs to wandb every wandb_log_frequency steps works on [batch, n_layers, d_in]."""
    runner = MultiLayerSAETrainingRunner(saelens_config(tmp_path), override_dataset=dataset(),
                                         override_model=tiny_model())
    out = runner.trainer.step(runner.activations_store.next_batch())
    log = runner.trainer.build_train_step_log_dict(out, n_training_samples=runner.trainer.n_training_samples)
    assert log["metrics/l0"] == pytest.approx(runner.trainer.metrics["l0"], rel=0.05)
    assert 0 < log["metrics/explained_variance"] <= 1 and log["losses/overall_loss"] > 0


def test_the_run_directory_names_saelens_files_as_saelens_does() -> None:
    from sae_lens.constants import RUNNER_CFG_FILENAME, SPARSITY_FILENAME

    from mlsae_lens.run_dir import RUNNER_CFG_FILE, SPARSITY_FILE

    assert (RUNNER_CFG_FILE, SPARSITY_FILE) == (RUNNER_CFG_FILENAME, SPARSITY_FILENAME)


def test_from_pretrained_path_continues_a_saved_sae(tmp_path) -> None:
    """SAELens' ``from_pretrained_path``: training starts from the SAE saved there."""
    MultiLayerSAETrainingRunner(saelens_config(tmp_path / "a"), override_dataset=dataset(),
                                override_model=tiny_model()).run()
    saved = load_file(tmp_path / "a" / "out" / "sae_weights.safetensors")
    runner = MultiLayerSAETrainingRunner(saelens_config(tmp_path / "b", from_pretrained_path=str(tmp_path / "a" / "out")),
                                         override_dataset=dataset(), override_model=tiny_model())
    assert isinstance(runner.sae, MultiLayerTrainingSAE)
    start = runner.sae.state_dict()
    assert all(torch.equal(start[name].cpu(), saved[name]) for name in saved)
    assert runner.trainer.initialize is None  # b_dec and layer means are the saved ones


def test_autocast_lm_and_save_final_checkpoint_mean_what_they_mean_in_saelens(tmp_path) -> None:
    runner = MultiLayerSAETrainingRunner(saelens_config(tmp_path, autocast_lm=True, save_final_checkpoint=True,
                                                        training_tokens=15 * 2),
                                         override_dataset=dataset(), override_model=tiny_model())
    plain = MultiLayerSAETrainingRunner(saelens_config(tmp_path / "plain"), override_dataset=dataset(),
                                        override_model=tiny_model())
    bf16, fp32 = runner.activations_store.next_batch(), plain.activations_store.next_batch()
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # the forward ran in bfloat16
    torch.testing.assert_close(bf16, fp32, rtol=0.1, atol=0.1)
    runner.run()
    assert (Path(runner.cfg.checkpoint_path) / "final_30" / "trainer_state.safetensors").is_file()
