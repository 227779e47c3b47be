"""The dense products of a TopK SAE step, and how they are made fast without changing results
beyond a stated tolerance: in which dtype, into which buffer, on which hardware.

Only the encoder's ``x @ W_enc`` is inherently dense (:mod:`mlsae_lens.sparse_ops` keeps the rest
sparse); the AuxK block over the dead latents is dense too when few latents are dead. Pure tensor
code: no I/O, no configuration (``mlsae_lens.training`` maps the ``*_matmul_dtype`` options here).
"""

import torch
from torch import Tensor


def pre_activations(
    centered: Tensor, W_enc: Tensor, b_enc: Tensor, matmul_dtype: torch.dtype | None, out: Tensor | None = None
) -> Tensor:
    """``centered @ W_enc + b_enc`` in one ``addmm`` (optionally in a low-precision dtype),
    written into ``out`` when given (see :class:`PreActivationBuffer`)."""
    if matmul_dtype is not None and matmul_dtype != W_enc.dtype:
        return torch.addmm(b_enc.to(matmul_dtype), centered.to(matmul_dtype), W_enc.to(matmul_dtype), out=out)
    return torch.addmm(b_enc, centered, W_enc, out=out)


class PreActivationBuffer:
    """One ``[N, d_sae]`` buffer reused for the pre-activations of successive training steps.

    Why: on CPU a fresh tensor this large (over glibc's 32 MiB mmap threshold) is mapped anew
    at every step and page-faulted in by its first write. At d_sae 4608 and 4096 vectors that
    cost 45 ms of a 300 ms ``addmm`` (one thread); a reused buffer skips it, with the same
    values. The pre-activations never outlive a step (:class:`mlsae_lens.sparse_ops.SparseTopKEncode` frees them
    once the top-k is taken), so one buffer per SAE suffices. CUDA's caching allocator already
    reuses memory, so there :meth:`get` returns ``None`` (a fresh tensor).
    """

    def __init__(self) -> None:
        self.buffer: Tensor | None = None

    def get(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        if device.type != "cpu":
            return None
        buffer = self.buffer
        if buffer is None or buffer.shape != (rows, cols) or buffer.dtype != dtype or buffer.device != device:
            self.buffer = None  # free the old buffer before allocating its replacement
            self.buffer = buffer = torch.empty(rows, cols, dtype=dtype, device=device)
        return buffer

    def release(self) -> None:
        """Free the buffer (training is over; it is ``rows × cols`` floats)."""
        self.buffer = None


def low_precision_mm(a: Tensor, b: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``a @ b`` with both operands cast to ``dtype`` (``None``: as they are), in ``a``'s dtype.

    For the AuxK products only (see :data:`mlsae_lens.sparse_ops.AUX_DENSE_MAX_RATIO`): bfloat16 GEMMs are 3-4x faster
    than float32 ones on CUDA and on CPUs with AVX512-BF16 or AMX, and the auxiliary loss (a
    1/32-weighted nudge to dead latents) needs no more than bf16's ~3 significant digits.
    Differentiable: autograd runs the backward GEMMs in ``dtype`` too.
    """
    if dtype is None or dtype == a.dtype:
        return a @ b.to(a.dtype)
    return (a.to(dtype) @ b.to(dtype)).to(a.dtype)


def has_native_bf16_matmul(device: torch.device) -> bool:
    """Whether bfloat16 GEMMs run natively on ``device``: CUDA, or a CPU with AVX512-BF16 or
    AMX (where they were 3-4x faster than float32 ones; elsewhere oneDNN emulates them)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence the guard
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def enable_tf32() -> None:
    """Let CUDA matmuls use TF32 (about 3x faster fp32 GEMMs on Ampere+; no effect on CPU)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
