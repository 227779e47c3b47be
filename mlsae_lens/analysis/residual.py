"""Residual-stream norms and adjacent-layer cosine similarity (paper sec. 4.2, Fig. 4).

Lawson et al. (2024, arXiv 2409.04185) note, after Heimersheim & Turner (2023), that the mean
L2 norm of residual vectors grows with depth, so they centre each layer by its dataset mean
before comparing vectors at adjacent layers. :class:`ResidualNormStats` streams the needed sums
in float64.

Centering needs the dataset mean, which is only known after a full pass, so:

* one pass (:meth:`ResidualNormStats.update`) gives raw mean norms, the per-layer mean vector
  ``mu_l``, raw adjacent cosines and the *RMS* centered norm, via the exact identity
  ``E||x - mu||^2 = E||x||^2 - ||mu||^2``;
* the *mean* centered norm and the centered cosine need ``mu`` inside a nonlinearity, so they
  need a second pass with the means fixed: :meth:`ResidualNormStats.update_centered`, or
  :meth:`ResidualNormStats.from_two_passes` which runs both passes over a re-iterable source.

Relative layer: ``blocks.{l}.hook_resid_post`` (0-based ``l``) is the output of ``l + 1`` blocks,
so its relative layer is ``(l + 1) / n_layers`` in ``(0, 1]``: the paper's ``l / n_L`` with
``l`` counting blocks from 1, and 1.0 is the final layer for every model size.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mlsae_lens.analysis.stats_files import read_safetensors, write_safetensors
from mlsae_lens.errors import MLSAEError

_FORMAT = "mlsae_lens.ResidualNormStats/1"
_TENSORS = (
    "sum_norm",
    "sum_sq_norm",
    "sum_vec",
    "sum_cos",
    "sum_centered_norm",
    "sum_centered_cos",
)
_CHUNK_ELEMENTS = 1 << 22  # float64 working copies of at most 32 MiB per chunk of tokens

Batch = Tensor | tuple[Tensor, Tensor | None]


@dataclass
class ResidualNormResult:
    """Per-layer norms and adjacent-layer cosines (float64, CPU).

    ``mean_cosine_adjacent[l]`` compares layers ``l`` and ``l + 1``; plot it against
    ``relative_layer[:-1]`` (the lower layer of each pair). The cosine of a zero vector is taken
    as 0. Centered fields that need a second pass are NaN until one has run.
    """

    n_tokens: int
    """Valid tokens in the first pass."""
    n_tokens_centered: int
    """Valid tokens in the centered (second) pass; 0 if none ran."""
    relative_layer: Tensor  # [n_layers]
    """(l + 1) / n_layers for 0-based resid_post layer l."""
    mean_norm: Tensor  # [n_layers]
    """E||x_l||: the paper's Fig. 4 quantity."""
    rms_norm: Tensor  # [n_layers]
    """sqrt(E||x_l||^2)."""
    mean_vector: Tensor  # [n_layers, d_model]
    """Dataset mean mu_l, used for centering."""
    mean_vector_norm: Tensor  # [n_layers]
    """||mu_l||."""
    centered_rms_norm: Tensor  # [n_layers]
    """sqrt(E||x_l - mu_l||^2) = sqrt(E||x_l||^2 - ||mu_l||^2), exact from one pass."""
    mean_cosine_adjacent: Tensor  # [n_pairs]
    """E[cos(x_l, x_{l+1})] over tokens, in [-1, 1]."""
    centered_mean_norm: Tensor  # [n_layers]
    """E||x_l - m_l|| with the centering means m_l of the second pass."""
    mean_cosine_adjacent_centered: Tensor  # [n_pairs]
    """E[cos(x_l - m_l, x_{l+1} - m_{l+1})] over tokens of the second pass."""

    def to_dict(self) -> dict[str, Any]:
        """Everything but the mean vectors as JSON-able lists (NaN becomes ``None``)."""
        out: dict[str, Any] = {
            "n_tokens": self.n_tokens,
            "n_tokens_centered": self.n_tokens_centered,
        }
        for name in (
            "relative_layer",
            "mean_norm",
            "rms_norm",
            "mean_vector_norm",
            "centered_rms_norm",
            "mean_cosine_adjacent",
            "centered_mean_norm",
            "mean_cosine_adjacent_centered",
        ):
            out[name] = [None if math.isnan(x) else x for x in getattr(self, name).tolist()]
        return out


