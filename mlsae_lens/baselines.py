"""What users would pick instead of an MLSAE: one SAELens TopK SAE per layer, or rank-k PCA.

Both baselines see the MLSAE's own normalized space, so FVUs are comparable:

* :func:`train_saelens_per_layer` trains one ``sae_lens.TopKTrainingSAE`` per layer with
  SAELens' own ``MultiSAETrainer`` (one ``SAETrainer`` per SAE, stepped in lockstep). The data
  is the MLSAE run's own training stream (same contexts, same order, same token count), each
  chunk harvested once and sliced per layer, normalized exactly as the MLSAE normalizes. After
  training the normalization is folded into the saved SAE (``standardize`` is SAELens'
  ``layer_norm``; a ``center`` shift goes into the biases), so a saved SAE reads raw
  ``blocks.{l}.hook_resid_post`` activations with ``SAE.load_from_disk``.
* :class:`PCABaseline` is the mean plus the top-k eigenvectors of each layer's covariance in
  the normalized space (fit by :meth:`mlsae_lens.evals.ReconstructionStats.pca`).

Every method exposes ``reconstruct(x) -> (recon, code)`` on ``[n, n_layers, d_in]`` raw
vectors; only the layers it was built for are meaningful.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from torch import Tensor

from mlsae_lens.checkpoint import atomic_save_sae, atomic_write_json
from mlsae_lens.config import MultiLayerRunnerConfig
from mlsae_lens.errors import MLSAEError
from mlsae_lens.models import LanguageModel
from mlsae_lens.normalization import normalize
from mlsae_lens.progress import progress_bar
from mlsae_lens.sae import MultiLayerMixin, TopKOutput
from mlsae_lens.sae_files import check_sae_dir, read_cfg

logger = logging.getLogger(__name__)

SAELENS_PER_LAYER = "saelens-per-layer"
PCA = "pca"
BASELINES = (PCA, SAELENS_PER_LAYER)
TRAINING_FILE = "training.json"


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def topk_parameter_count(d_in: int, d_sae: int) -> int:
    """W_enc + W_dec + b_enc + b_dec of one TopK SAE."""
    return 2 * d_in * d_sae + d_sae + d_in


# ---------------------------------------------------------------------- methods


class MLSAEMethod:
    """The MLSAE itself, behind the same interface as the baselines."""

    name = "mlsae"
    label = "MLSAE"
    shared_dictionary = True

    def __init__(self, sae: MultiLayerMixin):
        self.sae = sae

    def reconstruct(self, x: Tensor) -> tuple[Tensor, TopKOutput]:
        out = self.sae.encode_full(x.to(self.sae.W_enc.device))
        # Model basis: de-normalize, then the exact inverse of the tuned lens (if any).
        recon = self.sae.from_normalized(self.sae.decode_topk_normalized(out.topk), out.norm_stats)
        return recon, out.topk


class PCABaseline:
    """Rank-k PCA per layer in the MLSAE's normalized space: ``μ + U Uᵀ (x_norm − μ)``."""

    name = PCA
    label = "PCA"
    shared_dictionary = False

    def __init__(self, sae: MultiLayerMixin, mean: Tensor, components: Tensor):
        self.sae = sae
        # Where the SAE lives: PCA is fitted on harvested (CPU) vectors but applied beside the SAE.
        device = sae.W_enc.device
        self.mean = mean.float().to(device)  # [n_layers, d_in]
        self.components = components.float().to(device)  # [n_layers, d_in, k]

    def reconstruct(self, x: Tensor) -> tuple[Tensor, None]:
        x_norm, stats = self.sae.normalize_input(x)
        centered = x_norm - self.mean
        coords = torch.einsum("nld,ldk->nlk", centered, self.components)
        recon = self.mean + torch.einsum("nlk,ldk->nld", coords, self.components)
        return self.sae.from_normalized(recon, stats), None


