"""SAELens' runner config for a multi-layer SAE, and the mapping from ``mlsae-lens train`` flags.

A SAELens user trains an MLSAE with the config they know::

    cfg = MultiLayerSAERunnerConfig(
        sae=MultiLayerTrainingSAEConfig(d_in=576, d_sae=4608, k=32, n_layers=30),
        model_name="SmolLM2-135M-Instruct", dataset_path="...", context_size=128,
        training_tokens=1_000_000, train_batch_size_tokens=64, lr=1e-4,
    )
    sae = MultiLayerSAETrainingRunner(cfg, override_dataset=ds, override_model=model).run()

Every field of :class:`sae_lens.LanguageModelSAERunnerConfig` means what it means in SAELens;
a plain ``LanguageModelSAERunnerConfig`` works too (:func:`as_multilayer_config` adds the
defaults below). Where SAELens has no field for a multi-layer run's need, this subclass adds one:

* ``n_batches_in_buffer``: SAELens 6.54 sizes its shuffling buffer as ``n_batches_in_buffer x
  context_size`` tokens, i.e. ``n_batches_in_buffer`` contexts; a multi-layer chunk is that many
  contexts (``--contexts-per-chunk``), shuffled together (see :mod:`mlsae_lens.activations_store`).
* ``store_batch_size_prompts``: contexts per model forward (``--model-batch-size``).
* ``dead_feature_window`` counts steps as in SAELens; ``dead_tokens_threshold`` (tokens) wins
  when set, because a token-count threshold (Gao et al.: 10M tokens) does not depend on the batch.
* ``logger.log_to_wandb`` defaults to False here (SAELens: True).
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig

from mlsae_lens.config import MATMUL_DTYPE_CHOICES, MatmulDtype
from mlsae_lens.errors import MLSAEError
from mlsae_lens.sae import MultiLayerTrainingSAEConfig

# Backends of mlsae_lens.models.load_model, by SAELens' model_class_name.
MODEL_CLASS_BACKENDS = {"TransformerBridge": "bridge", "HookedTransformer": "hooked"}


@dataclass
class MultiLayerSAERunnerConfig(LanguageModelSAERunnerConfig[MultiLayerTrainingSAEConfig]):
    """:class:`sae_lens.LanguageModelSAERunnerConfig` plus the options of a multi-layer run."""

    model_class_name: str = "TransformerBridge"
    """``TransformerBridge`` (any Hugging Face causal LM) or ``HookedTransformer``."""
    logger: LoggingConfig = field(default_factory=lambda: LoggingConfig(log_to_wandb=False))
    adam_eps: float = 6.25e-10
    """Adam epsilon (reference implementation: 6.25e-10; SAELens uses torch's 1e-8)."""
    max_grad_norm: float | None = None
    """Gradient clipping: none, as in the reference and sparsify (SAELens hard-codes 1.0)."""
    dead_tokens_threshold: int | None = None
    """A latent is dead after this many tokens without firing at any layer (default:
    ``dead_feature_window x train_batch_size_tokens``)."""
    checkpoint_every_tokens: int | None = None
    """A checkpoint every N tokens (default: ``n_checkpoints`` evenly spaced, as SAELens)."""
    center_estimation_tokens: int = 10_000
    """Tokens used to estimate the per-layer means when ``sae.normalization == "center"``."""
    encoder_matmul_dtype: MatmulDtype = "auto"
    """Dtype of the encoder's dense matmul (auto: bfloat16 on CUDA, float32 on CPU)."""
    auxk_matmul_dtype: MatmulDtype = "auto"
    """Dtype of the dense AuxK products (auto: bfloat16 on CUDA and on CPUs with native bf16
    GEMMs, float32 elsewhere); the auxiliary loss only."""
    tuned_lens: str | None = None
    """Tuned-lens translators applied before the encoder (a lens directory or resource id)."""
    log_every_steps: int = 10
    """Record loss, FVU, L0 and dead fraction every N steps (``training_log.json``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("encoder_matmul_dtype", "auxk_matmul_dtype"):
            if getattr(self, name) not in MATMUL_DTYPE_CHOICES:
                raise MLSAEError(f"{name} must be one of {MATMUL_DTYPE_CHOICES}, got {getattr(self, name)!r}")

    @property
    def effective_dead_tokens_threshold(self) -> int:
        if self.dead_tokens_threshold is not None:
            return self.dead_tokens_threshold
        return max(1, self.dead_feature_window * self.train_batch_size_tokens)

    def checkpoint_thresholds(self) -> list[int]:
        """Token counts after which a checkpoint is written (never at the very end)."""
        total = self.training_tokens
        every = self.checkpoint_every_tokens
        if every is None:
            if self.n_checkpoints <= 0:
                return []
            every = math.ceil(total / (self.n_checkpoints + 1))  # SAELens' spacing
        return list(range(every, total, every))


def as_multilayer_config(cfg: LanguageModelSAERunnerConfig) -> MultiLayerSAERunnerConfig:
    """``cfg`` as a :class:`MultiLayerSAERunnerConfig`: the same values, and this module's
    defaults for the fields SAELens lacks."""
    if isinstance(cfg, MultiLayerSAERunnerConfig):
        return cfg
    if not isinstance(cfg.sae, MultiLayerTrainingSAEConfig):
        raise TypeError(
            f"cfg.sae is a {type(cfg.sae).__name__}; MultiLayerSAETrainingRunner trains a "
            "MultiLayerTrainingSAEConfig (mlsae_lens.MultiLayerTrainingSAEConfig)"
        )
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LanguageModelSAERunnerConfig) if f.init}
    checkpoint_path = values.pop("checkpoint_path")
    converted = MultiLayerSAERunnerConfig(**{**values, "verbose": False})
    converted.checkpoint_path = checkpoint_path  # already made unique by SAELens' __post_init__
    converted.verbose = cfg.verbose
    return converted


def saelens_config_from_run(run_cfg: Any, model: Any, device: str) -> MultiLayerSAERunnerConfig:
    """The SAELens config of an ``mlsae-lens train`` run (a :class:`mlsae_lens.config.
    MultiLayerRunnerConfig` whose ``model_batch_size`` is resolved) on ``model`` (its sizes and
    its tokenizer's special tokens). The run directory is ``output_path``; checkpoints are in its
    ``checkpoints/``. The corpus comes as ``override_dataset`` (pre-tokenized contexts)."""
    from mlsae_lens.checkpoint import CHECKPOINT_DIR
    from mlsae_lens.data import special_token_ids

    n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
    # The steps SAELens' scheduler is built for (SAETrainerConfig.total_training_steps).
    total_steps = max(1, run_cfg.training_tokens // run_cfg.batch_size_tokens)
    schedule: dict[str, Any] = {"lr_scheduler_name": "constant", "lr_decay_steps": 0}
    if run_cfg.lr_decay == "cosine":  # to zero over the steps after warm-up
        schedule = {"lr_scheduler_name": "cosineannealing", "lr_end": 0.0, "lr_decay_steps": 0}
    elif run_cfg.lr_decay == "linear":  # SAELens' linear decay phase, from lr to zero
        schedule["lr_decay_steps"] = max(1, total_steps - run_cfg.lr_warm_up_steps)
    sae = MultiLayerTrainingSAEConfig(
        d_in=d_model,
        d_sae=run_cfg.expansion_factor * d_model,
        k=run_cfg.k,
        n_layers=n_layers,
        normalization=run_cfg.normalization,
        tuned_lens=run_cfg.tuned_lens is not None,
        aux_k=run_cfg.aux_k,
        aux_coefficient=run_cfg.aux_coefficient,
        device=device,
    )
    cfg = MultiLayerSAERunnerConfig(
        sae=sae,
        model_name=run_cfg.model_name,
        model_class_name={v: k for k, v in MODEL_CLASS_BACKENDS.items()}[run_cfg.model_backend],
        hook_name=f"blocks.{n_layers - 1}.hook_resid_post",
        dataset_path=run_cfg.dataset,
        is_dataset_tokenized=True,
        streaming=False,
        context_size=run_cfg.context_size,
        prepend_bos=False,  # the corpus is packed already (mlsae_lens.data)
        exclude_special_tokens=special_token_ids(model.tokenizer),
        training_tokens=run_cfg.training_tokens,
        train_batch_size_tokens=run_cfg.batch_size_tokens,
        n_batches_in_buffer=run_cfg.contexts_per_chunk,
        store_batch_size_prompts=run_cfg.model_batch_size,
        lr=run_cfg.lr,
        adam_beta1=run_cfg.adam_beta1,
        adam_beta2=run_cfg.adam_beta2,
        adam_eps=run_cfg.adam_eps,
        lr_warm_up_steps=run_cfg.lr_warm_up_steps,
        **schedule,
        dead_tokens_threshold=run_cfg.effective_dead_tokens_threshold,
        checkpoint_every_tokens=run_cfg.effective_checkpoint_every_tokens,
        center_estimation_tokens=run_cfg.center_estimation_tokens,
        encoder_matmul_dtype=run_cfg.encoder_matmul_dtype,
        auxk_matmul_dtype=run_cfg.auxk_matmul_dtype,
        tuned_lens=run_cfg.tuned_lens,
        log_every_steps=run_cfg.log_every_steps,
        use_cached_activations=run_cfg.activation_cache is not None,
        cached_activations_path=run_cfg.activation_cache,
        output_path=str(run_cfg.output_dir),
        device=device,
        seed=run_cfg.seed,
        logger=LoggingConfig(log_to_wandb=run_cfg.log_to_wandb, wandb_project=run_cfg.wandb_project),
        verbose=False,
    )
    cfg.checkpoint_path = f"{run_cfg.output_dir}/{CHECKPOINT_DIR}"
    return cfg