class ResidualNormStats:
    """Streaming float64 sums over tokens of residual vectors at every layer.

    Args:
        n_layers: Number of layers in each ``[tokens, n_layers, d_model]`` batch.
        d_model: Residual width.
        device: Where the accumulators live; inputs are moved there.
    """

    def __init__(self, n_layers: int, d_model: int, device: torch.device | str = "cpu") -> None:
        if n_layers < 1 or d_model < 1:
            raise MLSAEError(
                f"ResidualNormStats needs n_layers >= 1 and d_model >= 1, got n_layers={n_layers}, "
                f"d_model={d_model}: pass the model's sizes."
            )
        self.n_layers = n_layers
        self.d_model = d_model
        self.device = torch.device(device)
        zeros = functools.partial(torch.zeros, dtype=torch.float64, device=self.device)
        n_pairs = n_layers - 1
        self.sum_norm = zeros(n_layers)
        self.sum_sq_norm = zeros(n_layers)
        self.sum_vec = zeros(n_layers, d_model)
        self.sum_cos = zeros(n_pairs)
        self.sum_centered_norm = zeros(n_layers)
        self.sum_centered_cos = zeros(n_pairs)
        self.centering_means: Tensor | None = None
        self.n_tokens = 0
        self.n_tokens_centered = 0

    def update(
        self,
        resid: Tensor,
        mask: Tensor | None = None,
    ) -> None:
        """First pass: raw norms, mean vectors and raw adjacent cosines.

        Args:
            resid: ``[tokens, n_layers, d_model]`` residual vectors (any float dtype).
            mask: ``[tokens]`` bool, False for tokens to skip (e.g. special tokens).
        """
        for x in self._chunks(resid, mask):
            norm = x.norm(dim=-1)  # [tokens, n_layers]
            self.n_tokens += x.shape[0]
            self.sum_norm += norm.sum(0)
            self.sum_sq_norm += norm.square().sum(0)
            self.sum_vec += x.sum(0)
            self.sum_cos += _adjacent_cosine(x, norm).sum(0)

    def update_centered(
        self,
        resid: Tensor,
        layer_means: Tensor,
        mask: Tensor | None = None,
    ) -> None:
        """Second pass: norms and adjacent cosines after subtracting fixed per-layer means.

        Pass the first pass's ``compute().mean_vector`` as ``layer_means``, and the same means
        on every call (they are stored and checked, so merged passes stay comparable).

        Args:
            resid: ``[tokens, n_layers, d_model]`` residual vectors.
            layer_means: ``[n_layers, d_model]`` centering means.
            mask: ``[tokens]`` bool, False for tokens to skip.
        """
        means = layer_means.to(self.device, torch.float64)
        if means.shape != (self.n_layers, self.d_model):
            raise MLSAEError(
                f"layer_means has shape {tuple(layer_means.shape)}; expected "
                f"[{self.n_layers}, {self.d_model}]: pass compute().mean_vector of the first pass."
            )
        self._set_centering_means(means)
        for x in self._chunks(resid, mask):
            x = x - means
            norm = x.norm(dim=-1)
            self.n_tokens_centered += x.shape[0]
            self.sum_centered_norm += norm.sum(0)
            self.sum_centered_cos += _adjacent_cosine(x, norm).sum(0)

    @classmethod
    def from_two_passes(
        cls,
        make_batches: Callable[[], Iterable[Batch]],
        n_layers: int,
        d_model: int,
        device: torch.device | str = "cpu",
    ) -> ResidualNormStats:
        """Run both passes over ``make_batches()``, which is called twice.

        Each call must yield the same data: ``resid`` tensors or ``(resid, mask)`` pairs.
        """
        stats = cls(n_layers, d_model, device)
        for resid, mask in map(_split_batch, make_batches()):
            stats.update(resid, mask)
        means = stats.compute().mean_vector
        for resid, mask in map(_split_batch, make_batches()):
            stats.update_centered(resid, means, mask)
        if stats.n_tokens_centered != stats.n_tokens:
            raise MLSAEError(
                f"make_batches() yielded {stats.n_tokens} tokens the first time and "
                f"{stats.n_tokens_centered} the second: it must yield the same data each call."
            )
        return stats

    def _chunks(self, resid: Tensor, mask: Tensor | None) -> Iterable[Tensor]:
        """Valid tokens of ``resid`` as float64 chunks, bounding the working memory."""
        if resid.ndim != 3 or resid.shape[1:] != (self.n_layers, self.d_model):
            raise MLSAEError(
                f"resid has shape {tuple(resid.shape)}; expected [tokens, {self.n_layers}, "
                f"{self.d_model}] (tokens, layers, d_model)."
            )
        if mask is not None:
            if mask.shape != (resid.shape[0],):
                raise MLSAEError(
                    f"mask has shape {tuple(mask.shape)}; expected [{resid.shape[0]}], "
                    "one bool per token."
                )
            resid = resid[mask.to(resid.device, torch.bool)]
        step = max(1, _CHUNK_ELEMENTS // (self.n_layers * self.d_model))
        for start in range(0, resid.shape[0], step):
            yield resid[start : start + step].to(self.device, torch.float64)

    def _set_centering_means(self, means: Tensor) -> None:
        if self.centering_means is None:
            self.centering_means = means.clone()
        elif not torch.equal(self.centering_means, means.to(self.centering_means.device)):
            raise MLSAEError(
                "update_centered got layer_means that differ from those of earlier centered "
                "updates: use the same means (the first pass's mean_vector) for the whole pass."
            )

    # ------------------------------------------------------------------ merge and I/O

    def merge(self, other: ResidualNormStats) -> ResidualNormStats:
        """Add another accumulator's sums into this one (exact: all fields are sums)."""
        if (self.n_layers, self.d_model) != (other.n_layers, other.d_model):
            raise MLSAEError(
                f"Cannot merge ResidualNormStats of (n_layers, d_model) "
                f"{(other.n_layers, other.d_model)} into {(self.n_layers, self.d_model)}."
            )
        if other.centering_means is not None:
            self._set_centering_means(other.centering_means.to(self.device))
        for name in _TENSORS:
            getattr(self, name).add_(getattr(other, name).to(self.device))
        self.n_tokens += other.n_tokens
        self.n_tokens_centered += other.n_tokens_centered
        return self

    @classmethod
    def merged(cls, parts: Sequence[ResidualNormStats]) -> ResidualNormStats:
        """A new accumulator holding the sum of ``parts`` (which are left unchanged)."""
        if not parts:
            raise MLSAEError("ResidualNormStats.merged needs at least one part to merge.")
        out = cls(parts[0].n_layers, parts[0].d_model, parts[0].device)
        for part in parts:
            out.merge(part)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Tensors and sizes; round-trips through :meth:`load_state_dict`."""
        state: dict[str, Any] = {name: getattr(self, name).clone() for name in _TENSORS}
        if self.centering_means is not None:
            state["centering_means"] = self.centering_means.clone()
        state.update(self._meta())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this accumulator's sums with ``state`` (sizes must match)."""
        if (state.get("n_layers"), state.get("d_model")) != (self.n_layers, self.d_model):
            raise MLSAEError(
                f"State has (n_layers, d_model)=({state.get('n_layers')}, {state.get('d_model')}) "
                f"but this ResidualNormStats has ({self.n_layers}, {self.d_model}): build it with "
                "the saved sizes, or use ResidualNormStats.load(path)."
            )
        for name in _TENSORS:
            setattr(self, name, state[name].to(self.device, torch.float64).clone())
        means = state.get("centering_means")
        self.centering_means = (
            None if means is None else means.to(self.device, torch.float64).clone()
        )
        self.n_tokens = int(state["n_tokens_seen"])
        self.n_tokens_centered = int(state["n_tokens_centered"])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the sums to a safetensors file (atomically) with JSON metadata."""
        state = self.state_dict()
        meta = {key: state.pop(key) for key in self._meta()}
        write_safetensors(path, state, _FORMAT, meta)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], device: torch.device | str = "cpu"
    ) -> ResidualNormStats:
        """Read sums written by :meth:`save`."""
        tensors, meta = read_safetensors(path, _FORMAT)
        stats = cls(meta["n_layers"], meta["d_model"], device)
        stats.load_state_dict({**tensors, **meta})
        return stats

    def _meta(self) -> dict[str, Any]:
        return {
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_tokens_seen": self.n_tokens,
            "n_tokens_centered": self.n_tokens_centered,
        }

    # ------------------------------------------------------------------ results

    def compute(self) -> ResidualNormResult:
        """Means over the tokens seen (NaN where a pass saw no tokens)."""
        n = self.n_tokens if self.n_tokens else math.nan
        n_centered = self.n_tokens_centered if self.n_tokens_centered else math.nan
        mean_vector = self.sum_vec.cpu() / n
        mean_sq_norm = self.sum_sq_norm.cpu() / n
        mean_vector_norm = mean_vector.norm(dim=-1)
        layers = torch.arange(1, self.n_layers + 1, dtype=torch.float64)
        return ResidualNormResult(
            n_tokens=self.n_tokens,
            n_tokens_centered=self.n_tokens_centered,
            relative_layer=layers / self.n_layers,
            mean_norm=self.sum_norm.cpu() / n,
            rms_norm=mean_sq_norm.sqrt(),
            mean_vector=mean_vector,
            mean_vector_norm=mean_vector_norm,
            # E||x - mu||^2 = E||x||^2 - ||mu||^2; clamp the rounding of a near-zero difference.
            centered_rms_norm=(mean_sq_norm - mean_vector_norm.square()).clamp_min(0).sqrt(),
            mean_cosine_adjacent=self.sum_cos.cpu() / n,
            centered_mean_norm=self.sum_centered_norm.cpu() / n_centered,
            mean_cosine_adjacent_centered=self.sum_centered_cos.cpu() / n_centered,
        )


def _adjacent_cosine(x: Tensor, norm: Tensor) -> Tensor:
    """cos(x[:, l], x[:, l + 1]) as [tokens, n_layers - 1], 0 where either vector is zero."""
    dot = (x[:, :-1] * x[:, 1:]).sum(-1)
    den = norm[:, :-1] * norm[:, 1:]
    return torch.where(den > 0, dot / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)


def _split_batch(batch: Batch) -> tuple[Tensor, Tensor | None]:
    return batch if isinstance(batch, tuple) else (batch, None)
