"""Hostile and bad input: pickles where weights belong, disk full, interrupted writes,
concurrent runs. Each gives one clear message and loses nothing written before
(the full table, with the tests in other files, is docs/bad_inputs.md)."""

import errno
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlsae_lens import MLSAEError, MultiLayerSAE, MultiLayerSAEConfig
from mlsae_lens import atomic
from mlsae_lens import checkpoint as ckpt
from mlsae_lens.checkpoint import (
    CHECKPOINT_DIR,
    LOCK_FILE,
    acquire_run_lock,
    atomic_save_file,
    atomic_save_sae,
    atomic_write_json,
    list_checkpoints,
    read_checkpoint,
    release_run_lock,
    write_checkpoint,
)
from mlsae_lens.cli import main
from mlsae_lens.reference_checkpoint import read_reference_dir
from mlsae_lens.run_files import load_sae

PICKLE_MESSAGE = "is a pickle/torch.save file; mlsae-lens never unpickles"


def tiny_sae() -> MultiLayerSAE:
    return MultiLayerSAE(MultiLayerSAEConfig(d_in=8, d_sae=16, k=2, n_layers=2))


def disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---- pickles where safetensors belong ----------------------------------------------------


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pickle_posing_as_sae_weights_is_refused_by_name(tmp_path, writer) -> None:
    atomic_save_sae(tiny_sae(), tmp_path)
    weights = tmp_path / "sae_weights.safetensors"
    if writer == "torch.save":
        torch.save({"W_enc": torch.zeros(2)}, weights)  # zip archive: PK\x03\x04
    else:
        weights.write_bytes(pickle.dumps({"W_enc": [0.0]}, protocol=2))  # starts with 0x80
    with pytest.raises(MLSAEError, match=f"sae_weights.safetensors {PICKLE_MESSAGE}.*convert it to safetensors"):
        load_sae(tmp_path)


def test_a_pt_file_instead_of_safetensors_weights_is_named(tmp_path) -> None:
    atomic_save_sae(tiny_sae(), tmp_path)
    (tmp_path / "sae_weights.safetensors").unlink()
    torch.save(tiny_sae().state_dict(), tmp_path / "sae_weights.pt")
    with pytest.raises(MLSAEError, match=f"sae_weights.pt {PICKLE_MESSAGE}"):
        load_sae(tmp_path)


