"""Input normalization for multi-layer residual vectors.

Residual norms grow with depth (paper Fig. 4), so one SAE shared by every layer needs its
inputs on a common scale. Three modes, stored in the SAE config and applied identically in
training, ``encode`` and ``decode``:

* ``standardize`` — per vector, subtract the mean and divide by the (unbiased) standard
  deviation over ``d_in`` plus ``eps``; the published reference code's default.
* ``center`` — subtract each layer's dataset mean (estimated before training and saved as a
  buffer); the paper centers each layer this way before comparing vectors across layers.
* ``none`` — raw residual vectors.

Every mode is an affine map ``x_norm = (x - shift) / scale``, so :func:`denormalize` undoes it
exactly with the same :class:`NormStats`.
"""

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

NormalizationMode = Literal["standardize", "center", "none"]
NORMALIZATION_MODES: tuple[str, ...] = get_args(NormalizationMode)

# Same epsilon as the reference implementation (added to the std, not the variance).
STANDARDIZE_EPS = 1e-5


@dataclass
class NormStats:
    """The affine map of one normalization: ``x_norm = (x - shift) / scale``.

    ``shift`` and ``scale`` broadcast against ``x`` (``[..., 1]`` per vector for standardize,
    ``[n_layers, d_in]`` for center, scalars for none).
    """

    shift: Tensor
    scale: Tensor


def normalize(
    x: Tensor, mode: str, layer_means: Tensor | None = None
) -> tuple[Tensor, NormStats]:
    """Normalize ``x`` of shape ``[..., n_layers, d_in]`` and return the map used.

    ``layer_means`` (``[n_layers, d_in]``) is required for ``center``.
    """
    if mode == "standardize":
        shift = x.mean(dim=-1, keepdim=True)
        scale = x.std(dim=-1, keepdim=True) + STANDARDIZE_EPS
    elif mode == "center":
        if layer_means is None:
            raise ValueError("normalization='center' needs the per-layer dataset means")
        shift = layer_means.to(x.dtype)
        scale = torch.ones((), dtype=x.dtype, device=x.device)
    elif mode == "none":
        shift = torch.zeros((), dtype=x.dtype, device=x.device)
        scale = torch.ones((), dtype=x.dtype, device=x.device)
    else:
        raise ValueError(f"unknown normalization {mode!r}; use one of {NORMALIZATION_MODES}")
    return (x - shift) / scale, NormStats(shift=shift, scale=scale)


def denormalize(x_norm: Tensor, stats: NormStats) -> Tensor:
    """Map a vector from the normalized space back to the residual stream."""
    return x_norm * stats.scale + stats.shift
