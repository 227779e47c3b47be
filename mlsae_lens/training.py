"""``MultiLayerSAETrainingRunner``: SAELens' ``LanguageModelSAETrainingRunner`` for an MLSAE.

Built the SAELens way::

    runner = MultiLayerSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)
    sae = runner.run()  # a MultiLayerTrainingSAE

where ``cfg`` is a ``sae_lens.LanguageModelSAERunnerConfig`` (or
:class:`mlsae_lens.runner_config.MultiLayerSAERunnerConfig`) whose ``sae`` is a
:class:`MultiLayerTrainingSAEConfig`. The store is a :class:`MultiLayerActivationsStore`
(every ``hook_resid_post`` from one forward) and the trainer a :class:`MultiLayerSAETrainer`.

``__init__`` and ``run`` are overridden: SAELens' build ``ActivationsStore.from_config`` and a
plain ``SAETrainer`` by name, load models through SAELens' loader (which cannot load the
embedded GGUF model or a TransformerBridge), do not seed before the SAE's initialization, and
save with ``torch.save`` and plain writes. Kept: the config, ``_compile_llm_if_needed``,
``_compile_sae_if_needed``, the SAE metadata, the override arguments, wandb's run. Where SAELens
writes the inference SAE, ``sparsity.safetensors`` and ``runner_cfg.json`` into ``output_path``,
so does this runner (atomically), plus ``training_log.json``.
"""

import logging
from pathlib import Path
from typing import Any

import torch
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner
from torch import Tensor

from mlsae_lens import dense_ops
from mlsae_lens.activations import estimate_layer_means, resid_post_hook_names
from mlsae_lens.activations_store import MultiLayerActivationsStore
from mlsae_lens.atomic import atomic_save_file, atomic_write_json
from mlsae_lens.checkpoint import atomic_save_sae
from mlsae_lens.distributed import (
    global_layer_variance,
    is_main,
    maybe_init_distributed,
    rank_device,
)
from mlsae_lens.errors import MLSAEError
from mlsae_lens.run_dir import RUNNER_CFG_FILE, SPARSITY_FILE, TRAINING_LOG_FILE
from mlsae_lens.runner_config import (
    MODEL_CLASS_BACKENDS,
    MultiLayerSAERunnerConfig,
    as_multilayer_config,
)
from mlsae_lens.sae import MultiLayerTrainingSAE
from mlsae_lens.sources import resolve_device
from mlsae_lens.trainer import MultiLayerSAETrainer

logger = logging.getLogger(__name__)


def encoder_matmul_dtype(choice: str, device: str) -> torch.dtype | None:
    """The encoder matmul's dtype for ``--encoder-matmul-dtype``: on CUDA ``auto`` is bfloat16
    (the matmul is the step's floor; top-k over bf16 pre-activations picks the same latents up
    to near-ties) with TF32 for the remaining fp32 matmuls. On CPU ``auto`` stays float32 so a
    run's code does not depend on the CPU's instruction set; ``bfloat16`` there is a choice (3-4x
    faster GEMMs with AVX512-BF16 or AMX, slower without; see ``benchmarks/results.md``)."""
    on_cuda = str(device).startswith("cuda")
    if on_cuda:
        dense_ops.enable_tf32()
    if choice == "bfloat16" or (choice == "auto" and on_cuda):
        return torch.bfloat16
    return None


def auxk_matmul_dtype(choice: str, device: str) -> torch.dtype | None:
    """The dense AuxK products' dtype for ``--auxk-matmul-dtype``: ``auto`` is bfloat16 where
    bf16 GEMMs are native (:func:`mlsae_lens.dense_ops.has_native_bf16_matmul`), else float32.
    Only the auxiliary loss's forward and gradients change (see :func:`mlsae_lens.dense_ops.low_precision_mm`)."""
    if choice == "bfloat16" or (choice == "auto" and dense_ops.has_native_bf16_matmul(torch.device(device))):
        return torch.bfloat16
    return None