def test_reference_checkpoints_with_pickled_weights_are_refused(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"n_inputs": 8, "n_latents": 16, "k": 2}))
    torch.save({"encoder.weight": torch.zeros(16, 8)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(MLSAEError, match=f"pytorch_model.bin {PICKLE_MESSAGE}"):
        read_reference_dir(tmp_path)
    torch.save({"encoder.weight": torch.zeros(16, 8)}, tmp_path / "model.safetensors")
    with pytest.raises(MLSAEError, match=f"model.safetensors {PICKLE_MESSAGE}"):
        read_reference_dir(tmp_path)


def test_a_pickled_checkpoint_state_is_refused(tmp_path) -> None:
    path = write_checkpoint(tmp_path / CHECKPOINT_DIR, "tokens_000000000010", tiny_sae(), {"x": torch.zeros(1)}, {"step": 1})
    torch.save({"x": torch.zeros(1)}, path / ckpt.STATE_TENSORS)
    with pytest.raises(MLSAEError, match=PICKLE_MESSAGE):
        read_checkpoint(path)


def test_the_cli_refuses_a_pickle_with_one_line_and_exit_code_2(tmp_path, capsys) -> None:
    atomic_save_sae(tiny_sae(), tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"model_name": "tiny"}))
    torch.save({}, tmp_path / "sae_weights.safetensors")
    assert main(["analyze", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and PICKLE_MESSAGE in err
    assert not (tmp_path / "stats.safetensors").exists()


# ---- disk full and interrupted writes ------------------------------------------------------


def test_disk_full_while_saving_the_sae_keeps_the_previous_one(tmp_path, monkeypatch) -> None:
    atomic_save_sae(tiny_sae(), tmp_path)
    before = files(tmp_path)
    sae = tiny_sae()

    def half_then_full(directory, *args, **kwargs):
        (Path(directory) / "sae_weights.safetensors").write_bytes(b"\x00" * 10)  # a partial file
        disk_full()

    monkeypatch.setattr(sae, "save_model", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_save_sae(sae, tmp_path, inference=False)
    assert files(tmp_path) == before  # no temp dir left, the old SAE whole
    load_sae(tmp_path)


def test_disk_full_while_writing_json_or_tensors_keeps_the_previous_file(tmp_path, monkeypatch) -> None:
    atomic_write_json(tmp_path / "run.json", {"k": 4})
    atomic_save_file({"a": torch.ones(3)}, tmp_path / "stats.safetensors")
    before = files(tmp_path)
    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_json(tmp_path / "run.json", {"k": 5})
    monkeypatch.setattr(atomic, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_save_file({"a": torch.zeros(3)}, tmp_path / "stats.safetensors")
    assert files(tmp_path) == before


def test_disk_full_while_writing_a_checkpoint_keeps_the_earlier_ones(tmp_path, monkeypatch) -> None:
    write_checkpoint(tmp_path / CHECKPOINT_DIR, "tokens_000000000010", tiny_sae(), {"x": torch.zeros(1)}, {"step": 1})
    before = files(tmp_path)
    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_checkpoint(tmp_path / CHECKPOINT_DIR, "tokens_000000000020", tiny_sae(), {"x": torch.ones(1)}, {"step": 2})
    assert files(tmp_path) == before
    assert [p.name for p in list_checkpoints(tmp_path)] == ["tokens_000000000010"]


def test_a_half_written_checkpoint_is_ignored_and_a_damaged_one_named(tmp_path) -> None:
    good = write_checkpoint(tmp_path / CHECKPOINT_DIR, "tokens_000000000010", tiny_sae(), {"x": torch.zeros(1)}, {"step": 1})
    (tmp_path / "checkpoints" / ".tmp-killed").mkdir()  # what a kill mid-write leaves
    assert list_checkpoints(tmp_path) == [good]
    state = good / ckpt.STATE_TENSORS
    state.write_bytes(state.read_bytes()[:20])
    with pytest.raises(MLSAEError, match=f"checkpoint {good} is damaged or incomplete.*delete it"):
        read_checkpoint(good)


# ---- one run per output directory ----------------------------------------------------------


def test_a_lock_held_by_a_live_process_refuses_a_second_run(tmp_path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        with pytest.raises(MLSAEError, match=f"another mlsae-lens run \\(pid {holder.pid}.*choose another --output-dir"):
            acquire_run_lock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert acquire_run_lock(tmp_path) == tmp_path / LOCK_FILE  # now stale: taken over
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    release_run_lock(tmp_path)
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_half_written_lock_is_stale_and_only_the_holder_releases_it(tmp_path) -> None:
    (tmp_path / LOCK_FILE).write_text('{"pid": ')
    acquire_run_lock(tmp_path)
    with pytest.raises(MLSAEError, match="another mlsae-lens run"):
        acquire_run_lock(tmp_path)  # the same live process may not write twice either
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    release_run_lock(tmp_path)
    assert (tmp_path / LOCK_FILE).exists()  # not ours: left alone


def test_a_second_concurrent_training_run_gets_a_clear_message_and_writes_nothing(tmp_path) -> None:
    from test_crash_resume import tiny_config, tiny_model, tiny_splits

    from mlsae_lens.run_training import TrainingRun

    runner = TrainingRun(tiny_config(tmp_path), model=tiny_model(), splits=tiny_splits())
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))
    with pytest.raises(MLSAEError, match="another mlsae-lens run .* is writing into"):
        runner.run()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]


def test_cache_command_refuses_bad_settings_before_writing(tmp_path, capsys) -> None:
    assert main(["cache", "--output", str(tmp_path / "c"), "--contexts-per-shard", "0"]) == 2
    assert capsys.readouterr().err.strip() == ("mlsae-lens cache: error: argument --contexts-per-shard: must be "
                                               "positive, got 0 (see mlsae-lens cache --help)")
    assert not (tmp_path / "c").exists()


def test_a_safetensors_file_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path) -> None:
    """Regression: the header length 384 = 0x180 makes the first byte 0x80, the pickle opcode."""
    from safetensors.torch import load_file, save_file

    from mlsae_lens.checkpoint import check_not_pickle

    path = tmp_path / "w.safetensors"
    for name_len in range(1, 400):  # vary the header until its length's low byte is 0x80
        save_file({"x" * name_len: torch.zeros(1)}, path)
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    check_not_pickle(path)  # must not raise
    assert load_file(path)["x" * name_len].shape == (1,)


# ---- SAE weights that disagree with cfg.json, or are not finite floats (issue 15) ------------


def saved_sae(directory: Path) -> Path:
    atomic_save_sae(tiny_sae(), directory)
    return directory / "sae_weights.safetensors"


def test_a_wrong_tensor_shape_names_the_tensor_both_shapes_and_the_files(tmp_path) -> None:
    weights = saved_sae(tmp_path)
    state = load_file(weights)
    state["W_enc"] = torch.zeros(8, 32)
    save_file(state, weights)
    with pytest.raises(MLSAEError, match=r"tensor W_enc in .* has shape \[8, 32\], but cfg.json \(d_in=8, d_sae=16, "
                                         r"n_layers=2\) expects \[8, 16\]: the weights and the config disagree"):
        load_sae(tmp_path)


def test_a_missing_b_dec_is_named(tmp_path) -> None:
    weights = saved_sae(tmp_path)
    state = load_file(weights)
    del state["b_dec"]
    save_file(state, weights)
    with pytest.raises(MLSAEError, match=r"lacks the tensor b_dec \(expected shape \[8\] from cfg.json"):
        load_sae(tmp_path)


@pytest.mark.parametrize(("key", "value", "found"), [("n_layers", 3, "[2, 8]"), ("d_in", 4, "[8]")])
def test_a_cfg_json_that_disagrees_with_the_weights_is_named(tmp_path, key, value, found) -> None:
    saved_sae(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg[key] = value
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(MLSAEError, match=rf"has shape {re.escape(found)}, but cfg.json \(.*{key}={value}.*\) expects"
                                         r".*disagree \(the weights are of an SAE with d_in=8, d_sae=16, n_layers=2\)"):
        load_sae(tmp_path)


@pytest.mark.parametrize("poison", ["int", "nan", "inf"])
def test_integer_or_non_finite_weights_are_refused_at_load_naming_the_tensor(tmp_path, poison) -> None:
    weights = saved_sae(tmp_path)
    state = load_file(weights)
    if poison == "int":
        state["W_dec"] = state["W_dec"].round().to(torch.int64)
        match = "tensor W_dec in .* has dtype I64; SAE weights are floating point"
    else:
        state["W_dec"][3, 1] = float(poison)
        match = "tensor W_dec in .* holds 1 NaN/inf values"
    save_file(state, weights)
    with pytest.raises(MLSAEError, match=match):
        load_sae(tmp_path)


def test_the_cli_refuses_nan_weights_with_one_line_and_no_logging_traceback(tmp_path, capsys) -> None:
    weights = saved_sae(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"model_name": "tiny", "output_dir": str(tmp_path)}))
    state = load_file(weights)
    state["b_enc"][:] = float("nan")
    save_file(state, weights)
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tensor b_enc" in err and "16 NaN/inf" in err
    assert "Traceback" not in err and "Logging error" not in err


