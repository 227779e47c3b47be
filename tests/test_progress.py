"""The training progress display: one rate, no overshoot, the harvest shown, no escape codes in
logs, and Ctrl-C taking effect between two model forwards of a harvest."""

import io
import logging
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_crash_resume import BATCH, tiny_config, tiny_model, tiny_splits

from mlsae_lens import activations_store
from mlsae_lens.checkpoint import list_checkpoints
from mlsae_lens.errors import MLSAEError
from mlsae_lens.progress import TrainingProgress
from mlsae_lens.run_training import TrainingRun


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_never_passes_the_requested_tokens_and_shows_one_rate_and_the_harvest(monkeypatch) -> None:
    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    with TrainingProgress(total=100, initial=0) as progress:
        progress.harvesting(chunk=0, group=0)
        assert "harvesting chunk 0" in screen.getvalue()
        for tokens in (64, 128):  # the last batch passes the total
            progress.advance(tokens)
            progress.metrics({"loss": 1.0, "fvu": 0.5, "l0": 4.0, "dead_fraction": 0.0})
        assert progress.bar.n == 100
    text = screen.getvalue()
    assert "100/100" in text and "128" not in text
    assert "tok_s" not in text and all(frame.count("tok/s") == 1 for frame in text.split("\r")[1:])  # tqdm's only


def test_training_outside_a_terminal_logs_plain_lines_without_escape_codes(tmp_path, capfd, caplog) -> None:
    """Under pytest stderr is not a terminal, as in a log file or a pipe."""
    total = BATCH * 7 + 5  # not a multiple of the batch: the last step passes the total
    runner = TrainingRun(tiny_config(tmp_path / "run", training_tokens=total, normalization="center",
                                                     center_estimation_tokens=30),
                                         model=tiny_model(), splits=tiny_splits())
    with caplog.at_level(logging.INFO, logger="mlsae_lens"):
        runner.run()
    err = capfd.readouterr().err
    assert "\x1b[" not in err and "training" not in err  # no bar: its lines went to the log
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training: ")]
    assert lines and lines[-1].startswith(f"training: {total}/{total} tokens (100%)")
    assert any(r.getMessage().startswith("harvesting chunk 0") for r in caplog.records)
    assert runner.trainer.n_training_samples > total  # the run did pass the total; the display did not


@pytest.mark.parametrize("signal_at", [1, 5])
def test_a_signal_during_a_harvest_stops_before_the_next_model_forward_and_resumes_bitwise(
    signal_at, tmp_path, monkeypatch
) -> None:
    """contexts_per_chunk=4 and model_batch_size=2: two forwards per chunk. The signal arrives
    during the first forward of the first chunk (before any step) or of the third; the second
    forward never runs."""
    forwards = []
    harvest = activations_store.harvest_resid_post

    def counting(model, tokens):
        forwards.append(len(forwards))
        if len(forwards) == signal_at:
            os.kill(os.getpid(), signal.SIGINT)  # handled by the runner: sets the stop flag
        return harvest(model, tokens)

    monkeypatch.setattr(activations_store, "harvest_resid_post", counting)
    out = tmp_path / "run"
    runner = TrainingRun(tiny_config(out), model=tiny_model(), splits=tiny_splits())
    with pytest.raises(MLSAEError, match=r"interrupted by signal 2 at \d+ tokens; checkpoint saved to .*--resume"):
        runner.run()
    assert len(forwards) == signal_at
    assert list_checkpoints(out)
    monkeypatch.setattr(activations_store, "harvest_resid_post", harvest)

    TrainingRun(tiny_config(out, resume=True), model=tiny_model(), splits=tiny_splits()).run()
    TrainingRun(tiny_config(tmp_path / "full"), model=tiny_model(), splits=tiny_splits()).run()
    a, b = load_file(out / "sae_weights.safetensors"), load_file(tmp_path / "full" / "sae_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_progress_bar_writes_plain_log_lines_when_not_a_terminal(tmp_path):
    """Off a terminal, no carriage returns or escape codes reach the log: plain lines instead."""
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from mlsae_lens.progress import progress_bar\n"
        "with progress_bar(total=10, desc='eval: downstream', unit='ctx', log_interval_s=0.0) as bar:\n"
        "    for _ in range(10): bar.update(1)\n"
        "for _ in progress_bar(range(3), desc='train-lens', unit='step', leave=False): pass\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "\r" not in out.stderr and "\x1b" not in out.stderr
    assert "eval: downstream: 10/10 ctx" in out.stderr and "train-lens: 3/3 step" in out.stderr
