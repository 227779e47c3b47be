"""Crash safety in real processes: SIGKILL at a random step, then resume, is bitwise equal to an
uninterrupted run; SIGTERM saves a checkpoint before the process exits."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformer_lens import HookedTransformer

from mlsae_lens.checkpoint import LOCK_FILE, list_checkpoints, read_checkpoint
from mlsae_lens.config import MultiLayerRunnerConfig
from mlsae_lens.data import TokenSplits
from mlsae_lens.run_training import TrainingRun
from tiny import EosTokenizer, tiny_token_splits, tiny_transformer

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40
BATCH = 15

# The training process: the tiny model built deterministically, a slowed-down step so the
# test can hit it mid-run, and the CLI's contract (one line on stderr, exit code 2).
SCRIPT = '''
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_crash_resume import tiny_config, tiny_model, tiny_splits
from mlsae_lens.errors import MLSAEError
from mlsae_lens.run_training import TrainingRun

out, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
runner = TrainingRun(tiny_config(out, **overrides), model=tiny_model(), splits=tiny_splits())
step = runner.trainer.step
def slow_step(batch):
    if runner.trainer.n_training_steps == 2:
        (out.parent / (out.name + ".started")).write_text("")
    time.sleep(0.05)
    return step(batch)
runner.trainer.step = slow_step
try:
    runner.run()
except MLSAEError as exc:
    print(f"mlsae-lens: error: {{exc}}", file=sys.stderr)
    sys.exit(2)
'''


def tiny_model() -> HookedTransformer:
    return tiny_transformer(n_layers=2, tokenizer=EosTokenizer())

def tiny_splits() -> TokenSplits:
    return tiny_token_splits()

def tiny_config(out: Path, **overrides) -> MultiLayerRunnerConfig:
    base = dict(
        model_name="tiny", output_dir=str(out), context_size=16, expansion_factor=8, k=4,
        training_tokens=BATCH * STEPS, batch_size_tokens=BATCH, contexts_per_chunk=4, model_batch_size=2,
        lr=1e-3, dead_tokens_threshold=30, checkpoint_every_tokens=BATCH * 3, log_every_steps=1, seed=3,
        device="cpu", lr_decay="cosine", lr_warm_up_steps=5,
    )
    base.update(overrides)
    return MultiLayerRunnerConfig(**base)


def start(tmp_path: Path, out: Path, **overrides) -> subprocess.Popen:
    script = tmp_path / "train_tiny.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(out), json.dumps(overrides)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()}")
        assert time.monotonic() < deadline, "training did not get going in time"
        time.sleep(0.02)


def test_sigkill_at_a_random_step_then_resume_is_bitwise_equal(tmp_path) -> None:
    out = tmp_path / "killed"
    proc = start(tmp_path, out)
    wait_for(lambda: bool(list_checkpoints(out)), proc)
    time.sleep(random.Random().uniform(0.0, 0.6))  # a random later step, maybe mid-checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "cfg.json").exists(), "the run finished before it could be killed"
    killed_at = json.loads((list_checkpoints(out)[-1] / "trainer_state.json").read_text())["step"]
    assert (out / LOCK_FILE).exists()  # left by the dead process: stale, taken over below

    resumed = TrainingRun(tiny_config(out, resume=True), model=tiny_model(), splits=tiny_splits())
    resumed.run()
    full = TrainingRun(tiny_config(tmp_path / "full"), model=tiny_model(), splits=tiny_splits())
    full.run()
    a, b = load_file(out / "sae_weights.safetensors"), load_file(tmp_path / "full" / "sae_weights.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after a kill at step >= {killed_at}"
    assert torch.equal(resumed.trainer.tokens_since_fired, full.trainer.tokens_since_fired)
    assert resumed.trainer.lr_scheduler.state_dict() == full.trainer.lr_scheduler.state_dict()
    without_time = lambda log: [{k: v for k, v in row.items() if k != "seconds"} for row in log]  # noqa: E731
    assert without_time(resumed.trainer.log) == without_time(full.trainer.log)
    assert all(row["seconds"] >= 0 for row in resumed.trainer.log)
    assert not (out / LOCK_FILE).exists()


def test_sigterm_saves_a_checkpoint_then_exits_nonzero(tmp_path) -> None:
    out = tmp_path / "run"
    proc = start(tmp_path, out, checkpoint_every_tokens=10**6)  # no periodic checkpoint
    wait_for((tmp_path / "run.started").exists, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    message = stderr.strip().splitlines()[-1]  # above it: tqdm's progress bar
    assert message.startswith("mlsae-lens: error: interrupted by signal 15") and "--resume" in message
    (checkpoint,) = list_checkpoints(out)
    assert checkpoint.name in message
    tensors, plain = read_checkpoint(checkpoint)
    assert 3 <= plain["step"] < STEPS and plain["tokens"] == plain["step"] * BATCH
    assert {"scheduler", "chunk", "batch_in_chunk"} <= plain.keys()
    assert {"tokens_since_fired", "torch_rng_state"} <= tensors.keys()
    assert not (out / "cfg.json").exists() and not (out / LOCK_FILE).exists()
