"""Activation histograms and quantile samples of every (latent, layer) pair, streamed.

The explorer shows, besides each latent's strongest tokens (:class:`TopContexts`), what its
*typical* activations look like, as Neuronpedia's dashboards do: a histogram of its activation
values and contexts drawn from across that distribution, not only from its top. Both are
collected in the same single streaming pass over the top-k codes, with memory independent of
the number of tokens, and both merge exactly across disjoint token sets (so a resumed analysis
ends with the same tables as an uninterrupted one):

* :class:`ActivationHistogram` counts the active values in fixed log-spaced bins (16 per
  decade, i.e. 15 % wide, over ``[1e-3, 1e3)``, ends open), fixed so counts from any two streams
  add up; activations are heavy-tailed and their scale differs between latents and
  normalizations, which fixed linear bins would not serve.
* Samples are a *bottom-k sketch*: every active (token, latent, layer) entry gets a
  pseudo-random priority, a hash of its position, latent and layer, and the ``sample_n``
  largest priorities of each pair are kept. That is a uniform random sample without
  replacement of the pair's active tokens, and the same sample whatever the order or sharding
  of the stream. Sorted by activation, the samples spread over the quantiles of the
  distribution; the explorer groups them into quantile bands using the histogram
  (:func:`quantile_of`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mlsae_lens.errors import MLSAEError
from mlsae_lens.topk_contexts import TopContexts

LOG10_MIN, LOG10_MAX, BINS_PER_DECADE = -3, 3, 16
N_BINS = (LOG10_MAX - LOG10_MIN) * BINS_PER_DECADE


def bin_edges() -> Tensor:
    """The ``N_BINS + 1`` bin edges (float64); the first and last bins are open-ended."""
    return torch.logspace(LOG10_MIN, LOG10_MAX, N_BINS + 1, dtype=torch.float64)


def bin_index(values: Tensor) -> Tensor:
    """The bin of each positive value: ``floor((log10 v + 3) * 16)``, clamped to the ends."""
    index = torch.floor((values.double().log10() - LOG10_MIN) * BINS_PER_DECADE)
    return index.clamp_(0, N_BINS - 1).long()


class ActivationHistogram:
    """Counts of active values per (latent, layer) in fixed log-spaced bins.

    ``counts[j, l, b]`` is how many tokens latent ``j`` was active on at layer ``l`` with a value
    in bin ``b`` (:func:`bin_edges`). Memory ``d_sae * n_layers * 96`` int32 (53 MB for
    SmolLM2 at R = 8, 425 MB at R = 64).
    """

    def __init__(self, n_latents: int, n_layers: int, device: torch.device | str = "cpu") -> None:
        self.n_latents, self.n_layers = n_latents, n_layers
        self.device = torch.device(device)
        shape = (n_latents, n_layers, N_BINS)
        self.counts = torch.zeros(shape, dtype=torch.int32, device=self.device)

    def update(self, indices: Tensor, values: Tensor) -> None:
        """Count the positive entries of top-k codes ``[tokens, n_layers, k]``."""
        idx = indices.to(self.device, torch.int64)
        vals = values.to(self.device)
        layer = torch.arange(self.n_layers, device=self.device).view(1, -1, 1).expand_as(idx)
        keep = vals > 0
        flat = (idx[keep] * self.n_layers + layer[keep]) * N_BINS + bin_index(vals[keep])
        ones = torch.ones_like(flat, dtype=torch.int32)
        self.counts.view(-1).index_add_(0, flat, ones)

    def merge(self, other: ActivationHistogram) -> ActivationHistogram:
        """Add the counts of another stream (same sizes)."""
        if other.counts.shape != self.counts.shape:
            raise MLSAEError(
                f"cannot merge histograms of shape {tuple(other.counts.shape)} into "
                f"{tuple(self.counts.shape)}: merge only those of the same MLSAE"
            )
        self.counts += other.counts.to(self.device)
        return self


def quantile_of(counts: Tensor, value: float) -> float:
    """The fraction of a histogram's entries below ``value`` (bins interpolated linearly in
    log space): the approximate quantile of an activation within its (latent, layer)."""
    total = int(counts.sum())
    if total == 0:
        return float("nan")
    position = (torch.tensor(value, dtype=torch.float64).log10() - LOG10_MIN) * BINS_PER_DECADE
    position = float(position.clamp(0, N_BINS - 1e-9))
    b = int(position)
    below = int(counts[:b].sum()) + (position - b) * int(counts[b])
    return below / total


_M31 = (1 << 31) - 1


def sample_priority(indices: Tensor, positions: Tensor, n_layers: int) -> Tensor:
    """A pseudo-random priority in ``(0, 1]`` for each (position, latent, layer) entry of top-k
    codes ``[tokens, n_layers, k]``: an integer hash of the entry (31-bit multiply-xorshift
    rounds, so int64 products never overflow), so the same entry gets the same priority in
    every stream; its top 24 bits are exact in float32."""
    layer = torch.arange(n_layers, device=indices.device).view(1, -1, 1)
    key = (positions.view(-1, 1, 1).to(torch.int64) * n_layers + layer) * 1_000_003 + indices.long()
    h = (key ^ (key >> 31)) & _M31
    for _ in range(2):
        h = ((h ^ (h >> 16)) * 0x45D9F3B) & _M31
    h = h ^ (h >> 16)
    return ((h >> 7) + 1).float() / float(1 << 24)


class LatentContexts:
    """What ``mlsae-lens analyze`` collects for the explorer: per (latent, layer) the top
    ``top_n`` tokens, ``sample_n`` uniformly sampled tokens and the activation histogram.

    Args:
        n_latents: The SAE's ``d_sae``.
        n_layers: Layers the MLSAE reads.
        top_n: Strongest tokens kept per pair.
        sample_n: Sampled tokens kept per pair (0: no samples or histogram).
        device: Where the tables live.
    """

    def __init__(
        self,
        n_latents: int,
        n_layers: int,
        top_n: int = 16,
        sample_n: int = 8,
        device: torch.device | str = "cpu",
    ) -> None:
        self.top = TopContexts(n_latents, n_layers, top_n, device)
        self.samples = (
            TopContexts(n_latents, n_layers, sample_n, device, with_payload=True)
            if sample_n
            else None
        )
        self.hist = ActivationHistogram(n_latents, n_layers, device) if sample_n else None

    @property
    def n_tokens(self) -> int:
        return self.top.n_tokens

    def update(self, indices: Tensor, values: Tensor, positions: Tensor) -> None:
        """Fold in top-k codes ``[tokens, n_layers, k]`` of tokens at ``positions``."""
        self.top.update(indices, values, positions)
        if self.samples is not None and self.hist is not None:
            active = values > 0
            priority = sample_priority(indices, positions.to(indices.device), self.top.n_layers)
            self.samples.update(indices, priority * active, positions, payload=values)
            self.hist.update(indices, values)

    def merge(self, other: LatentContexts) -> LatentContexts:
        """Fold in the tables of disjoint tokens."""
        self.top.merge(other.top)
        if self.samples is not None and self.hist is not None:
            if other.samples is None or other.hist is None:
                raise MLSAEError("cannot merge tables without samples into ones with samples")
            self.samples.merge(other.samples)
            self.hist.merge(other.hist)
        return self

    def tensors(self) -> dict[str, Tensor]:
        """The tables to save (positions as int32 where they fit: half the size)."""
        out = {"values": self.top.values, "positions": _compact(self.top.positions)}
        if self.samples is not None and self.hist is not None:
            assert self.samples.payload is not None
            out.update(
                sample_priority=self.samples.values,
                sample_positions=_compact(self.samples.positions),
                sample_values=self.samples.payload,
                hist_counts=self.hist.counts,
            )
        return out

    def meta(self) -> dict[str, Any]:
        return {
            "n_latents": self.top.n_latents,
            "n_layers": self.top.n_layers,
            "top_n": self.top.top_n,
            "n_tokens": self.top.n_tokens,
            "sample_n": self.samples.top_n if self.samples is not None else 0,
            "hist_log10_range": [LOG10_MIN, LOG10_MAX],
            "hist_bins_per_decade": BINS_PER_DECADE,
        }

    @classmethod
    def from_saved(
        cls, tensors: dict[str, Tensor], meta: dict[str, Any], device: torch.device | str = "cpu"
    ) -> LatentContexts:
        """Rebuild from :meth:`tensors` and :meth:`meta` (files without samples: ``sample_n`` 0)."""
        sizes = {k: meta[k] for k in ("n_latents", "n_layers", "top_n", "n_tokens")}
        has_samples = "sample_values" in tensors
        out = cls(
            int(meta["n_latents"]),
            int(meta["n_layers"]),
            int(meta["top_n"]),
            int(meta.get("sample_n", 0)) if has_samples else 0,
            device,
        )
        out.top = TopContexts.from_state_dict({**sizes, **tensors}, device)
        if out.samples is not None and out.hist is not None:
            out.samples = TopContexts.from_state_dict(
                {
                    **sizes,
                    "top_n": int(meta["sample_n"]),
                    "values": tensors["sample_priority"],
                    "positions": tensors["sample_positions"],
                    "payload": tensors["sample_values"],
                },
                device,
            )
            counts = tensors["hist_counts"]
            if tuple(counts.shape) != tuple(out.hist.counts.shape):
                raise MLSAEError(
                    f"the saved histogram has shape {tuple(counts.shape)}, not "
                    f"{tuple(out.hist.counts.shape)}: the file is damaged; rerun with --overwrite"
                )
            out.hist.counts = counts.to(out.hist.device, torch.int32).clone()
        return out


def _compact(positions: Tensor) -> Tensor:
    if positions.numel() and int(positions.max()) < torch.iinfo(torch.int32).max:
        return positions.to(torch.int32)
    return positions


__all__ = [
    "BINS_PER_DECADE",
    "N_BINS",
    "ActivationHistogram",
    "LatentContexts",
    "bin_edges",
    "bin_index",
    "quantile_of",
    "sample_priority",
]