def test_a_checkpoint_with_nan_weights_is_refused_on_resume(tmp_path) -> None:
    from test_crash_resume import tiny_config, tiny_model, tiny_splits

    from mlsae_lens.run_training import TrainingRun

    runner = TrainingRun(tiny_config(tmp_path), model=tiny_model(), splits=tiny_splits())
    runner.trainer.save_checkpoint("tokens_000000000000")
    (path,) = list_checkpoints(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps(runner.cfg.to_dict()))
    state = load_file(path / "sae_weights.safetensors")
    state["W_enc"][0, 0] = float("nan")
    save_file(state, path / "sae_weights.safetensors")
    resumed = TrainingRun(tiny_config(tmp_path, resume=True), model=tiny_model(), splits=tiny_splits())
    with pytest.raises(MLSAEError, match="tensor W_enc in .*tokens_000000000000/sae_weights.safetensors holds 1 NaN/inf"):
        resumed.run()


def test_analyze_on_an_interrupted_run_says_unfinished_and_gives_the_resume_command(tmp_path, capsys) -> None:
    write_checkpoint(tmp_path / CHECKPOINT_DIR, "tokens_000000000060", tiny_sae(), {"x": torch.zeros(1)}, {})
    (tmp_path / "run.json").write_text(json.dumps({"model_name": "tiny"}))
    assert main(["analyze", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds an unfinished training run (last checkpoint tokens_000000000060" in err
    assert f"`mlsae-lens train --output-dir {tmp_path} --resume`" in err and err.count("\n") == 1


def test_eval_on_a_run_that_failed_before_its_first_checkpoint_says_so(tmp_path, capsys) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"model_name": "tiny"}))
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "stopped before its first checkpoint: nothing was trained" in err
    assert f"`mlsae-lens train --output-dir {tmp_path}`" in err and err.count("\n") == 1


def test_a_run_json_that_is_not_json_is_one_line_for_every_command(tmp_path, capsys) -> None:
    saved_sae(tmp_path)
    (tmp_path / "run.json").write_text("{oops")
    for command in ("eval", "analyze"):
        assert main([command, str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "run.json is not valid JSON" in err, err


def test_sae_and_checkpoint_files_get_the_umask_mode_like_every_other_file(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        atomic_save_sae(tiny_sae(), tmp_path)
        write_checkpoint(tmp_path / CHECKPOINT_DIR, "tokens_000000000001", tiny_sae(), {"x": torch.zeros(1)}, {})
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert "checkpoints/tokens_000000000001/trainer_state.safetensors" in modes
    assert set(modes.values()) == {0o644}, modes
