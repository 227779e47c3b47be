"""Training runner: all layers of a TransformerLens model into one MLSAE.

Why not SAELens' ``LanguageModelSAETrainingRunner``: its activation store, evaluator and
trainer are built around one ``hook_name``, its trainer assumes 2-D ``[batch, d_sae]``
feature activations and hard-codes gradient clipping, and its checkpoints do not restore
the data position, so a resumed run cannot end bitwise equal to an uninterrupted one. We
keep SAELens' pieces that fit (the ``TrainingSAE`` base, ``TrainStepInput``/``Output``, the
architecture registry and file format) and own the loop.

Each step: AuxK dead mask → ``training_forward_pass`` → backward → drop the decoder
gradient's radial part → Adam → schedule → renormalize decoder rows → dead counters.
"""

import dataclasses
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.sae import SAEMetadata, TrainStepInput
from torch import Tensor

from mlsae_lens import sparse_ops
from mlsae_lens.activations import (
    ActivationStream,
    ActivationStreamConfig,
    estimate_layer_means,
    resid_post_hook_names,
)
from mlsae_lens.checkpoint import (
    acquire_run_lock,
    atomic_save_sae,
    atomic_write_json,
    list_checkpoints,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_checkpoint,
    release_run_lock,
    write_checkpoint,
)
from mlsae_lens.config import MultiLayerRunnerConfig
from mlsae_lens.distributed import (
    ShardedActivationStream,
    all_reduce_gradients_,
    global_layer_variance,
    is_main,
    local_rows,
    maybe_all_reduce_,
    maybe_init_distributed,
    rank_device,
)
from mlsae_lens.errors import MLSAEError
from mlsae_lens.memory import resolve_model_batch_size
from mlsae_lens.models import LanguageModel
from mlsae_lens.run_dir import (  # noqa: F401 - prepare_output_dir re-exported
    RUN_FILE,
    SPLITS_FILE,
    check_same_corpus,
    passes_over_data,
    prepare_output_dir,
    resolve_output_dir,
)
from mlsae_lens.progress import HarvestInterrupted, TrainingProgress, watch_harvest
from mlsae_lens.sae import MultiLayerTrainingSAE, MultiLayerTrainingSAEConfig

logger = logging.getLogger(__name__)

LOG_FILE = "training_log.json"


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MLSAEError(f"--device {device} was asked for but CUDA is not available; use --device cpu")
    return device


def encoder_matmul_dtype(choice: str, device: str) -> torch.dtype | None:
    """The encoder matmul's dtype for ``--encoder-matmul-dtype``: on CUDA ``auto`` is bfloat16
    (the matmul is the step's floor; top-k over bf16 pre-activations picks the same latents up
    to near-ties) with TF32 for the remaining fp32 matmuls; on CPU bf16 GEMMs are slower, so fp32."""
    on_cuda = str(device).startswith("cuda")
    if on_cuda:
        sparse_ops.enable_tf32()
    if choice == "bfloat16" or (choice == "auto" and on_cuda):
        return torch.bfloat16
    return None


def lr_lambda(cfg: MultiLayerRunnerConfig, total_steps: int):
    """Linear warm-up, then constant / linear / cosine decay to zero."""

    def factor(step: int) -> float:
        if step < cfg.lr_warm_up_steps:
            return (step + 1) / cfg.lr_warm_up_steps
        if cfg.lr_decay == "none":
            return 1.0
        span = max(1, total_steps - cfg.lr_warm_up_steps)
        progress = min(1.0, (step - cfg.lr_warm_up_steps) / span)
        if cfg.lr_decay == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@dataclass
class TrainingState:
    """Everything besides weights and optimizer that a resumed run needs."""

    step: int = 0
    tokens: int = 0
    chunk: int = 0
    batch_in_chunk: int = 0
    log: list[dict[str, float]] = field(default_factory=list)


