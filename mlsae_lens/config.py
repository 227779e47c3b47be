"""The flags of ``mlsae-lens train``: one dataclass, every field documented, kept as ``run.json``.

The CLI builds its flags from these fields (help text from each field's ``help``), so a new
option needs one line here. Cross-field checks raise :class:`MLSAEError` with the fix, before
anything loads. Training maps these onto SAELens' runner config
(:func:`mlsae_lens.runner_config.saelens_config_from_run`); ``eval`` and ``analyze`` read them
back from ``run.json`` to load the same model and corpus split.
"""

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

from mlsae_lens.errors import MLSAEError

MatmulDtype = Literal["auto", "float32", "bfloat16"]
"""Type of ``encoder_matmul_dtype`` and ``auxk_matmul_dtype`` (CLI and SAELens-style configs)."""
MATMUL_DTYPE_CHOICES: tuple[str, ...] = get_args(MatmulDtype)

# Spelled out here rather than imported from mlsae_lens.normalization: this module is read by
# `mlsae-lens --help`, which must not import torch (tests/test_cli.py checks both agree).
NormalizationMode = Literal["standardize", "center", "none"]
NORMALIZATION_MODES: tuple[str, ...] = get_args(NormalizationMode)

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_CORPUS = "embedded"


def option(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help})


