"""Histograms and quantile samples per (latent, layer) against brute force, streamed and merged."""

import math

import pytest
import torch

from mlsae_lens.activation_samples import (
    BINS_PER_DECADE,
    N_BINS,
    ActivationHistogram,
    LatentContexts,
    bin_edges,
    quantile_of,
    sample_priority,
)
from mlsae_lens.errors import MLSAEError
from mlsae_lens.topk_contexts import EMPTY_POSITION

N_LATENTS, N_LAYERS, K = 6, 3, 2


def random_codes(n_tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(n_tokens, N_LAYERS, N_LATENTS, generator=g).argsort(-1)[..., :K]
    values = torch.exp(torch.randn(n_tokens, N_LAYERS, K, generator=g) * 3)  # spans decades
    values[torch.rand(values.shape, generator=g) < 0.2] = 0.0
    values[0, 0, 0] = 2e-5  # below the first edge
    values[1, 0, 0] = 5e4  # above the last edge
    return indices, values


def brute_force_histogram(indices, values) -> torch.Tensor:
    counts = torch.zeros(N_LATENTS, N_LAYERS, N_BINS, dtype=torch.int32)
    for t, l, s in torch.nonzero(values > 0).tolist():
        b = math.floor((math.log10(float(values[t, l, s])) + 3) * BINS_PER_DECADE)
        counts[indices[t, l, s], l, min(max(b, 0), N_BINS - 1)] += 1
    return counts


def test_histogram_equals_brute_force_streamed_and_merged() -> None:
    indices, values = random_codes(50, seed=0)
    expected = brute_force_histogram(indices, values)
    streamed = ActivationHistogram(N_LATENTS, N_LAYERS)
    for start, stop in ((0, 7), (7, 30), (30, 50)):
        streamed.update(indices[start:stop], values[start:stop])
    assert torch.equal(streamed.counts, expected)
    a, b = ActivationHistogram(N_LATENTS, N_LAYERS), ActivationHistogram(N_LATENTS, N_LAYERS)
    a.update(indices[:20], values[:20])
    b.update(indices[20:], values[20:])
    assert torch.equal(a.merge(b).counts, expected)
    assert int(expected.sum()) == int((values > 0).sum())
    edges = bin_edges()
    assert edges[0] == pytest.approx(1e-3) and edges[-1] == pytest.approx(1e3)


def test_quantile_of_interpolates_within_a_bin() -> None:
    counts = torch.zeros(N_BINS, dtype=torch.int32)
    one = 3 * BINS_PER_DECADE  # the bin [1, 10**(1/BINS_PER_DECADE))
    counts[one] = 3
    counts[one + 6] = 1
    assert quantile_of(counts, 1.0) == pytest.approx(0.0)
    assert quantile_of(counts, 10 ** (0.5 / BINS_PER_DECADE)) == pytest.approx(1.5 / 4)
    assert quantile_of(counts, 1e6) == pytest.approx(1.0)
    assert math.isnan(quantile_of(torch.zeros(N_BINS, dtype=torch.int32), 1.0))


def brute_force_samples(indices, values, positions, n):
    """For each (latent, layer): the n active tokens of largest priority (then earliest)."""
    priority = sample_priority(indices, positions, N_LAYERS)
    out = {}
    for t, l, s in torch.nonzero(values > 0).tolist():
        key = (int(indices[t, l, s]), l)
        out.setdefault(key, []).append((-float(priority[t, l, s]), int(positions[t]), float(values[t, l, s])))
    return {key: sorted(entries)[:n] for key, entries in out.items()}


def test_samples_are_the_largest_priorities_whatever_the_stream_order() -> None:
    indices, values = random_codes(60, seed=1)
    positions = torch.arange(60) * 3 + 5
    expected = brute_force_samples(indices, values, positions, 4)
    whole = LatentContexts(N_LATENTS, N_LAYERS, top_n=2, sample_n=4)
    for start, stop in ((0, 11), (11, 12), (12, 60)):
        whole.update(indices[start:stop], values[start:stop], positions[start:stop])
    shards = [LatentContexts(N_LATENTS, N_LAYERS, top_n=2, sample_n=4) for _ in range(2)]
    shards[1].update(indices[:25], values[:25], positions[:25])  # shards merged in any order
    shards[0].update(indices[25:], values[25:], positions[25:])
    merged = shards[0].merge(shards[1])
    for tables in (whole, merged):
        samples = tables.samples
        for j in range(N_LATENTS):
            for l in range(N_LAYERS):
                want = expected.get((j, l), [])
                got_pos = samples.positions[j, l].tolist()
                assert got_pos[: len(want)] == [p for _, p, _ in want]
                assert all(p == EMPTY_POSITION for p in got_pos[len(want) :])
                assert samples.payload[j, l, : len(want)].tolist() == pytest.approx([v for *_, v in want])
        assert torch.equal(tables.hist.counts, brute_force_histogram(indices, values))


def test_sample_priorities_look_uniform_and_differ_by_layer_and_latent() -> None:
    indices = torch.randint(0, 1000, (4000, N_LAYERS, 1))
    priority = sample_priority(indices, torch.arange(4000), N_LAYERS)
    assert float(priority.min()) > 0 and float(priority.max()) <= 1
    assert float(priority.mean()) == pytest.approx(0.5, abs=0.02)
    assert not torch.equal(priority[:, 0], priority[:, 1])


def test_saved_tables_round_trip_and_refuse_a_wrong_histogram() -> None:
    indices, values = random_codes(30, seed=2)
    tables = LatentContexts(N_LATENTS, N_LAYERS, top_n=3, sample_n=2)
    tables.update(indices, values, torch.arange(30))
    again = LatentContexts.from_saved(tables.tensors(), tables.meta())
    for name, tensor in tables.tensors().items():
        assert torch.equal(again.tensors()[name], tensor), name
    broken = {**tables.tensors(), "hist_counts": torch.zeros(1, 1, 1, dtype=torch.int32)}
    with pytest.raises(MLSAEError, match="histogram has shape"):
        LatentContexts.from_saved(broken, tables.meta())
