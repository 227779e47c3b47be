"""Contexts per model forward pass chosen from the memory the device has free.

The model batch (``--model-batch-size`` of ``train``/``train-lens``, ``--batch-size`` of
``analyze``/``eval``) only trades memory for throughput: the contexts are harvested either way.
So by default it is sized from the free memory instead of a fixed 8 that is too small for a GPU
and can be too large for a small machine. The optimizer batch (``--batch-size-tokens``) is
never chosen this way: it changes what is trained.

The estimate is an upper bound of what one context adds to the peak of a TransformerLens
forward that keeps every ``blocks.{l}.hook_resid_post``: the all-layer output and the stream's
copy of it (they live across all layers), plus the transients of the largest block (they are freed before the
next block runs under ``inference_mode``), plus the logits when the caller computes them
(:func:`mlsae_lens.activations.harvest_resid_post` stops before the unembedding, so it does not).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mlsae_lens.errors import MLSAEError

logger = logging.getLogger(__name__)

FLOAT_BYTES = 4
"""Activations are counted as float32 (an upper bound for bf16/fp16 models, whose
harvested activations are cast to float32 anyway)."""

DEFAULT_FRACTION = 0.25
"""Share of free memory the forward may use. The rest is for what is not counted here and
is allocated after the batch size is chosen (the SAE, its optimizer and dense
pre-activations, the shuffled chunk buffer) and, on the CPU, for other processes."""

MAX_BATCH_CPU = 16
"""On the CPU a forward of a thousand tokens already keeps the cores busy in its GEMMs; more
contexts per forward only hold more memory. Measured (SmolLM2-135M, 128-token contexts, 2
cores): ~570 tokens/s at 8 and at 16 contexts, 338 tokens/s at 64 (peak ~950 MiB)."""

MAX_BATCH_CUDA = 512
"""On a GPU a small model needs a few hundred contexts to fill the device; beyond that the
forward is no faster and the peak only grows (and a bad estimate costs more)."""

_CGROUP = Path("/sys/fs/cgroup")


def forward_bytes_per_context(
    model_cfg: Any, context_size: int, *, logits: bool = False, extra_bytes_per_token: int = 0
) -> int:
    """Upper bound of the peak memory one context adds to an all-layer cached forward.

    Args:
        model_cfg: A ``HookedTransformerConfig`` (``n_layers``, ``d_model``, ``n_heads``,
            ``d_head``, ``d_mlp``, ``d_vocab``).
        context_size: Tokens per context.
        logits: Whether the forward computes the logits (counted twice: logits and their
            log-softmax), as the spliced downstream metrics of ``eval`` do.
        extra_bytes_per_token: What the caller keeps per token on top (e.g. dense SAE
            pre-activations of the whole batch).

    Returns:
        Bytes per context.
    """
    n_layers, d_model = int(model_cfg.n_layers), int(model_cfg.d_model)
    n_heads, d_head = int(model_cfg.n_heads), int(model_cfg.d_head)
    d_mlp = int(model_cfg.d_mlp or 0)
    # Every layer's hook_resid_post in harvest_resid_post's output, and the copy the stream
    # makes when it drops special tokens and shuffles.
    cache = 2 * n_layers * d_model
    # One block's transients per token: residual copies (resid_pre/mid, two LayerNorm outputs,
    # attn_out, mlp_out), q/k/v/z, attention scores and pattern (a row of ctx per head each),
    # and the MLP's pre/post activations (and the gate of gated MLPs).
    block = 6 * d_model + 4 * n_heads * d_head + 2 * n_heads * context_size + 3 * d_mlp
    unembed = 2 * int(model_cfg.d_vocab) if logits else 0
    per_token = FLOAT_BYTES * (cache + block + unembed) + int(extra_bytes_per_token)
    return per_token * int(context_size)


def available_memory_bytes(device: torch.device | str) -> int:
    """Free memory on ``device``: ``torch.cuda.mem_get_info`` on CUDA; else the system's
    available RAM (psutil if installed, else ``MemAvailable`` of /proc/meminfo), capped by the
    room left under a cgroup-v2 memory limit (containers report the host's RAM otherwise)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    available = _system_available_bytes()
    room = _cgroup_room_bytes()
    return min(available, room) if room is not None else available


def auto_model_batch_size(
    model_cfg: Any,
    context_size: int,
    device: torch.device | str,
    *,
    logits: bool = False,
    extra_bytes_per_token: int = 0,
    fraction: float = DEFAULT_FRACTION,
    free_bytes: int | None = None,
) -> int:
    """Contexts per forward that fit in ``fraction`` of the free memory, in ``[1, cap]``.

    The cap is :data:`MAX_BATCH_CUDA` on CUDA and :data:`MAX_BATCH_CPU` elsewhere.

    Args:
        model_cfg: The model's ``HookedTransformerConfig``.
        context_size: Tokens per context.
        device: Where the forward runs.
        logits: Whether the forward computes logits (see :func:`forward_bytes_per_context`).
        extra_bytes_per_token: Caller's own memory per token.
        fraction: Share of the free memory to use, in ``(0, 1]``.
        free_bytes: Free memory to size for (default: :func:`available_memory_bytes`).
    """
    if not 0 < fraction <= 1:
        raise MLSAEError(f"the memory fraction must be in (0, 1], got {fraction}")
    if context_size < 1:
        raise MLSAEError(f"context_size must be positive, got {context_size}")
    per_context = forward_bytes_per_context(
        model_cfg, context_size, logits=logits, extra_bytes_per_token=extra_bytes_per_token
    )
    free = available_memory_bytes(device) if free_bytes is None else int(free_bytes)
    cap = MAX_BATCH_CUDA if torch.device(device).type == "cuda" else MAX_BATCH_CPU
    return max(1, min(cap, int(free * fraction) // per_context))


def resolve_model_batch_size(
    requested: int | None,
    model_cfg: Any,
    context_size: int,
    device: torch.device | str,
    *,
    what: str = "--model-batch-size",
    logits: bool = False,
    extra_bytes_per_token: int = 0,
    fraction: float = DEFAULT_FRACTION,
    free_bytes: int | None = None,
) -> int:
    """``requested`` if given, else :func:`auto_model_batch_size` (logged, so runs can be
    repeated with the same value). The one place every command picks its model batch.

    Args:
        requested: The user's value, or ``None`` for auto.
        what: The flag named in the log line.
        logits, extra_bytes_per_token, fraction, free_bytes: As for
            :func:`auto_model_batch_size`.
    """
    if requested is not None:
        if requested < 1:
            raise MLSAEError(f"{what} must be positive, got {requested}")
        return int(requested)
    free = available_memory_bytes(device) if free_bytes is None else int(free_bytes)
    chosen = auto_model_batch_size(
        model_cfg, context_size, device, logits=logits,
        extra_bytes_per_token=extra_bytes_per_token, fraction=fraction, free_bytes=free,
    )
    per_context = forward_bytes_per_context(
        model_cfg, context_size, logits=logits, extra_bytes_per_token=extra_bytes_per_token
    )
    logger.info(
        "%s auto = %d contexts per forward (%.1f MiB each; %.0f%% of %.0f MiB free on %s); "
        "pass %s N to override",
        what, chosen, per_context / 2**20, 100 * fraction, free / 2**20, torch.device(device), what,
    )
    return chosen


# ---------------------------------------------------------------------- helpers


def _system_available_bytes() -> int:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise MLSAEError(
        "cannot tell how much memory is free on this system (no psutil, no /proc/meminfo): "
        "pass the batch size explicitly (--model-batch-size / --batch-size)"
    )


def _cgroup_room_bytes() -> int | None:
    """``memory.max - memory.current`` of this process' cgroup v2, or None without a limit."""
    try:
        limit = (_CGROUP / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((_CGROUP / "memory.current").read_text()))
    except (OSError, ValueError):
        return None