class PerLayerSAEs:
    """One SAELens SAE per evaluated layer, each reading raw activations of its layer.

    Layers without an SAE are returned unchanged (they are not evaluated).
    """

    name = SAELENS_PER_LAYER
    label = "SAELens per-layer TopK"
    shared_dictionary = False

    def __init__(self, saes: dict[int, SAE[Any]], k: int):
        self.saes = saes
        self.k = k

    def reconstruct(self, x: Tensor) -> tuple[Tensor, TopKOutput]:
        recon = x.clone()
        n, n_layers = x.shape[0], x.shape[1]
        values = x.new_zeros(n, n_layers, self.k)
        indices = torch.zeros(n, n_layers, self.k, dtype=torch.long, device=x.device)
        for layer, sae in self.saes.items():
            acts = sae.encode(x[:, layer].to(sae.device))
            recon[:, layer] = sae.decode(acts).to(x.dtype)
            top = acts.topk(self.k, dim=-1)
            values[:, layer], indices[:, layer] = top.values.relu().to(x.dtype), top.indices
        return recon, TopKOutput(values=values, indices=indices)


# ---------------------------------------------------------------------- per-layer SAEs


def per_layer_batches(
    store: Iterator[Tensor], sae: MultiLayerMixin, layers: Sequence[int], bar: progress_bar | None = None
) -> Iterator[dict[str, Tensor]]:
    """SAELens' multi-hook data provider: each harvested batch, normalized by the MLSAE's own
    normalization, sliced into one ``[batch, d_in]`` tensor per layer (``bar`` counts tokens:
    SAELens' own bar only moves every 100 steps)."""
    means = model_basis_layer_means(sae)
    for batch in store:
        # The model's own basis, even for a tuned-lens MLSAE: a per-layer SAE is what a user
        # would train instead, and an affine lens in front of one layer's SAE adds nothing.
        x_norm, _ = normalize(batch.to(sae.dtype), sae.cfg.normalization, means)
        if bar is not None:
            bar.update(batch.shape[0])
        yield {hook_name(layer): x_norm[:, layer].contiguous() for layer in layers}


@torch.no_grad()
def model_basis_layer_means(sae: MultiLayerMixin) -> Tensor | None:
    """The run's ``center`` means in the model's basis: a tuned-lens MLSAE stores them in the lens
    basis, and since each translator is affine, the inverse of the translated mean is the mean."""
    if sae.cfg.normalization != "center":
        return None
    return sae.from_lens_basis(sae.layer_means[None])[0]


@torch.no_grad()
def fold_normalization(sae: TopKTrainingSAE, mode: str, layer_mean: Tensor | None) -> None:
    """Make an SAE trained on normalized vectors read raw residual vectors.

    ``standardize`` is SAELens' ``layer_norm`` (mean and unbiased std over d_in, eps 1e-5 added
    to the std on the way in, times ``std`` on the way back: the ``reference`` convention of
    :mod:`mlsae_lens.normalization`), so it only changes the config. A ``center`` shift ``m``
    becomes part of the biases: encode sees ``x − m − b_dec``, decode adds ``b_dec + m``.
    """
    if mode == "standardize":
        sae.cfg.normalize_activations = "layer_norm"
        sae._setup_activation_normalization()
    elif mode == "center":
        assert layer_mean is not None
        m = layer_mean.to(sae.b_dec.dtype)
        if not sae.cfg.apply_b_dec_to_input:
            sae.b_enc -= m @ sae.W_enc
        sae.b_dec += m


