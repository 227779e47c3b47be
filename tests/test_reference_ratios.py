"""The streamed reference estimator equals the one-shot one over the same fixed batches."""

import math

import pytest
import torch

from mlsae_lens.analysis import reference_per_batch_ratios
from mlsae_lens.analysis.reference_ratios import ReferenceRatioStats
from mlsae_lens.errors import MLSAEError


def random_topk(n_tokens: int, n_layers: int, n_latents: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(n_tokens, n_layers, n_latents, generator=g).argsort(-1)[..., :k]
    values = torch.rand(n_tokens, n_layers, k, generator=g)
    values[values < 0.2] = 0.0  # some inactive slots
    return indices, values


@pytest.mark.parametrize("batch_tokens", [7, 8, 100])
def test_streamed_reference_ratios_equal_the_one_shot_estimator_over_the_same_batches(
    batch_tokens,
) -> None:
    indices, values = random_topk(40, 3, 9, 2, seed=batch_tokens)
    stats = ReferenceRatioStats(3, 9, batch_tokens)
    for start, stop in ((0, 5), (5, 19), (19, 20), (20, 40)):  # uneven model batches
        stats.update_sparse(indices[start:stop], values[start:stop])
    batches = [
        (indices[i : i + batch_tokens], values[i : i + batch_tokens])
        for i in range(0, 40, batch_tokens)
    ]
    expected = reference_per_batch_ratios(batches, n_latents=9)
    got = stats.compute()
    assert got["n_batches"] == expected["n_batches"] == math.ceil(40 / batch_tokens)
    assert got["last_batch_tokens"] == 40 - batch_tokens * (got["n_batches"] - 1)
    assert got["latent_ratio"] == pytest.approx(expected["latent_ratio"], rel=1e-12)
    assert got["token_ratio"] == pytest.approx(expected["token_ratio"], rel=1e-12)


def test_state_round_trip_continues_the_same_stream() -> None:
    indices, values = random_topk(30, 2, 5, 2, seed=1)
    whole = ReferenceRatioStats(2, 5, 8)
    whole.update_sparse(indices, values)
    first = ReferenceRatioStats(2, 5, 8)
    first.update_sparse(indices[:13], values[:13])
    resumed = ReferenceRatioStats.from_state_dict(first.state_dict())
    resumed.update_sparse(indices[13:], values[13:])
    assert resumed.compute() == whole.compute()


def test_a_non_positive_batch_is_refused() -> None:
    with pytest.raises(MLSAEError, match="batch_tokens must be positive"):
        ReferenceRatioStats(2, 5, 0)
