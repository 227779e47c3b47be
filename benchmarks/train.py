"""One SAE training step: the MLSAE (sparse and dense-reference paths), SAELens' TopK SAE, and
the floor (the encoder matmul + top-k that any TopK SAE must do)."""

from collections.abc import Callable

import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput

from mlsae_lens.sae import MultiLayerTrainingSAE, MultiLayerTrainingSAEConfig

DEAD_FRACTION = 0.1
"""Share of latents marked dead, so the AuxK path runs in both SAEs."""


def make_adam(params, fused: bool) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=1e-4, fused=True) if fused else torch.optim.Adam(params, lr=1e-4)


def dead_mask(d_sae: int) -> torch.Tensor:
    return torch.arange(d_sae) % round(1 / DEAD_FRACTION) == 0


def step_input(x: torch.Tensor, dead: torch.Tensor) -> TrainStepInput:
    return TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)


def mlsae_step(d_in: int, d_sae: int, k: int, vectors: int, n_layers: int = 8, dense: bool = False,
               fused_adam: bool = True, dead_fraction: float = DEAD_FRACTION) -> Callable[[], None]:
    """The work of ``MultiLayerSAETrainingRunner.step``: forward, backward, radial-gradient
    removal, Adam, decoder renormalization (``vectors`` = tokens × layers)."""
    cfg = MultiLayerTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, n_layers=n_layers)
    sae = MultiLayerTrainingSAE(cfg)
    sae.dense = dense
    opt = make_adam(sae.parameters(), fused_adam)
    x = torch.randn(vectors // n_layers, n_layers, d_in)
    dead = dead_mask(d_sae) if dead_fraction > 0 else torch.zeros(d_sae, dtype=torch.bool)

    def step() -> None:
        out = sae.training_forward_pass(step_input(x, dead))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()

    return step


def saelens_step(d_in: int, d_sae: int, k: int, vectors: int, fused_adam: bool = True) -> Callable[[], None]:
    """SAELens' ``TopKTrainingSAE``: ``training_forward_pass`` + backward + Adam."""
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    opt = make_adam(sae.parameters(), fused_adam)
    x = torch.randn(vectors, d_in)
    dead = dead_mask(d_sae)

    def step() -> None:
        out = sae.training_forward_pass(step_input(x, dead))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return step


def floor_step(d_in: int, d_sae: int, k: int, vectors: int) -> Callable[[], None]:
    """The encoder matmul and top-k of the same batch: the part no TopK SAE can skip."""
    x = torch.randn(vectors, d_in)
    W = torch.randn(d_in, d_sae) / d_in**0.5
    b = torch.zeros(d_sae)

    def step() -> None:
        with torch.no_grad():
            torch.addmm(b, x, W).topk(k, dim=-1, sorted=False)

    return step