class MultiLayerSAETrainingRunner:
    """Train an MLSAE on every ``hook_resid_post`` of a model, with checkpoints and resume.

    Args:
        cfg: the run's configuration.
        model: an already-loaded model (else ``cfg.model_name`` is loaded).
        splits: already-tokenized splits (else ``cfg.dataset`` is loaded).
    """

    def __init__(
        self,
        cfg: MultiLayerRunnerConfig,
        model: LanguageModel | None = None,
        splits: Any = None,
    ):
        from mlsae_lens.data import special_token_mask
        from mlsae_lens.models import load_model

        self.cfg = cfg = resolve_output_dir(cfg)
        # Under torchrun: join the process group; rank 0 alone checks and writes the run dir.
        self.dist = maybe_init_distributed(resolve_device(cfg.device))
        self.device = rank_device(resolve_device(cfg.device), self.dist)
        self.out = prepare_output_dir(cfg) if self.dist.rank == 0 else Path(cfg.output_dir)
        self.model = model if model is not None else load_model(cfg.model_name, device=self.device, backend=cfg.model_backend)
        # Resolved once here: the stream, the centering means and run.json all read this value.
        cfg = self.cfg = dataclasses.replace(cfg, model_batch_size=self.resolved_model_batch_size())
        self.splits = splits if splits is not None else cfg.load_token_splits(self.model.tokenizer)
        self.special_mask = special_token_mask(self.splits.train, self.model.tokenizer)
        stream_cfg = ActivationStreamConfig(
            contexts_per_chunk=cfg.contexts_per_chunk,
            batch_size_tokens=cfg.batch_size_tokens,
            model_batch_size=cfg.model_batch_size,
            seed=cfg.seed,
        )
        if cfg.activation_cache is not None:
            from mlsae_lens.activation_cache import CachedActivationStream

            self.stream: ActivationStream = CachedActivationStream.for_run(
                cfg, self.model, self.splits.train, self.special_mask, stream_cfg, self.device
            )
        else:
            stream_cls = ShardedActivationStream if self.dist.enabled else ActivationStream
            self.stream = stream_cls(self.model, self.splits.train, self.special_mask, stream_cfg, device=self.device)
        # Before seeding: building a tuned lens draws (discarded) nn.Linear inits.
        lens = self.load_tuned_lens()
        torch.manual_seed(cfg.seed)
        self.sae = MultiLayerTrainingSAE(self.sae_config()).to(self.device)
        if self.dist.enabled:  # FVU denominators of the global batch, so rank losses add up
            self.sae.layer_variance_fn = global_layer_variance
        if lens is not None:
            self.sae.set_tuned_lens(*lens)  # frozen buffers, saved with the SAE
        self.sae.matmul_dtype = encoder_matmul_dtype(cfg.encoder_matmul_dtype, self.device)
        self.optimizer = torch.optim.Adam(
            self.sae.parameters(),
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            # One fused kernel over all parameters: ~9x faster than the per-tensor loop on
            # CPU at 42M parameters (benchmarks/), and deterministic, so resume stays bitwise.
            fused=True,
        )
        self.total_steps = math.ceil(cfg.training_tokens / cfg.batch_size_tokens)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg, self.total_steps)
        )
        self.tokens_since_fired = torch.zeros(self.sae.cfg.d_sae, dtype=torch.long, device=self.device)
        self.state = TrainingState()
        self._stop_signal: int | None = None

    def resolved_model_batch_size(self) -> int:
        """``--model-batch-size``, or when it is auto (None): the value recorded in run.json
        when resuming (the same forwards as before the interruption, so resume stays bitwise),
        else one sized from the free memory (:mod:`mlsae_lens.memory`), the smallest over ranks
        under torchrun."""
        cfg = self.cfg
        if cfg.model_batch_size is not None:
            return cfg.model_batch_size
        run_file = Path(cfg.output_dir) / RUN_FILE
        if cfg.resume and run_file.is_file():
            recorded = json.loads(run_file.read_text()).get("model_batch_size")
            if recorded is not None:
                logger.info("--model-batch-size auto: resuming with the recorded %d", recorded)
                return int(recorded)
        chosen = resolve_model_batch_size(None, self.model.cfg, cfg.context_size, self.device)
        if self.dist.enabled:
            smallest = torch.tensor([-chosen], device=self.device)
            chosen = -int(maybe_all_reduce_(smallest, "max").item())
        return chosen

    def load_tuned_lens(self) -> tuple[Tensor, Tensor] | None:
        """The ``--tuned-lens`` translators per MLSAE layer (see :mod:`mlsae_lens.lens`)."""
        if self.cfg.tuned_lens is None:
            return None
        from mlsae_lens.lens import load_lens, resid_post_translators

        lens = load_lens(self.cfg.tuned_lens, self.model)
        logger.info("tuned lens from %s applied before the encoder", self.cfg.tuned_lens)
        return resid_post_translators(lens)

    def sae_config(self) -> MultiLayerTrainingSAEConfig:
        mcfg = self.model.cfg
        return MultiLayerTrainingSAEConfig(
            d_in=mcfg.d_model,
            d_sae=self.cfg.expansion_factor * mcfg.d_model,
            k=self.cfg.k,
            n_layers=mcfg.n_layers,
            normalization=self.cfg.normalization,
            tuned_lens=self.cfg.tuned_lens is not None,
            aux_k=self.cfg.aux_k,
            aux_coefficient=self.cfg.aux_coefficient,
            device=self.device,
            metadata=SAEMetadata(
                model_name=self.cfg.model_name,
                hook_name=None,
                hook_names=resid_post_hook_names(mcfg.n_layers),
                context_size=self.cfg.context_size,
                prepend_bos=False,
                dataset_path=self.cfg.dataset,
                **({"tuned_lens_source": self.cfg.tuned_lens} if self.cfg.tuned_lens else {}),
            ),
        )

    # ---- checkpoints -------------------------------------------------------------------

    def checkpoint(self) -> Path:
        if not is_main():  # rank 0 writes; the others hold identical state
            return self.out / "checkpoints" / f"tokens_{self.state.tokens:012d}"
        tensors, plain = optimizer_to_tensors(self.optimizer)
        tensors["tokens_since_fired"] = self.tokens_since_fired.cpu()
        tensors["torch_rng_state"] = torch.get_rng_state()
        plain.update(
            step=self.state.step,
            tokens=self.state.tokens,
            chunk=self.state.chunk,
            batch_in_chunk=self.state.batch_in_chunk,
            scheduler=self.scheduler.state_dict(),
            log=self.state.log,
        )
        return write_checkpoint(self.out, f"tokens_{self.state.tokens:012d}", self.sae, tensors, plain)

    def restore(self, path: Path) -> None:
        tensors, plain = read_checkpoint(path)
        from safetensors.torch import load_file

        from mlsae_lens.sae_files import check_tensors

        expected = {name: tuple(t.shape) for name, t in self.sae.state_dict().items()}
        check_tensors(path / "sae_weights.safetensors", expected, "the run's settings")
        self.sae.load_state_dict(load_file(path / "sae_weights.safetensors", device=self.device))
        self.optimizer.load_state_dict(optimizer_from_tensors(tensors, plain))
        self.scheduler.load_state_dict(plain["scheduler"])
        self.tokens_since_fired = tensors["tokens_since_fired"].to(self.device)
        torch.set_rng_state(tensors["torch_rng_state"])
        self.state = TrainingState(
            step=plain["step"],
            tokens=plain["tokens"],
            chunk=plain["chunk"],
            batch_in_chunk=plain["batch_in_chunk"],
            log=plain["log"],
        )
        logger.info("resumed from %s at %d tokens", path, self.state.tokens)

    # ---- the loop ----------------------------------------------------------------------

    def initialize(self, first_batch: Tensor) -> None:
        if self.cfg.normalization == "center":
            means = estimate_layer_means(
                self.model,
                self.splits.train,
                self.special_mask,
                self.cfg.center_estimation_tokens,
                self.cfg.model_batch_size,
            ).to(self.device)
            # The means live where they are subtracted: in the lens basis (the lens is affine,
            # so the mean of translated vectors is the translated mean).
            self.sae.layer_means.copy_(self.sae.to_lens_basis(means.to(self.sae.dtype)))
        self.sae.initialize_b_dec_with_geometric_median(first_batch)

    def step(self, batch: Tensor) -> dict[str, float]:
        dead_mask = self.tokens_since_fired >= self.cfg.effective_dead_tokens_threshold
        out = self.sae.training_forward_pass(
            TrainStepInput(
                sae_in=batch,
                coefficients={},
                dead_neuron_mask=dead_mask,
                n_training_steps=self.state.step,
                is_logging_step=False,
            )
        )
        assert out.topk is not None and out.layer_fvu is not None
        active = out.topk.values > 0
        # Local losses are shares of the global loss (see mlsae_lens.distributed): summed
        # over ranks they are the global metrics. One collective for all of them.
        loss, fvu, auxk, n_active, n_tokens = maybe_all_reduce_(
            torch.stack([out.loss.detach(), out.losses["mse_loss"].detach(),
                         out.losses["auxiliary_reconstruction_loss"].detach(),
                         active.sum().to(out.loss.dtype), out.loss.new_tensor(batch.shape[0])]).double()
        ).tolist()
        if not math.isfinite(loss):
            last = list_checkpoints(self.out)
            where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
            raise MLSAEError(
                f"the loss became NaN/inf at step {self.state.step}; {where}. Resuming would repeat "
                f"it: start again with a lower --lr (`mlsae-lens train --output-dir {self.out} "
                f"--overwrite --lr {self.cfg.lr / 10:g}` with the other settings) or use another --output-dir"
            )
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        all_reduce_gradients_(self.sae.parameters())
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.scheduler.step()
        self.sae.set_decoder_norm_to_unit_norm()

        fired = torch.zeros(dead_mask.shape, dtype=torch.int32, device=dead_mask.device)
        fired[out.topk.indices[active]] = 1
        fired = maybe_all_reduce_(fired, "max").bool()  # fired on any rank
        self.tokens_since_fired += int(n_tokens)
        self.tokens_since_fired[fired] = 0
        return {
            "loss": loss,
            "fvu": fvu,
            "auxk": auxk,
            "l0": n_active / (n_tokens * active.shape[1]),
            "dead_fraction": float(dead_mask.float().mean()),
        }

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def _interrupted(self) -> None:
        """Checkpoint the last completed step (a stop mid-harvest loses no step) and stop."""
        path = self.checkpoint()
        raise MLSAEError(
            f"interrupted by signal {self._stop_signal or 'on another rank'} at {self.state.tokens} tokens; "
            f"checkpoint saved to {path}; continue with `mlsae-lens train --output-dir {self.out} --resume` "
            "and the same settings"
        )

    def _stop_requested(self) -> bool:
        """A signal on any rank stops all of them at the same step."""
        if not self.dist.enabled:
            return self._stop_signal is not None
        flag = torch.tensor([float(self._stop_signal is not None)], device=self.device)
        return bool(maybe_all_reduce_(flag, "max").item())

    def run(self) -> MultiLayerTrainingSAE:
        """Train to ``training_tokens`` holding ``output_dir/.lock``: a second run into the
        same directory is refused instead of interleaving checkpoints."""
        if not is_main():
            return self._run()
        acquire_run_lock(self.out)
        try:
            prepare_output_dir(self.cfg, remove=True)  # again, under the lock: another run may have started
            return self._run()
        finally:
            release_run_lock(self.out)

    def _run(self) -> MultiLayerTrainingSAE:
        cfg = self.cfg
        checkpoints = list_checkpoints(self.out)
        if cfg.resume and checkpoints:
            check_same_corpus(self.out, self.splits.provenance)
            self.restore(checkpoints[-1])
        if is_main():
            atomic_write_json(self.out / RUN_FILE, cfg.to_dict())
            # Now, not only at the end: a resumed run checks its corpus against these hashes.
            atomic_write_json(self.out / SPLITS_FILE, self.splits_record())
        n_valid = int((~self.special_mask).sum())
        passes = passes_over_data(cfg.training_tokens, n_valid)
        if passes > 1 and is_main():
            logger.warning(
                "--training-tokens %d makes %.1f passes over the %d training tokens of the corpus: "
                "every token is seen about %.0f times (use more text or fewer --training-tokens to "
                "see each once)", cfg.training_tokens, passes, n_valid, passes,
            )

        batches = self.stream.batches(self.state.chunk, self.state.batch_in_chunk)
        progress = TrainingProgress(cfg.training_tokens, self.state.tokens)
        # Under torchrun the ranks must stop at the same step, so only one process stops mid-harvest.
        harvest = watch_harvest(self.stream, progress, lambda: self._stop_signal is not None and not self.dist.enabled)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        wandb_run = self._maybe_wandb()
        next_checkpoint = (self.state.tokens // cfg.effective_checkpoint_every_tokens + 1) * cfg.effective_checkpoint_every_tokens
        started = time.perf_counter()
        # Wall time is logged cumulatively across resumes (eval's training-time column reads it).
        seconds_before = float(self.state.log[-1].get("seconds", 0.0)) if self.state.log else 0.0
        try:
            with progress, harvest:
                while self.state.tokens < cfg.training_tokens:
                    try:
                        chunk, index, batch = next(batches)
                    except HarvestInterrupted:
                        self._interrupted()
                    if self.state.step == 0:
                        self.initialize(batch)
                    metrics = self.step(local_rows(batch))  # the whole batch in one process
                    self.state.step += 1
                    self.state.tokens += batch.shape[0]
                    self.state.chunk, self.state.batch_in_chunk = chunk, index + 1
                    progress.advance(self.state.tokens)
                    if self.state.step % cfg.log_every_steps == 0 or self.state.tokens >= cfg.training_tokens:
                        seconds = seconds_before + time.perf_counter() - started
                        record = {"step": self.state.step, "tokens": self.state.tokens, "seconds": round(seconds, 3), **metrics}
                        self.state.log.append(record)
                        progress.metrics(metrics)
                        if wandb_run is not None:
                            wandb_run.log(record, step=self.state.step)
                    if self.state.tokens >= next_checkpoint and self.state.tokens < cfg.training_tokens:
                        self.checkpoint()
                        next_checkpoint += cfg.effective_checkpoint_every_tokens
                    if self._stop_requested():
                        self._interrupted()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if wandb_run is not None:
                wandb_run.finish()
        self.save_final()
        return self.sae

    def save_final(self) -> None:
        """The inference SAE in SAELens' format directly in the run directory, plus the log."""
        if not is_main():
            return
        atomic_save_sae(self.sae, self.out)
        atomic_write_json(self.out / LOG_FILE, self.state.log)
        atomic_write_json(self.out / SPLITS_FILE, self.splits_record())

    def splits_record(self) -> dict[str, Any]:
        """``splits.json``: the corpus provenance, with the train/test token hashes."""
        return {"train": self.splits.provenance, "n_train_contexts": int(self.splits.train.shape[0]),
                "n_test_contexts": int(self.splits.test.shape[0])}

    def _maybe_wandb(self) -> Any:
        if not self.cfg.log_to_wandb or not is_main():
            return None
        import wandb

        return wandb.init(project=self.cfg.wandb_project, config=self.cfg.to_dict())
