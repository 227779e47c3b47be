"""``MultiLayerSAETrainer``: SAELens' ``SAETrainer`` for a multi-layer SAE.

Kept from SAELens: the step counters (``n_training_steps``, ``n_training_samples``), the
learning-rate schedule (``get_lr_scheduler``), coefficient schedulers, the sparsity window and
its wandb logs (``maybe_reset_sparsity``, ``build_train_step_log_dict``, ``_log_train_step``),
``set_final_sae_metadata`` (L0 and dead latents saved with the SAE), ``get_coefficients``.

Overridden, each for a reason SAELens' trainer states itself:

* ``_train_step``: SAELens counts firing latents with ``sum(-2)`` over a 2-D ``[batch, d_sae]``
  code and clips gradients at norm 1.0. Here a latent is alive when it fires at *any* layer of a
  token (one all-reduced count per step under torchrun), the decoder gradient's radial part is
  removed and rows are renormalized after Adam (unit-norm decoder), clipping is
  ``max_grad_norm`` (none by default, as the reference), and a NaN/inf loss stops the run naming
  the last good checkpoint.
* the optimizer: one fused Adam over all parameters with the reference's epsilon (~9x faster than
  the per-tensor loop on CPU at 42M parameters, and deterministic, so resume stays bitwise).
* ``dead_neurons``: tokens since a latent last fired (Gao et al. count tokens, not steps).
* ``save_checkpoint`` / ``load_trainer_state``: safetensors + JSON instead of ``torch.save``
  (never unpickle), written atomically, with the activations store's position and the RNG state,
  so a resumed run ends bitwise equal to an uninterrupted one.
* ``fit``: the same loop as SAELens' (sparsity window, step, wandb logs, counters, checkpoints),
  with a progress display that writes plain lines off a terminal, ``training_log.json``
  records, and a stop (Ctrl-C, SIGTERM) that takes effect between two steps or two forwards.
"""

import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.training.optim import get_lr_scheduler
from sae_lens.training.sae_trainer import SAETrainer
from torch import Tensor

from mlsae_lens.checkpoint import (
    checkpoints_in,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_checkpoint,
    write_checkpoint,
)
from mlsae_lens.distributed import (
    all_reduce_gradients_,
    is_distributed,
    is_main,
    local_rows,
    maybe_all_reduce_,
)
from mlsae_lens.errors import MLSAEError
from mlsae_lens.progress import HarvestInterrupted, TrainingProgress, watch_harvest
from mlsae_lens.runner_config import MultiLayerSAERunnerConfig
from mlsae_lens.sae import MultiLayerTrainingSAE, MultiLayerTrainingSAEConfig

logger = logging.getLogger(__name__)


