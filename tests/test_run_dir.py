"""Run directories never trap the user: every state (failed before a checkpoint, interrupted,
finished, live, damaged) gets a message naming a command that works, and that command works."""

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformer_lens import HookedTransformer

from mlsae_lens import MLSAEError
from mlsae_lens.checkpoint import LOCK_FILE, list_checkpoints
from mlsae_lens.config import MultiLayerRunnerConfig
from mlsae_lens.data import TokenSplits, tensor_sha256
from mlsae_lens.run_dir import resolve_output_dir
from mlsae_lens.run_training import TrainingRun
from tiny import EosTokenizer, crash_runner_at, tiny_token_splits, tiny_transformer


@pytest.fixture(scope="module")
def tiny_model() -> HookedTransformer:
    return tiny_transformer(tokenizer=EosTokenizer())


def hashed_splits(shift: int = 0) -> TokenSplits:
    """The tiny splits with the provenance hashes a real corpus records (``shift`` changes the text)."""
    splits = tiny_token_splits()
    train, test = (splits.train + shift) % 63 + 1 if shift else splits.train, splits.test
    train[:, 7] = 0
    return TokenSplits(train=train, test=test, provenance={
        "source": "corpus.txt", "train_sha256": tensor_sha256(train), "test_sha256": tensor_sha256(test)})


def config(out: Path | None, **overrides) -> MultiLayerRunnerConfig:
    base = dict(
        model_name="tiny", output_dir=None if out is None else str(out), context_size=16,
        expansion_factor=4, k=4, training_tokens=15 * 8, batch_size_tokens=15, contexts_per_chunk=4,
        model_batch_size=2, lr=1e-3, checkpoint_every_tokens=60, log_every_steps=1, seed=3,
    )
    base.update(overrides)
    return MultiLayerRunnerConfig(**base)


def run(cfg, model, splits=None, crash_at_step: int | None = None) -> TrainingRun:
    runner = TrainingRun(cfg, model=model, splits=splits or hashed_splits())
    if crash_at_step is not None:
        crash_runner_at(runner, crash_at_step)
        with pytest.raises(RuntimeError, match="simulated crash"):
            runner.run()
        return runner
    runner.run()
    return runner


def test_a_run_that_failed_before_its_first_checkpoint_restarts_with_new_settings(tmp_path, tiny_model, caplog) -> None:
    run(config(tmp_path), tiny_model, crash_at_step=1)
    assert (tmp_path / "run.json").is_file() and not list_checkpoints(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mlsae_lens"):
        run(config(tmp_path, k=3, resume=True), tiny_model)  # other settings, and --resume too
    assert "stopped before its first checkpoint" in caplog.text
    assert json.loads((tmp_path / "run.json").read_text())["k"] == 3
    assert (tmp_path / "sae_weights.safetensors").is_file()


def test_an_interrupted_run_names_resume_and_its_settings(tmp_path, tiny_model) -> None:
    run(config(tmp_path), tiny_model, crash_at_step=5)
    with pytest.raises(MLSAEError, match=f"unfinished run .*`mlsae-lens train --output-dir {tmp_path} --resume`"):
        TrainingRun(config(tmp_path), model=tiny_model, splits=hashed_splits())
    with pytest.raises(MLSAEError, match=r"settings differ: k\); resume it with its settings \(--k 4\)"):
        TrainingRun(config(tmp_path, k=3, resume=True), model=tiny_model, splits=hashed_splits())
    run(config(tmp_path, resume=True), tiny_model)  # the advised command works
    assert (tmp_path / "sae_weights.safetensors").is_file()


def test_a_finished_run_is_not_retrained_by_resume_and_overwrite_replaces_only_its_files(tmp_path, tiny_model) -> None:
    run(config(tmp_path), tiny_model)
    (tmp_path / "notes.txt").write_text("mine")
    before = (tmp_path / "sae_weights.safetensors").read_bytes()
    with pytest.raises(MLSAEError, match="finished run .*nothing to resume. To train longer, start a new run "
                                         "with a larger --training-tokens"):
        TrainingRun(config(tmp_path, resume=True, training_tokens=240), model=tiny_model,
                                    splits=hashed_splits())
    assert (tmp_path / "sae_weights.safetensors").read_bytes() == before
    with pytest.raises(MLSAEError, match="pass one"):
        TrainingRun(config(tmp_path, resume=True, overwrite=True), model=tiny_model)
    overwriting = TrainingRun(config(tmp_path, k=3, overwrite=True, checkpoint_every_tokens=1000),
                                              model=tiny_model, splits=hashed_splits())
    original = overwriting.trainer.step

    def step(batch):  # while it trains, the overwriting run still holds the directory's lock
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        return original(batch)

    overwriting.trainer.step = step  # type: ignore[method-assign]
    overwriting.run()
    assert not (tmp_path / LOCK_FILE).exists()
    assert json.loads((tmp_path / "run.json").read_text())["k"] == 3
    assert not (tmp_path / "checkpoints").exists()  # the old run's checkpoints went with it
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_overwrite_never_touches_a_directory_that_holds_no_run(tmp_path, tiny_model) -> None:
    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(MLSAEError, match="holds no mlsae-lens run .*--overwrite only replaces an mlsae-lens run"):
        TrainingRun(config(tmp_path, overwrite=True), model=tiny_model)
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]