def train_saelens_per_layer(
    sae: MultiLayerMixin,
    model: LanguageModel,
    train_tokens: Tensor,
    cfg: MultiLayerRunnerConfig,
    layers: Sequence[int],
    out_dir: Path,
    training_tokens: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train one SAELens TopK SAE per layer on the MLSAE run's training stream; save each
    to ``out_dir/layer_{l}`` (SAELens format) and ``out_dir/training.json``.

    Args:
        sae: The run's MLSAE (its normalization, width and k are copied).
        model: The run's model.
        train_tokens: The run's training split ``[contexts, ctx]`` (read through the run's own
            activations store: same contexts, order, shuffle and special-token exclusion).
        cfg: The run's config (batch size, lr, Adam betas, dead-latent window, seed).
        layers: Layers to train an SAE for.
        out_dir: Where the SAEs go.
        training_tokens: Tokens per SAE (default: the MLSAE's ``training_tokens``).
        device: Training device.

    Returns:
        The dict saved to ``training.json`` (seconds, tokens, hyper-parameters).
    """
    tokens = training_tokens or cfg.training_tokens
    if tokens <= 0:
        raise MLSAEError(f"--baseline-training-tokens must be positive, got {tokens}")
    from mlsae_lens.run_training import activations_store_for_run

    store = activations_store_for_run(cfg, model, train_tokens, device)
    scfg = sae.cfg
    torch.manual_seed(cfg.seed)
    saes = {
        f"layer_{layer}": TopKTrainingSAE(
            TopKTrainingSAEConfig(
                d_in=scfg.d_in,
                d_sae=scfg.d_sae,
                k=scfg.k,
                device=device,
                metadata=SAEMetadata(
                    model_name=cfg.model_name,
                    hook_name=hook_name(layer),
                    context_size=cfg.context_size,
                    prepend_bos=False,
                    dataset_path=cfg.dataset,
                ),
            )
        )
        for layer in layers
    }
    steps = math.ceil(tokens / cfg.batch_size_tokens)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * cfg.batch_size_tokens,
        train_batch_size_samples=cfg.batch_size_tokens,
        lr=cfg.lr,
        lr_end=cfg.lr,  # constant schedule (SAELens' runner config fills this in post-init)
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        device=device,
        dead_feature_window=max(1, cfg.effective_dead_tokens_threshold // cfg.batch_size_tokens),
        feature_sampling_window=max(1, steps),
        logger=LoggingConfig(log_to_wandb=False),
    )
    bar = progress_bar(total=trainer_cfg.total_training_samples, desc="per-layer SAEs", unit="tok")
    trainer = MultiSAETrainer(
        trainer_cfg,
        saes,  # type: ignore[arg-type]
        {name: hook_name(int(name.split("_")[1])) for name in saes},
        per_layer_batches(store, sae, layers, bar),
    )
    logger.info(
        "training %d SAELens TopK SAEs (d_sae=%d, k=%d) on %d tokens each",
        len(saes), scfg.d_sae, scfg.k, trainer_cfg.total_training_samples,
    )
    started = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - started
    bar.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    means = model_basis_layer_means(sae)  # one LU solve for every layer, not one per saved SAE
    for name, trained in saes.items():
        layer = int(name.split("_")[1])
        fold_normalization(trained, scfg.normalization, None if means is None else means[layer])
        target = out_dir / name
        target.mkdir(exist_ok=True)
        atomic_save_sae(trained, target)
    info = {
        "layers": list(layers),
        "tokens_per_layer": trainer_cfg.total_training_samples,
        "training_seconds": seconds,
        "d_in": scfg.d_in,
        "d_sae": scfg.d_sae,
        "k": scfg.k,
        "normalization": scfg.normalization,
        "batch_size_tokens": cfg.batch_size_tokens,
        "lr": cfg.lr,
        "trainer": "sae_lens.training.multi_sae_trainer.MultiSAETrainer",
        "basis": "model (hook_resid_post as is; a tuned-lens MLSAE's lens is not applied)",
        "data": "the MLSAE run's training stream (same contexts, order and seed), harvested once "
        "per chunk and sliced per layer",
    }
    atomic_write_json(out_dir / TRAINING_FILE, info)
    return info


def load_per_layer_saes(
    out_dir: Path, layers: Sequence[int], d_sae: int, k: int, device: str = "cpu"
) -> dict[int, SAE[Any]] | None:
    """The saved per-layer SAEs for ``layers`` if all are there with this width and k."""
    saes = {}
    for layer in layers:
        path = out_dir / f"layer_{layer}"
        if not (path / "cfg.json").is_file():
            return None
        try:  # a damaged or NaN baseline would load as it is and give absurd metrics
            check_sae_dir(path, read_cfg(path))
        except MLSAEError as exc:
            raise MLSAEError(f"{exc} (per-layer baseline; `mlsae-lens eval --retrain-baselines` trains it again)") from None
        loaded = SAE.load_from_disk(path, device=device)
        if loaded.cfg.d_sae != d_sae or getattr(loaded.cfg, "k", None) != k:
            return None
        loaded.eval()
        saes[layer] = loaded
    return saes


__all__ = [
    "BASELINES",
    "PCA",
    "SAELENS_PER_LAYER",
    "MLSAEMethod",
    "PCABaseline",
    "PerLayerSAEs",
    "fold_normalization",
    "load_per_layer_saes",
    "per_layer_batches",
    "topk_parameter_count",
    "train_saelens_per_layer",
]
