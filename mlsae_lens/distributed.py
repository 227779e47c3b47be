"""Data-parallel training over ``torch.distributed`` (``torchrun``): process-group helpers.

Every rank holds the whole SAE and sees the same *global* batch order; rank ``r`` trains on
its rows of each global batch (``torch.tensor_split``), so ``N`` ranks take the same steps as
one process with the same ``--batch-size-tokens``. Three things keep them exactly equivalent:

* **the loss is a global-batch quantity.** A layer's FVU is ``Σ_batch ||err||² / Σ_batch
  ||x - mean_batch(x)||²``: the denominator is a statistic of the whole batch. Each rank uses
  the *global* denominator (all-reduced mean, then all-reduced squared deviations:
  :func:`global_layer_variance`) over its *local* numerator; the local losses then sum to
  the single-process loss, so gradients are all-reduced with a **sum** (DDP's average of
  ``world_size × local loss`` is the same thing). AuxK uses the same denominators.
* **dead-latent counters stay identical**: per-latent firing counts are all-reduced with a sum
  and the token count is the global batch size.
* **the global batch is built identically on every rank**: the model forward passes of a
  chunk are dealt round-robin to the ranks and each result is broadcast from its owner
  (:meth:`MultiLayerActivationsStore.harvest_group`), so every rank shuffles the same chunk.

Rank 0 alone writes checkpoints and the final SAE. Without ``torchrun`` (no ``WORLD_SIZE``)
every helper is a no-op and training is the plain single-process loop.
"""

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from mlsae_lens.errors import MLSAEError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def maybe_init_distributed(device: str = "cpu") -> DistInfo:
    """Join the process group ``torchrun`` describes in ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``
    (gloo on CPU, nccl on CUDA); without those variables, a single process."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_available():
        raise MLSAEError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    logger.info("rank %d of %d (%s)", rank, world_size, backend)
    return DistInfo(rank, world_size, local_rank)


def rank_device(device: str, info: DistInfo) -> str:
    """``cuda`` → ``cuda:LOCAL_RANK`` so each rank on a node drives its own GPU."""
    if info.enabled and device == "cuda":
        return f"cuda:{info.local_rank}"
    return device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """Rank 0 (or a single process): the only writer of files."""
    return not is_distributed() or dist.get_rank() == 0


def maybe_all_reduce_(tensor: Tensor, op: str = "sum") -> Tensor:
    """In-place all-reduce (``sum`` or ``max``) across ranks; a no-op in one process."""
    if is_distributed():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def all_reduce_gradients_(parameters: Iterator[torch.nn.Parameter]) -> None:
    """Sum the gradients of every rank (the local losses are shares of the global loss)."""
    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective, not one per tensor
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def maybe_barrier() -> None:
    if is_distributed():
        dist.barrier()


def local_rows(batch: Tensor) -> Tensor:
    """This rank's rows of a global batch."""
    if not is_distributed():
        return batch
    return torch.tensor_split(batch, dist.get_world_size())[dist.get_rank()]


def global_layer_variance(x: Tensor) -> Tensor:
    """:func:`mlsae_lens.sae.per_layer_total_variance` of the *global* batch, from this rank's
    rows ``[n_local, n_layers, d]``: all-reduce the row count and per-layer sum for the global
    mean, then the squared deviations from it. Equal to the single-process value up to the
    order of floating-point summation."""
    x = x.detach()
    stats = torch.cat([x.sum(dim=0).reshape(-1), x.new_tensor([x.shape[0]])])
    maybe_all_reduce_(stats)
    mean = stats[:-1].view(x.shape[1:]) / stats[-1]
    var = (x - mean).pow(2).sum(dim=(0, 2))
    return maybe_all_reduce_(var).clamp_min(1e-12)