def test_a_live_run_in_the_directory_is_named_without_resume(tmp_path, tiny_model) -> None:
    run(config(tmp_path), tiny_model, crash_at_step=5)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        with pytest.raises(MLSAEError, match=f"another mlsae-lens run \\(pid {holder.pid}.*is writing into"):
            TrainingRun(config(tmp_path), model=tiny_model)
    finally:
        holder.kill()
        holder.wait()


def test_an_output_dir_that_is_a_file_is_called_a_file(tmp_path, tiny_model) -> None:
    blocker = tmp_path / "run"
    blocker.write_text("x")
    with pytest.raises(MLSAEError, match="--output-dir .*run is a file, not a directory; choose another"):
        TrainingRun(config(blocker), model=tiny_model)
    with pytest.raises(MLSAEError, match="sub cannot be created: .*run is a file; choose another --output-dir"):
        TrainingRun(config(blocker / "sub"), model=tiny_model)


def test_a_run_json_that_is_not_json_is_one_line_with_the_way_out(tmp_path, tiny_model) -> None:
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(MLSAEError, match="run.json is not valid JSON .*--overwrite") as info:
        TrainingRun(config(tmp_path), model=tiny_model)
    assert "\n" not in str(info.value)
    run(config(tmp_path, overwrite=True), tiny_model)  # the advised command works
    assert json.loads((tmp_path / "run.json").read_text())["k"] == 4


def test_the_default_output_dir_is_fresh_for_every_run(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    first = resolve_output_dir(config(None)).output_dir
    assert first is not None and first.startswith("runs/mlsae-")
    Path(first).mkdir(parents=True)
    second = resolve_output_dir(config(None)).output_dir
    assert second != first and second.startswith(first)
    with pytest.raises(MLSAEError, match="--resume needs the run to continue: pass its --output-dir"):
        resolve_output_dir(config(None, resume=True))


def test_resume_after_the_corpus_changed_names_both_hashes(tmp_path, tiny_model) -> None:
    run(config(tmp_path), tiny_model, crash_at_step=5)
    before, after = hashed_splits(), hashed_splits(shift=5)
    old, new = before.provenance["train_sha256"], after.provenance["train_sha256"]
    with pytest.raises(MLSAEError, match=f"corpus 'corpus.txt' changed .*was {old}, now {new}"):
        run(config(tmp_path, resume=True), tiny_model, splits=after)
    assert len(list_checkpoints(tmp_path)) == 1  # nothing trained on the new text


def test_training_past_the_corpus_says_how_many_passes_before_it_starts(tmp_path, tiny_model, caplog) -> None:
    runner = TrainingRun(config(tmp_path, training_tokens=2000, checkpoint_every_tokens=10**6),
                                         model=tiny_model, splits=hashed_splits())
    runner.trainer.step = lambda batch: (_ for _ in ()).throw(RuntimeError("stop before the first step"))  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="mlsae_lens"), pytest.raises(RuntimeError, match="first step"):
        runner.run()
    # 32 train contexts x 15 non-special tokens = 480 tokens: 2000 / 480 = 4.2 passes
    assert "--training-tokens 2000 makes 4.2 passes over the 480 training tokens" in caplog.text


def test_one_pass_or_less_says_nothing(tmp_path, tiny_model, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="mlsae_lens"):
        run(dataclasses.replace(config(tmp_path), training_tokens=60), tiny_model)
    assert "passes over" not in caplog.text


def test_train_takes_overwrite_and_defaults_to_a_fresh_output_dir() -> None:
    from mlsae_lens.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["train", "--overwrite"]))
    assert cfg.overwrite and cfg.output_dir is None  # resolved to runs/mlsae-<time> by the runner


def test_eval_or_analyze_on_a_changed_corpus_is_refused_naming_both_hashes(tmp_path, tiny_model, monkeypatch) -> None:
    from mlsae_lens.run_files import load_run

    run(config(tmp_path), tiny_model)
    old = hashed_splits().provenance["train_sha256"]
    new = hashed_splits(shift=5).provenance["train_sha256"]
    # The corpus is rebuilt from disk at load; the tiny model has no real tokenizer, so hand the
    # edited corpus' splits over directly.
    monkeypatch.setattr(MultiLayerRunnerConfig, "load_token_splits", lambda self, tok: hashed_splits(shift=5))
    with pytest.raises(MLSAEError, match=f"was {old}, now {new}\\), so the test split is not the one .* held out"):
        load_run(tmp_path, model=tiny_model)
    monkeypatch.setattr(MultiLayerRunnerConfig, "load_token_splits", lambda self, tok: hashed_splits())
    assert load_run(tmp_path, model=tiny_model).splits.provenance["train_sha256"] == old