class MultiLayerSAETrainer(SAETrainer[MultiLayerTrainingSAE, MultiLayerTrainingSAEConfig]):
    """Trains a :class:`MultiLayerTrainingSAE` on ``[batch, n_layers, d_in]`` batches.

    Args:
        cfg: SAELens' trainer config (``runner_cfg.to_sae_trainer_config()``).
        sae: the SAE, already on its device.
        data_provider: a :class:`mlsae_lens.activations_store.MultiLayerActivationsStore`.
        runner_cfg: the multi-layer options (Adam epsilon, dead threshold, checkpoints, ...).
        initialize: ``(sae, first_batch)`` callback run before the first step of a fresh run
            (geometric-median ``b_dec``, layer means).
    """

    def __init__(self, cfg: SAETrainerConfig, sae: MultiLayerTrainingSAE, data_provider: Any,
                 runner_cfg: MultiLayerSAERunnerConfig, initialize: Any = None, interrupt_command: str = ""):
        super().__init__(cfg=cfg, sae=sae, data_provider=data_provider, evaluator=None)
        self.runner_cfg = runner_cfg
        self.optimizer = torch.optim.Adam(
            sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=runner_cfg.adam_eps, fused=True
        )
        assert cfg.lr_end is not None  # set by the runner config's __post_init__
        self.lr_scheduler = get_lr_scheduler(
            cfg.lr_scheduler_name,
            lr=cfg.lr,
            optimizer=self.optimizer,
            warm_up_steps=cfg.lr_warm_up_steps,
            decay_steps=cfg.lr_decay_steps,
            training_steps=cfg.total_training_steps,
            lr_end=cfg.lr_end,
            num_cycles=cfg.n_restart_cycles,
        )
        self.checkpoint_thresholds = runner_cfg.checkpoint_thresholds()
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=cfg.device)
        self.act_freq_scores = torch.zeros(sae.cfg.d_sae, device=cfg.device)
        self.initialize = initialize
        self.interrupt_command = interrupt_command
        self.log: list[dict[str, float]] = []
        self.metrics: dict[str, float] = {}
        self.stop_signal: int | None = None

    @property
    def dead_neurons(self) -> Tensor:
        return self.tokens_since_fired >= self.runner_cfg.effective_dead_tokens_threshold

    @property
    def checkpoint_root(self) -> Path | None:
        return None if self.cfg.checkpoint_path is None else Path(self.cfg.checkpoint_path)

    # ---- one step ----------------------------------------------------------------------

    def step(self, batch: Tensor) -> TrainStepOutput:
        """One optimizer step on a *global* batch ``[batch, n_layers, d_in]`` (under torchrun each
        rank trains on its rows; the counters count the global batch)."""
        batch = batch.to(self.sae.device)
        if self.n_training_steps == 0 and self.initialize is not None:
            self.initialize(self.sae, batch)
        self.n_training_samples += batch.shape[0]
        return self._train_step(sae=self.sae, sae_in=local_rows(batch))

    def _train_step(self, sae: MultiLayerTrainingSAE, sae_in: Tensor) -> TrainStepOutput:
        sae.train()
        dead_mask = self.dead_neurons
        with self.autocast_if_enabled:
            out = sae.training_forward_pass(
                TrainStepInput(
                    sae_in=sae_in,
                    coefficients=self.get_coefficients(),
                    dead_neuron_mask=dead_mask,
                    n_training_steps=self.n_training_steps,
                    is_logging_step=self._is_logging_step(),
                )
            )
        topk = out.topk
        assert topk is not None
        active = topk.values > 0
        # Firing counts per latent, without a host sync (no boolean indexing).
        counts = torch.bincount(topk.indices.reshape(-1), weights=active.reshape(-1).float(), minlength=sae.cfg.d_sae)
        # Local losses are shares of the global loss (mlsae_lens.distributed): summed over ranks
        # they are the global metrics. One collective for all of them, one for the counts.
        loss, fvu, auxk, n_active, n_tokens = maybe_all_reduce_(
            torch.stack([out.loss.detach(), out.losses["mse_loss"].detach(),
                         out.losses["auxiliary_reconstruction_loss"].detach(),
                         active.sum().to(out.loss.dtype), out.loss.new_tensor(sae_in.shape[0])]).double()
        ).tolist()
        if not math.isfinite(loss):
            self.refuse_non_finite_loss()
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        all_reduce_gradients_(sae.parameters())
        sae.remove_gradient_parallel_to_decoder_directions()
        if self.runner_cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), self.runner_cfg.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        for scheduler in self.coefficient_schedulers.values():
            scheduler.step()
        sae.set_decoder_norm_to_unit_norm()

        counts = maybe_all_reduce_(counts)  # how often each latent fired, over all ranks
        self.tokens_since_fired += int(n_tokens)
        self.tokens_since_fired.masked_fill_(counts > 0, 0)  # no host sync (boolean indexing syncs)
        self.act_freq_scores += counts
        n_layers = active.shape[1]
        self.n_frac_active_samples += int(n_tokens) * n_layers  # frequencies per (token, layer) vector
        self.metrics = {
            "loss": loss,
            "fvu": fvu,
            "auxk": auxk,
            "l0": n_active / (n_tokens * n_layers),
            "dead_fraction": float(dead_mask.float().mean()),
        }
        return out

    def refuse_non_finite_loss(self) -> None:
        root = self.checkpoint_root
        last = checkpoints_in(root) if root is not None else []
        where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
        advice = (f"start again with a lower --lr (`{self.interrupt_command} --overwrite --lr "
                  f"{self.cfg.lr / 10:g}` with the other settings) or use another --output-dir"
                  if self.interrupt_command else f"start again with a lower lr (e.g. {self.cfg.lr / 10:g})")
        raise MLSAEError(f"the loss became NaN/inf at step {self.n_training_steps}; {where}. "
                         f"Resuming would repeat it: {advice}")

    # ---- checkpoints -------------------------------------------------------------------

    def save_checkpoint(self, checkpoint_name: str, base_path: Path | str | None = None,
                        wandb_aliases: list[str] | None = None) -> None:  # noqa: ARG002
        """Weights, Adam, schedule, counters, RNG and the store position, atomically (rank 0)."""
        root = Path(base_path) if base_path is not None else self.checkpoint_root
        if root is None or not is_main():
            return
        tensors, plain = optimizer_to_tensors(self.optimizer)
        tensors["tokens_since_fired"] = self.tokens_since_fired.cpu()
        tensors["act_freq_scores"] = self.act_freq_scores.cpu()
        tensors["torch_rng_state"] = torch.get_rng_state()
        plain.update(
            step=self.n_training_steps,
            tokens=self.n_training_samples,
            n_frac_active_samples=self.n_frac_active_samples,
            chunk=self.data_provider.chunk,
            batch_in_chunk=self.data_provider.batch_in_chunk,
            scheduler=self.lr_scheduler.state_dict(),
            coefficient_schedulers={name: s.state_dict() for name, s in self.coefficient_schedulers.items()},
            log=self.log,
        )
        write_checkpoint(root, checkpoint_name, self.sae, tensors, plain)

    def load_trainer_state(self, checkpoint_path: Path | str) -> None:
        """Everything :meth:`save_checkpoint` wrote, weights included (checked against the SAE)."""
        from safetensors.torch import load_file

        from mlsae_lens.sae_files import check_tensors

        path = Path(checkpoint_path)
        tensors, plain = read_checkpoint(path)
        expected = {name: tuple(t.shape) for name, t in self.sae.state_dict().items()}
        check_tensors(path / "sae_weights.safetensors", expected, "the run's settings")
        self.sae.load_state_dict(load_file(path / "sae_weights.safetensors", device=str(self.sae.device)))
        self.optimizer.load_state_dict(optimizer_from_tensors(tensors, plain))
        self.lr_scheduler.load_state_dict(plain["scheduler"])
        for name, state in plain.get("coefficient_schedulers", {}).items():
            self.coefficient_schedulers[name].load_state_dict(state)
        device = self.tokens_since_fired.device
        self.tokens_since_fired = tensors["tokens_since_fired"].to(device)
        if "act_freq_scores" in tensors:
            self.act_freq_scores = tensors["act_freq_scores"].to(device)
            self.n_frac_active_samples = plain.get("n_frac_active_samples", 0)
        torch.set_rng_state(tensors["torch_rng_state"])
        self.n_training_steps, self.n_training_samples = plain["step"], plain["tokens"]
        self.log = plain["log"]
        self.data_provider.set_position(plain["chunk"], plain["batch_in_chunk"])
        logger.info("resumed from %s at %d tokens", path, self.n_training_samples)

    def checkpoint_name(self) -> str:
        """``tokens_<12 digits>``: names sort by token count (``checkpoints_in`` relies on it)."""
        return f"tokens_{self.n_training_samples:012d}"

    def _checkpoint_if_needed(self) -> None:
        passed = [t for t in self.checkpoint_thresholds if t <= self.n_training_samples]
        if passed and self.n_training_samples < self.cfg.total_training_samples:
            self.save_checkpoint(checkpoint_name=self.checkpoint_name())
        self.checkpoint_thresholds = [t for t in self.checkpoint_thresholds if t > self.n_training_samples]

    # ---- the loop ----------------------------------------------------------------------

    def fit(self) -> MultiLayerTrainingSAE:
        total = self.cfg.total_training_samples
        self.sae.to(self.cfg.device)
        self.checkpoint_thresholds = [t for t in self.checkpoint_thresholds if t > self.n_training_samples]
        progress = TrainingProgress(total, self.n_training_samples)
        # Under torchrun the ranks must stop at the same step, so only one process stops mid-harvest.
        harvest = watch_harvest(self.data_provider, progress, lambda: self.stop_signal is not None and not is_distributed())
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        started = time.perf_counter()
        # Wall time is logged cumulatively across resumes (eval's training-time column reads it).
        seconds_before = float(self.log[-1].get("seconds", 0.0)) if self.log else 0.0
        log_to_wandb = self.cfg.logger.log_to_wandb and is_main()
        try:
            with progress, harvest:
                while self.n_training_samples < total:
                    sparsity_log = self.maybe_reset_sparsity()
                    if sparsity_log and log_to_wandb:
                        import wandb

                        wandb.log(sparsity_log, step=self.n_training_steps)
                    try:
                        batch = next(self.data_provider)
                    except HarvestInterrupted:
                        self.interrupted()
                    step_output = self.step(batch)
                    if log_to_wandb:
                        self._log_train_step(step_output)
                    self.n_training_steps += 1
                    self.record(progress, seconds_before + time.perf_counter() - started)
                    self._checkpoint_if_needed()
                    if self.stop_requested():
                        self.interrupted()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.sae.pre_activation_buffer.release()  # [batch, d_sae] floats, needed only by steps
        self.set_final_sae_metadata()
        if self.cfg.save_final_checkpoint:  # as SAELens' fit does
            self.save_checkpoint(checkpoint_name=f"final_{self.n_training_samples}")
        return self.sae

    def record(self, progress: TrainingProgress, seconds: float) -> None:
        """Advance the display; every ``log_every_steps`` steps (and at the end) keep the metrics."""
        progress.advance(self.n_training_samples)
        last = self.n_training_samples >= self.cfg.total_training_samples
        if self.n_training_steps % self.runner_cfg.log_every_steps == 0 or last:
            self.log.append({"step": self.n_training_steps, "tokens": self.n_training_samples,
                             "seconds": round(seconds, 3), **self.metrics})
            progress.metrics(self.metrics)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signum

    def stop_requested(self) -> bool:
        """A signal on any rank stops all of them at the same step."""
        if not is_distributed():
            return self.stop_signal is not None
        flag = torch.tensor([float(self.stop_signal is not None)], device=self.tokens_since_fired.device)
        return bool(maybe_all_reduce_(flag, "max").item())

    def interrupted(self) -> None:
        """Checkpoint the last completed step (a stop mid-harvest loses no step) and stop."""
        name = self.checkpoint_name()
        self.save_checkpoint(checkpoint_name=name)
        where = self.checkpoint_root / name if self.checkpoint_root is not None else "nowhere (no checkpoint_path)"
        how = (f"continue with `{self.interrupt_command} --resume` and the same settings" if self.interrupt_command
               else "continue with resume_from_checkpoint set to it")
        raise MLSAEError(f"interrupted by signal {self.stop_signal or 'on another rank'} at "
                         f"{self.n_training_samples} tokens; checkpoint saved to {where}; {how}")
