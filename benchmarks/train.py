"""One SAE training step: the MLSAE (its trainer's ``_train_step``, sparse and dense-reference
paths), SAELens' TopK SAE, and the floor (the encoder matmul + top-k that any TopK SAE must do)."""

from collections.abc import Callable

import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput

from mlsae_lens.runner_config import MultiLayerSAERunnerConfig
from mlsae_lens.sae import MultiLayerTrainingSAE, MultiLayerTrainingSAEConfig
from mlsae_lens.trainer import MultiLayerSAETrainer

DEAD_FRACTION = 0.1
"""Share of latents marked dead, so the AuxK path runs in both SAEs."""


def make_adam(params, fused: bool) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=1e-4, fused=True) if fused else torch.optim.Adam(params, lr=1e-4)


def dead_mask(d_sae: int, device: str = "cpu", fraction: float = DEAD_FRACTION) -> torch.Tensor:
    return torch.arange(d_sae, device=device) % round(1 / fraction) == 0


def gpu_matmul_dtype(device: str) -> torch.dtype | None:
    """What the runner uses on ``device`` (``--encoder-matmul-dtype auto``), for a like-for-like step."""
    from mlsae_lens.training import encoder_matmul_dtype

    return encoder_matmul_dtype("auto", device)


def step_input(x: torch.Tensor, dead: torch.Tensor) -> TrainStepInput:
    return TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)


def mlsae_trainer(sae: MultiLayerTrainingSAE, batch_tokens: int, device: str) -> MultiLayerSAETrainer:
    """The trainer ``mlsae-lens train`` uses, around ``sae``, without a data provider."""
    cfg = MultiLayerSAERunnerConfig(sae=sae.cfg, training_tokens=10**12, train_batch_size_tokens=batch_tokens,
                                    dead_tokens_threshold=10**12, device=device, verbose=False)
    return MultiLayerSAETrainer(cfg.to_sae_trainer_config(), sae, data_provider=None, runner_cfg=cfg)


def mlsae_step(d_in: int, d_sae: int, k: int, vectors: int, n_layers: int = 8, dense: bool = False,
               fused_adam: bool = True, dead_fraction: float = DEAD_FRACTION, device: str = "cpu",
               auxk_dtype: str = "auto") -> Callable[[], None]:
    """``MultiLayerSAETrainer._train_step``, the step training runs: forward, backward, radial-gradient
    removal, Adam, decoder renormalization, dead-latent counters (``vectors`` = tokens × layers).
    The counters are reset before each step so that the same ``dead_fraction`` stays dead.
    ``auxk_dtype`` is ``--auxk-matmul-dtype`` (``auto``, as the runner resolves it on ``device``)."""
    from mlsae_lens.training import auxk_matmul_dtype

    cfg = MultiLayerTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, n_layers=n_layers, device=device)
    sae = MultiLayerTrainingSAE(cfg).to(device)
    sae.dense = dense
    sae.matmul_dtype = gpu_matmul_dtype(device)
    sae.aux_matmul_dtype = auxk_matmul_dtype(auxk_dtype, device)
    trainer = mlsae_trainer(sae, vectors // n_layers, device)
    if not fused_adam:
        trainer.optimizer = make_adam(sae.parameters(), False)
        trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda _: 1.0)
    x = torch.randn(vectors // n_layers, n_layers, d_in, device=device)
    dead = dead_mask(d_sae, device, dead_fraction) if dead_fraction > 0 else torch.zeros(d_sae, dtype=torch.bool, device=device)
    since_fired = torch.where(dead, 10**12, 0)

    def step() -> None:
        trainer.tokens_since_fired.copy_(since_fired)
        trainer._train_step(sae, x)

    return step


def saelens_step(d_in: int, d_sae: int, k: int, vectors: int, fused_adam: bool = True,
                 device: str = "cpu") -> Callable[[], None]:
    """SAELens' ``TopKTrainingSAE``: ``training_forward_pass`` + backward + Adam; on CUDA under
    bf16 autocast, as SAELens' runner does with ``autocast=True`` (its fastest GPU setting)."""
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, device=device)).to(device)
    opt = make_adam(sae.parameters(), fused_adam)
    x = torch.randn(vectors, d_in, device=device)
    dead = dead_mask(d_sae, device)
    on_cuda = str(device).startswith("cuda")

    def step() -> None:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=on_cuda):
            out = sae.training_forward_pass(step_input(x, dead))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return step


SPARSIFY_INSTALL = "pip install --no-deps eai-sparsify==1.3.3 natsort==8.4.0 schedulefree==1.4.1"
"""How the benchmark's sparsify peer is installed beside the project (its other import-time
dependencies are already pinned here); without it the peer is skipped with a note."""


def sparsify_module():
    """EleutherAI's ``sparsify`` if installed, else ``None``. Its import prints which decoder it
    uses on stdout; that goes to stderr so that ``--json`` output stays one JSON object."""
    import contextlib
    import importlib.util
    import sys

    if importlib.util.find_spec("sparsify") is None:
        return None
    with contextlib.redirect_stdout(sys.stderr):
        import sparsify
    return sparsify


def sparsify_step(d_in: int, d_sae: int, k: int, vectors: int, fused_adam: bool = True,
                  device: str = "cpu") -> Callable[[], None] | None:
    """sparsify's ``SparseCoder`` step as its ``Trainer`` runs it with ``loss_fn="fvu"``: decoder
    renormalization, forward with the dead mask (AuxK, alpha 1/32 like the MLSAE), backward,
    radial-gradient removal, Adam. On CUDA its forward runs under its own bf16 autocast and its
    Triton decoder when Triton is installed; on CPU its eager ``embedding_bag`` path. Its AuxK
    trains the decoder only (its fused encoder's backward ignores the pre-activations' gradient).
    ``None`` when sparsify is not installed."""
    sparsify = sparsify_module()
    if sparsify is None:
        return None
    sae = sparsify.SparseCoder(d_in, sparsify.SparseCoderConfig(num_latents=d_sae, k=k), device=device)
    opt = make_adam(sae.parameters(), fused_adam)
    x = torch.randn(vectors, d_in, device=device)
    dead = dead_mask(d_sae, device)

    def step() -> None:
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=dead)
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()

    return step


def floor_step(d_in: int, d_sae: int, k: int, vectors: int, device: str = "cpu") -> Callable[[], None]:
    """The encoder matmul and top-k of the same batch: the part no TopK SAE can skip (in the
    dtype the MLSAE step uses for it on ``device``). The pre-activations go into one reused
    buffer, as in the MLSAE step: a fresh ``[vectors, d_sae]`` tensor per call would add the
    page faults of mapping it (~12 % of this floor on CPU) to the floor."""
    dtype = gpu_matmul_dtype(device) or torch.float32
    x = torch.randn(vectors, d_in, device=device, dtype=dtype)
    W = (torch.randn(d_in, d_sae, device=device) / d_in**0.5).to(dtype)
    b = torch.zeros(d_sae, device=device, dtype=dtype)
    out = torch.empty(vectors, d_sae, device=device, dtype=dtype)

    def step() -> None:
        with torch.no_grad():
            torch.addmm(b, x, W, out=out).topk(k, dim=-1, sorted=False)

    return step