class MultiLayerSAETrainingRunner(LanguageModelSAETrainingRunner):
    """Train an MLSAE on every ``hook_resid_post`` of a TransformerLens model or bridge.

    Args:
        cfg: SAELens' runner config; its ``sae`` is a ``MultiLayerTrainingSAEConfig``.
        override_dataset: a ``datasets.Dataset`` (``input_ids``/``tokens`` rows or ``text``)
            instead of ``cfg.dataset_path``.
        override_model: an already-loaded ``HookedTransformer`` or ``TransformerBridge``
            (else ``cfg.model_name`` is loaded by :func:`mlsae_lens.models.load_model`).
        override_sae: an SAE to continue training instead of a fresh one (as does
            ``cfg.from_pretrained_path``); it keeps its ``b_dec`` and layer means.
        interrupt_command: the command that resumes this run, named in stop messages.
    """

    cfg: MultiLayerSAERunnerConfig  # type: ignore[assignment]
    sae: MultiLayerTrainingSAE  # type: ignore[assignment]
    activations_store: MultiLayerActivationsStore  # type: ignore[assignment]

    def __init__(
        self,
        cfg: LanguageModelSAERunnerConfig,
        override_dataset: Any = None,
        override_model: Any = None,
        override_sae: MultiLayerTrainingSAE | None = None,
        interrupt_command: str = "",
    ):
        cfg = as_multilayer_config(cfg)
        unsupported = {
            "prefetch_llm_batches": (bool(cfg.prefetch_llm_batches), "the store's position must be the "
                                     "trained batches' for a checkpoint to resume bitwise"),
            "compile_llm": (cfg.compile_llm, "the harvest runs the model's forward with hooks, not run_with_cache"),
            "hook_head_index": (cfg.hook_head_index is not None, "a multi-layer SAE reads whole hook_resid_post vectors"),
            "model_kwargs": (bool(cfg.model_kwargs), "the harvest's forward takes no extra arguments"),
            "sae.normalize_activations": (cfg.sae.normalize_activations != "none", "a multi-layer SAE "
                                          "normalizes its input itself: set sae.normalization (standardize, "
                                          "center or none)"),
        }
        for name, (is_set, why) in unsupported.items():
            if is_set:
                raise MLSAEError(f"{name} is not supported by MultiLayerSAETrainingRunner: {why}; leave it unset")
        # Under torchrun: join the process group; each rank drives its own GPU.
        self.dist = maybe_init_distributed(resolve_device(cfg.device))
        device = rank_device(resolve_device(cfg.device), self.dist)
        if device != cfg.device:
            cfg.device = cfg.llm_device = cfg.act_store_device = device
        self.cfg = cfg
        if override_model is None:
            from mlsae_lens.models import load_model

            backend = MODEL_CLASS_BACKENDS.get(cfg.model_class_name)
            if backend is None:
                raise MLSAEError(f"model_class_name {cfg.model_class_name!r} is not supported; use one of "
                                 f"{sorted(MODEL_CLASS_BACKENDS)}")
            override_model = load_model(cfg.model_name, device=cfg.llm_device, backend=backend)
        self.model = override_model
        self.check_model_fits_sae()
        self._compile_llm_if_needed()
        self.activations_store = MultiLayerActivationsStore.from_config(self.model, cfg, override_dataset)
        lens = self.load_tuned_lens()  # before seeding: building a lens draws (discarded) inits
        torch.manual_seed(cfg.seed)
        if override_sae is None and cfg.from_pretrained_path is not None:  # SAELens: continue a saved SAE
            override_sae = MultiLayerTrainingSAE.load_from_disk(cfg.from_pretrained_path, device=device)
        # A given SAE is trained as it is; a fresh one gets b_dec (and layer means) from the data.
        fresh = override_sae is None
        self.sae = MultiLayerTrainingSAE(cfg.sae) if fresh else override_sae
        self.sae.to(device)
        if self.dist.enabled:  # FVU denominators of the global batch, so rank losses add up
            self.sae.layer_variance_fn = global_layer_variance
        if lens is not None:
            self.sae.set_tuned_lens(*lens)  # frozen buffers, saved with the SAE
        self.sae.matmul_dtype = encoder_matmul_dtype(cfg.encoder_matmul_dtype, device)
        self.sae.aux_matmul_dtype = auxk_matmul_dtype(cfg.auxk_matmul_dtype, device)
        self.evaluator = None  # SAELens' evaluator splices one hook; `mlsae-lens eval` splices all
        self.trainer = MultiLayerSAETrainer(
            cfg.to_sae_trainer_config(), self.sae, self.activations_store, cfg,
            initialize=self.initialize if fresh else None, interrupt_command=interrupt_command,
        )

    def check_model_fits_sae(self) -> None:
        mcfg, sae = self.model.cfg, self.cfg.sae
        if (mcfg.n_layers, mcfg.d_model) != (sae.n_layers, sae.d_in):
            raise MLSAEError(
                f"the SAE config has n_layers={sae.n_layers}, d_in={sae.d_in} but the model "
                f"{self.cfg.model_name} has n_layers={mcfg.n_layers}, d_model={mcfg.d_model}; "
                "set them to the model's sizes"
            )

    def load_tuned_lens(self) -> tuple[Tensor, Tensor] | None:
        """The tuned-lens translators per MLSAE layer (see :mod:`mlsae_lens.lens`)."""
        if self.cfg.tuned_lens is None:
            if self.cfg.sae.tuned_lens:
                raise MLSAEError("sae.tuned_lens is True but no tuned_lens source is given; set tuned_lens")
            return None
        from mlsae_lens.lens import load_lens, resid_post_translators

        lens = load_lens(self.cfg.tuned_lens, self.model)
        logger.info("tuned lens from %s applied before the encoder", self.cfg.tuned_lens)
        return resid_post_translators(lens)

    def initialize(self, sae: MultiLayerTrainingSAE, first_batch: Tensor) -> None:
        """Before the first step of a fresh run: the per-layer means (``center``) and ``b_dec``."""
        if sae.cfg.normalization == "center":
            store = self.activations_store
            tokens = store.tokens_for_estimates(self.cfg.center_estimation_tokens)
            means = estimate_layer_means(
                self.model, tokens, store.excluded_mask(tokens), self.cfg.center_estimation_tokens,
                self.cfg.store_batch_size_prompts,
            ).to(sae.device)
            # The means live where they are subtracted: in the lens basis (the lens is affine,
            # so the mean of translated vectors is the translated mean).
            sae.layer_means.copy_(sae.to_lens_basis(means.to(sae.dtype)))
        sae.initialize_b_dec_with_geometric_median(first_batch)

    def _set_sae_metadata(self) -> None:
        """SAELens' metadata, with every layer's hook instead of one ``hook_name``."""
        super()._set_sae_metadata()
        metadata = self.sae.cfg.metadata
        metadata.hook_name = None
        metadata.hook_names = resid_post_hook_names(self.cfg.sae.n_layers)
        metadata.prepend_bos = self.cfg.prepend_bos
        if self.cfg.tuned_lens is not None:
            metadata.tuned_lens_source = self.cfg.tuned_lens

    def run(self) -> MultiLayerTrainingSAE:  # type: ignore[override]
        """Train to ``training_tokens`` (from ``resume_from_checkpoint`` when set) and save to
        ``output_path``; returns the trained SAE."""
        self._set_sae_metadata()
        wandb_run = None
        if self.cfg.logger.log_to_wandb and is_main():
            import wandb

            wandb_run = wandb.init(project=self.cfg.logger.wandb_project, entity=self.cfg.logger.wandb_entity,
                                   config=self.cfg.to_dict(), name=self.cfg.logger.run_name,
                                   id=self.cfg.logger.wandb_id)
        try:
            if self.cfg.resume_from_checkpoint is not None:
                self.trainer.load_trainer_state(self.cfg.resume_from_checkpoint)
            self._compile_sae_if_needed()
            sae = self.trainer.fit()
            if self.cfg.output_path is not None and is_main():
                self.save_final_sae(sae, self.cfg.output_path, self.trainer.log_feature_sparsity)
            return sae
        finally:
            if wandb_run is not None:
                wandb_run.finish()

    def save_final_sae(self, sae: Any, output_path: str, log_feature_sparsity: Tensor | None = None) -> None:
        """SAELens' final files, each written atomically: the inference SAE (``cfg.json`` last),
        ``sparsity.safetensors``, ``runner_cfg.json``, and ``training_log.json``."""
        out = Path(output_path)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / TRAINING_LOG_FILE, self.trainer.log)
        if log_feature_sparsity is not None:
            atomic_save_file({"sparsity": log_feature_sparsity.contiguous()}, out / SPARSITY_FILE)
        atomic_write_json(out / RUNNER_CFG_FILE, self.cfg.to_dict())
        atomic_save_sae(sae, out)  # last: a cfg.json in the directory means a finished run
