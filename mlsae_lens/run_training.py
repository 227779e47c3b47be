"""``mlsae-lens train``: one run directory trained through SAELens' runner.

The CLI's flags (:class:`mlsae_lens.config.MultiLayerRunnerConfig`, recorded as ``run.json``)
become a SAELens runner config (:func:`mlsae_lens.runner_config.saelens_config_from_run`), the
packed corpus's training split becomes a ``datasets.Dataset`` of ``input_ids`` rows (the
``override_dataset``), and :class:`MultiLayerSAETrainingRunner` trains. Around it, this module
keeps what makes a directory a run: the lock against a second writer, ``--resume`` /
``--overwrite`` checks, ``run.json`` and ``splits.json`` written when the run starts (so a
resumed run and ``analyze`` can check the corpus), and the auto-sized ``--model-batch-size``.
"""

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from mlsae_lens.activations_store import MultiLayerActivationsStore
from mlsae_lens.checkpoint import (
    acquire_run_lock,
    atomic_write_json,
    list_checkpoints,
    release_run_lock,
)
from mlsae_lens.config import MultiLayerRunnerConfig
from mlsae_lens.distributed import (
    DistInfo,
    is_main,
    maybe_all_reduce_,
    maybe_init_distributed,
    rank_device,
)
from mlsae_lens.errors import MLSAEError
from mlsae_lens.memory import resolve_model_batch_size
from mlsae_lens.run_dir import (
    RUN_FILE,
    SPLITS_FILE,
    check_same_corpus,
    passes_over_data,
    prepare_output_dir,
    resolve_output_dir,
)
from mlsae_lens.runner_config import saelens_config_from_run
from mlsae_lens.sae import MultiLayerTrainingSAE
from mlsae_lens.sources import resolve_device
from mlsae_lens.training import MultiLayerSAETrainingRunner

logger = logging.getLogger(__name__)


def token_dataset(contexts: torch.Tensor) -> Dataset:
    """Packed contexts ``[n, context_size]`` as the ``input_ids`` rows SAELens reads as tokenized."""
    return Dataset.from_dict({"input_ids": contexts.tolist()})


def activations_store_for_run(cfg: MultiLayerRunnerConfig, model: Any, train_tokens: torch.Tensor,
                              device: str) -> MultiLayerActivationsStore:
    """The store a run's training reads (same contexts, order and shuffle), e.g. for baselines
    trained on the MLSAE's own stream."""
    saelens_cfg = saelens_config_from_run(cfg, model, device)
    return MultiLayerActivationsStore.from_config(model, saelens_cfg, token_dataset(train_tokens))


class TrainingRun:
    """An ``mlsae-lens train`` run: ``TrainingRun(cfg).run()`` trains into ``cfg.output_dir``.

    Args:
        cfg: the run's flags.
        model: an already-loaded model (else ``cfg.model_name`` is loaded).
        splits: already-tokenized splits (else ``cfg.dataset`` is loaded).
    """

    def __init__(self, cfg: MultiLayerRunnerConfig, model: Any = None, splits: Any = None):
        from mlsae_lens.data import special_token_mask
        from mlsae_lens.models import load_model

        self.cfg = cfg = resolve_output_dir(cfg)
        self.dist: DistInfo = maybe_init_distributed(resolve_device(cfg.device))
        self.device = rank_device(resolve_device(cfg.device), self.dist)
        # Rank 0 alone checks and writes the run directory.
        self.out = prepare_output_dir(cfg) if self.dist.rank == 0 else Path(cfg.output_dir)
        self.model = model if model is not None else load_model(cfg.model_name, device=self.device, backend=cfg.model_backend)
        # Resolved once here: the store, the centering means and run.json all read this value.
        cfg = self.cfg = dataclasses.replace(cfg, model_batch_size=self.resolved_model_batch_size())
        self.splits = splits if splits is not None else cfg.load_token_splits(self.model.tokenizer)
        if self.splits.train.shape[0] == 0:
            raise MLSAEError("the training split has no contexts; use a larger corpus")
        self.special_mask = special_token_mask(self.splits.train, self.model.tokenizer)
        if cfg.activation_cache is not None:
            from mlsae_lens.activation_cache import ActivationCache

            ActivationCache(Path(cfg.activation_cache)).check_run(cfg, self.model.cfg, self.splits.train, self.special_mask)
        self.saelens_cfg = saelens_config_from_run(cfg, self.model, self.device)
        self.runner = MultiLayerSAETrainingRunner(
            self.saelens_cfg,
            override_dataset=token_dataset(self.splits.train),
            override_model=self.model,
            interrupt_command=f"mlsae-lens train --output-dir {self.out}",
        )

    @property
    def trainer(self) -> Any:
        return self.runner.trainer

    @property
    def sae(self) -> MultiLayerTrainingSAE:
        return self.runner.sae

    @property
    def activations_store(self) -> Any:
        return self.runner.activations_store

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

    def run(self) -> MultiLayerTrainingSAE:
        """Train holding ``output_dir/.lock``: a second run into the same directory is refused
        instead of interleaving checkpoints."""
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
            self.runner.cfg.resume_from_checkpoint = str(checkpoints[-1])
        if is_main():
            atomic_write_json(self.out / RUN_FILE, cfg.to_dict())
            # Now, not only at the end: a resumed run checks its corpus against these hashes.
            atomic_write_json(self.out / SPLITS_FILE, self.splits_record())
            n_valid = int((~self.special_mask).sum())
            passes = passes_over_data(cfg.training_tokens, n_valid)
            if passes > 1:
                logger.warning(
                    "--training-tokens %d makes %.1f passes over the %d training tokens of the corpus: "
                    "every token is seen about %.0f times (use more text or fewer --training-tokens to "
                    "see each once)", cfg.training_tokens, passes, n_valid, passes,
                )
        return self.runner.run()

    def splits_record(self) -> dict[str, Any]:
        """``splits.json``: the corpus provenance, with the train/test token hashes."""
        return {"train": self.splits.provenance, "n_train_contexts": int(self.splits.train.shape[0]),
                "n_test_contexts": int(self.splits.test.shape[0])}