@dataclass
class MultiLayerRunnerConfig:
    """Everything that determines an ``mlsae-lens train`` run, as the user gave it."""

    model_name: str = option(
        EMBEDDED_MODEL,
        "the embedded default SmolLM2-135M-Instruct (works offline), a local directory holding a "
        "Hugging Face causal LM (config.json, weights, tokenizer; offline), a hub id (bridge), or "
        "a TransformerLens model name such as pythia-70m-deduped (hooked; needs the hub)",
    )
    model_backend: Literal["bridge", "hooked"] = option(
        "bridge",
        "how TransformerLens wraps the model: bridge (TransformerBridge around the Hugging Face "
        "model; any supported causal LM) or hooked (HookedTransformer; removed in TransformerLens 4)",
    )
    dataset: str = option(
        EMBEDDED_CORPUS,
        "corpus: 'embedded' (English text shipped with Python), a local .txt/.jsonl/.parquet "
        "file or directory, or a Hugging Face dataset name (streamed; needs the hub)",
    )
    text_column: str | None = option(
        None, "text column of a jsonl/parquet/hub dataset (default: 'text', else the only string column)"
    )
    context_size: int = option(128, "tokens per context")
    test_fraction: float = option(0.1, "fraction of contexts held out as the test split")
    max_corpus_tokens: int | None = option(
        None, "read at most this many corpus tokens (default: all of a local corpus)"
    )
    tuned_lens: str | None = option(
        None,
        "tuned-lens translators applied to every layer before the encoder (paper §4.4): a lens "
        "directory (params.pt + config.json, e.g. from `mlsae-lens train-lens`), 'pretrained' "
        "(tuned-lens' lens for this model; needs the hub) or a tuned-lens resource id",
    )
    expansion_factor: int = option(
        8, "R: the SAE has R * d_model latents (the paper uses 64; 8 keeps CPU runs short)"
    )
    k: int = option(32, "latents kept per (token, layer) vector by TopK")
    normalization: NormalizationMode = option(
        "standardize",
        "input normalization: standardize (per vector, the reference default), "
        "center (subtract each layer's dataset mean) or none",
    )
    training_tokens: int = option(
        50_000, "training tokens (each brings n_layers vectors); special tokens do not count"
    )
    batch_size_tokens: int = option(
        64,
        "tokens per optimizer step (x n_layers vectors); never chosen from memory like "
        "--model-batch-size, because it changes what is trained",
    )
    contexts_per_chunk: int = option(
        32, "contexts harvested together; their tokens are shuffled across contexts and layers"
    )
    model_batch_size: int | None = option(
        None,
        "contexts per model forward pass (memory and speed only, not what is trained) (default: "
        "sized from the device's free memory, logged and recorded in run.json (a resumed run "
        "reuses the recorded value)",
    )
    encoder_matmul_dtype: MatmulDtype = option(
        "auto", "dtype of the encoder's dense matmul, the one O(d_sae) step: auto = bfloat16 (and TF32 "
        "elsewhere) on CUDA, float32 on CPU; parameters, gradients and Adam stay float32"
    )
    auxk_matmul_dtype: MatmulDtype = option(
        "auto", "dtype of the AuxK loss's dense products over the dead latents: auto = bfloat16 on CUDA "
        "and on CPUs with native bf16 GEMMs (AVX512-BF16 or AMX), float32 elsewhere"
    )
    lr: float = option(1e-4, "Adam learning rate (reference: 1e-4)")
    adam_eps: float = option(6.25e-10, "Adam epsilon (reference: 6.25e-10)")
    adam_beta1: float = option(0.9, "Adam beta1")
    adam_beta2: float = option(0.999, "Adam beta2")
    lr_warm_up_steps: int = option(0, "linear learning-rate warm-up steps")
    lr_decay: Literal["none", "linear", "cosine"] = option(
        "none", "learning-rate decay to zero over training after warm-up: none, linear, cosine"
    )
    dead_tokens_threshold: int | None = option(
        None,
        "a latent is dead after this many tokens without firing at any layer "
        "(default: min(10M, training_tokens // 10); 10M is Gao et al.'s choice)",
    )
    aux_k: int | None = option(None, "dead latents in the AuxK loss (default: d_model // 2)")
    aux_coefficient: float = option(1 / 32, "AuxK loss coefficient (Gao et al.: 1/32)")
    center_estimation_tokens: int = option(
        10_000, "tokens used to estimate the per-layer means for --normalization center"
    )
    checkpoint_every_tokens: int | None = option(
        None, "write a checkpoint every N training tokens (default: a quarter of the run)"
    )
    log_every_steps: int = option(10, "record loss, FVU, L0 and dead fraction every N steps")
    output_dir: str | None = option(
        None, "run directory (SAE, checkpoints, logs, report); default: a fresh runs/mlsae-<time>"
    )
    resume: bool = option(False, "continue the run in --output-dir from its latest checkpoint")
    overwrite: bool = option(
        False, "replace the mlsae-lens run already in --output-dir (other files there are kept)"
    )
    seed: int = option(42, "random seed (weights and data order)")
    device: str = option("auto", "cpu, cuda, or auto (cuda when available)")
    log_to_wandb: bool = option(False, "log metrics to Weights & Biases (off by default)")
    wandb_project: str = option("mlsae-lens", "Weights & Biases project")
    activation_cache: str | None = option(
        None,
        "read activations from a directory written by `mlsae-lens cache` instead of running the "
        "model (its model, layers and corpus must match this run's)",
    )

    def __post_init__(self) -> None:
        checks = [
            (self.k > 0, f"--k must be positive, got {self.k}"),
            (
                self.expansion_factor > 0,
                f"--expansion-factor (R) must be positive, got {self.expansion_factor}",
            ),
            (self.context_size >= 2, f"--context-size must be at least 2, got {self.context_size}"),
            (
                finite(self.test_fraction) and 0 < self.test_fraction < 1,
                f"--test-fraction must be between 0 and 1, got {self.test_fraction}",
            ),
            (self.training_tokens > 0, f"--training-tokens must be positive, got {self.training_tokens}"),
            (self.batch_size_tokens > 0, "--batch-size-tokens must be positive"),
            (self.contexts_per_chunk > 0, "--contexts-per-chunk must be positive"),
            (
                self.model_batch_size is None or self.model_batch_size > 0,
                f"--model-batch-size must be positive, got {self.model_batch_size}",
            ),
            (finite(self.lr) and self.lr > 0, f"--lr must be a positive finite number, got {self.lr}"),
            (
                finite(self.adam_eps) and self.adam_eps >= 0,
                f"--adam-eps must be a finite number >= 0, got {self.adam_eps}",
            ),
            (
                finite(self.adam_beta1) and 0 <= self.adam_beta1 < 1,
                f"--adam-beta1 must be in [0, 1) (e.g. 0.9), got {self.adam_beta1}",
            ),
            (
                finite(self.adam_beta2) and 0 <= self.adam_beta2 < 1,
                f"--adam-beta2 must be in [0, 1) (e.g. 0.999), got {self.adam_beta2}",
            ),
            (
                self.lr_warm_up_steps >= 0,
                f"--lr-warm-up-steps must be 0 or more, got {self.lr_warm_up_steps}",
            ),
            (
                self.dead_tokens_threshold is None or self.dead_tokens_threshold > 0,
                f"--dead-tokens-threshold must be positive, got {self.dead_tokens_threshold}",
            ),
            (self.aux_k is None or self.aux_k > 0, f"--aux-k must be positive, got {self.aux_k}"),
            (
                finite(self.aux_coefficient) and self.aux_coefficient >= 0,
                f"--aux-coefficient must be a finite number >= 0 (0 turns AuxK off), got {self.aux_coefficient}",
            ),
            (
                self.center_estimation_tokens > 0,
                f"--center-estimation-tokens must be positive, got {self.center_estimation_tokens}",
            ),
            (
                self.checkpoint_every_tokens is None or self.checkpoint_every_tokens > 0,
                f"--checkpoint-every-tokens must be positive, got {self.checkpoint_every_tokens}; "
                "omit it for a checkpoint every quarter of the run",
            ),
            (
                self.log_every_steps > 0,
                f"--log-every-steps must be positive, got {self.log_every_steps}",
            ),
            (
                self.max_corpus_tokens is None or self.max_corpus_tokens > 0,
                f"--max-corpus-tokens must be positive, got {self.max_corpus_tokens}; omit it to read the whole corpus",
            ),
            # The data order seeds generators with seed * 1_000_003 + chunk, which must fit 64 bits.
            (0 <= self.seed < 2**32, f"--seed must be between 0 and {2**32 - 1}, got {self.seed}"),
            (bool(str(self.output_dir).strip()), "--output-dir must name a directory, got ''"),
            (bool(self.model_name.strip()), "--model-name is empty; name a model, e.g. SmolLM2-135M-Instruct"),
            (bool(self.dataset.strip()), "--dataset is empty; pass 'embedded', a file or directory, or a dataset name"),
            (
                self.text_column is None or bool(self.text_column.strip()),
                "--text-column is empty; name a column or omit the flag",
            ),
            (
                self.activation_cache is None or bool(self.activation_cache.strip()),
                "--activation-cache is empty; name a directory written by `mlsae-lens cache` or omit the flag",
            ),
            (
                self.normalization in NORMALIZATION_MODES,
                f"--normalization must be one of {NORMALIZATION_MODES}, got {self.normalization!r}",
            ),
            *(
                (getattr(self, name) in MATMUL_DTYPE_CHOICES,
                 f"--{name.replace('_', '-')} must be auto, float32 or bfloat16, got {getattr(self, name)!r}")
                for name in ("encoder_matmul_dtype", "auxk_matmul_dtype")
            ),
            (
                self.lr_decay in ("none", "linear", "cosine"),
                f"--lr-decay must be none, linear or cosine, got {self.lr_decay!r}",
            ),
            (
                self.tuned_lens is None or bool(self.tuned_lens.strip()),
                "--tuned-lens must name a lens directory, 'pretrained' or a resource id; got ''",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise MLSAEError(message)
        # Availability is checked where the run starts (the CLI, resolve_device): a run.json written
        # on a GPU machine must still load on a CPU-only one for analyze and eval.
        check_device(self.device, require_available=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MultiLayerRunnerConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})

    def load_token_splits(self, tokenizer: Any) -> Any:
        """The run's train/test splits: the same call at training and at analysis time, so
        analysis sees exactly the contexts training held out."""
        from mlsae_lens.data import load_token_splits

        return load_token_splits(
            self.dataset,
            tokenizer=tokenizer,
            context_size=self.context_size,
            test_fraction=self.test_fraction,
            max_tokens=self.max_corpus_tokens,
            seed=self.seed,
            text_column=self.text_column,
        )

    @property
    def effective_dead_tokens_threshold(self) -> int:
        if self.dead_tokens_threshold is not None:
            return self.dead_tokens_threshold
        return max(1, min(10_000_000, self.training_tokens // 10))

    @property
    def effective_checkpoint_every_tokens(self) -> int:
        if self.checkpoint_every_tokens is not None:
            return self.checkpoint_every_tokens
        return max(1, self.training_tokens // 4)


def finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_device(device: str, require_available: bool = True) -> None:
    """Refuse a device string torch cannot parse (``tpu``, ``cuda:x``) or (``require_available``)
    CUDA where there is none, before anything loads. ``auto`` picks CUDA when available."""
    if device == "auto":
        return
    import torch  # here, not at the top: `mlsae-lens --help` reads this module

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise MLSAEError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise MLSAEError(f"--device {device!r} is not supported; use cpu, cuda, cuda:N or auto")
    if not require_available:
        return
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise MLSAEError(f"--device {device} was asked for but CUDA is not available; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise MLSAEError(f"--device {device}: this machine has {n} CUDA device(s); use cuda:0 to cuda:{n - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise MLSAEError(f"--device {device} was asked for but MPS is not available; use --device cpu")


# Fields that may differ when resuming a run: they do not change what was trained so far.
RESUMABLE_FIELDS = {"resume", "overwrite", "training_tokens", "encoder_matmul_dtype", "auxk_matmul_dtype",
                    "checkpoint_every_tokens", "log_every_steps",
                    "device", "log_to_wandb", "wandb_project", "output_dir"}
