"""ResidualNormStats against explicit loops over tokens and layers."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from mlsae_lens.analysis import ResidualNormStats
from mlsae_lens.errors import MLSAEError

# (tokens, n_layers, d_model): one token, one layer (no adjacent pairs), and odd sizes.
SIZES = [(1, 3, 4), (7, 1, 5), (12, 2, 3), (33, 5, 8)]


def make_resid(tokens: int, n_layers: int, d_model: int, seed: int = 0) -> torch.Tensor:
    """Residuals sharing a mean direction that grows with depth, with one all-zero token."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(d_model, generator=g) * torch.arange(1, n_layers + 1)[:, None]
    resid = torch.randn(tokens, n_layers, d_model, generator=g) + offset
    resid[tokens // 2] = 0.0
    return resid


def brute_force(resid: torch.Tensor, mask=None) -> dict:
    """Per-vector norms and cosines in float64, two explicit passes."""
    x = resid.double()
    tokens, n_layers, _ = x.shape
    valid = [t for t in range(tokens) if mask is None or bool(mask[t])]
    n = len(valid)

    def cos(a, b):
        den = a.norm() * b.norm()
        return (a @ b / den).item() if den > 0 else 0.0

    mean = torch.stack([sum(x[t, layer] for t in valid) / n for layer in range(n_layers)])
    out = {
        "mean_vector": mean,
        "mean_norm": [sum(x[t, la].norm().item() for t in valid) / n for la in range(n_layers)],
        "rms_norm": [
            math.sqrt(sum(x[t, la].norm().item() ** 2 for t in valid) / n) for la in range(n_layers)
        ],
        "centered_rms_norm": [
            math.sqrt(sum((x[t, la] - mean[la]).norm().item() ** 2 for t in valid) / n)
            for la in range(n_layers)
        ],
        "centered_mean_norm": [
            sum((x[t, la] - mean[la]).norm().item() for t in valid) / n for la in range(n_layers)
        ],
        "mean_cosine_adjacent": [
            sum(cos(x[t, la], x[t, la + 1]) for t in valid) / n for la in range(n_layers - 1)
        ],
        "mean_cosine_adjacent_centered": [
            sum(cos(x[t, la] - mean[la], x[t, la + 1] - mean[la + 1]) for t in valid) / n
            for la in range(n_layers - 1)
        ],
    }
    return out


def assert_close(actual, expected, atol=1e-10):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=atol,
        rtol=1e-10,
        equal_nan=True,
    )


def assert_same_stats(a: ResidualNormStats, b: ResidualNormStats) -> None:
    assert (a.n_tokens, a.n_tokens_centered) == (b.n_tokens, b.n_tokens_centered)
    for name, value in a.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert_close(value, b.state_dict()[name], atol=1e-10)


def two_pass(resid, mask=None) -> ResidualNormStats:
    return ResidualNormStats.from_two_passes(
        lambda: [(resid, mask)], resid.shape[1], resid.shape[2]
    )


@pytest.mark.parametrize("sizes", SIZES)
def test_compute__matches_brute_force_norms_and_cosines(sizes):
    resid = make_resid(*sizes)
    result = two_pass(resid).compute()
    ref = brute_force(resid)
    assert result.n_tokens == result.n_tokens_centered == sizes[0]
    assert_close(result.relative_layer, [(la + 1) / sizes[1] for la in range(sizes[1])])
    assert result.mean_cosine_adjacent.shape == (sizes[1] - 1,)
    for name, expected in ref.items():
        assert_close(getattr(result, name), expected, atol=1e-9)
    assert_close(result.mean_vector_norm, ref["mean_vector"].norm(dim=-1))


def test_compute__centering_removes_the_shared_direction():
    result = two_pass(make_resid(33, 5, 8)).compute()
    assert (result.mean_cosine_adjacent_centered.abs() < result.mean_cosine_adjacent).all()
    assert (result.centered_mean_norm < result.mean_norm).all()


def test_compute__leaves_centered_fields_nan_until_a_second_pass():
    stats = ResidualNormStats(3, 4)
    stats.update(make_resid(5, 3, 4))
    result = stats.compute()
    assert torch.isnan(result.centered_mean_norm).all()
    assert torch.isnan(result.mean_cosine_adjacent_centered).all()
    assert not torch.isnan(result.centered_rms_norm).any()  # one pass suffices for the RMS
    d = result.to_dict()
    assert d["centered_mean_norm"] == [None] * 3
    json.dumps(d, allow_nan=False)


def test_update__streaming_in_chunks_equals_one_update():
    resid = make_resid(33, 5, 8)
    means = two_pass(resid).compute().mean_vector
    streamed = ResidualNormStats(5, 8)
    for start, stop in [(0, 1), (1, 1), (1, 20), (20, 33)]:
        streamed.update(resid[start:stop])
        streamed.update_centered(resid[start:stop], means)
    assert_same_stats(streamed, two_pass(resid))


def test_update__splits_large_batches_into_chunks(monkeypatch):
    resid = make_resid(33, 5, 8)
    whole = two_pass(resid)
    monkeypatch.setattr(
        "mlsae_lens.analysis.residual._CHUNK_ELEMENTS", 5 * 8 * 4
    )  # 4 tokens per chunk
    assert_same_stats(two_pass(resid), whole)


def test_merge__equals_one_shot():
    resid = make_resid(33, 5, 8)
    means = two_pass(resid).compute().mean_vector
    parts = []
    for chunk in (resid[:10], resid[10:]):
        part = ResidualNormStats(5, 8)
        part.update(chunk)
        part.update_centered(chunk, means)
        parts.append(part)
    assert_same_stats(ResidualNormStats.merged(parts), two_pass(resid))


def test_mask__excludes_tokens():
    resid = make_resid(33, 5, 8)
    mask = torch.arange(33) % 3 != 0
    result = two_pass(resid, mask).compute()
    assert result.n_tokens == int(mask.sum())
    for name, expected in brute_force(resid, mask).items():
        assert_close(getattr(result, name), expected, atol=1e-9)


def test_cosine__is_zero_for_zero_vectors():
    resid = torch.zeros(2, 3, 4)
    resid[1] = torch.tensor([1.0, 0, 0, 0])
    result = two_pass(resid, torch.tensor([False, True])).compute()
    assert_close(result.mean_cosine_adjacent, [1.0, 1.0])
    assert_close(result.mean_cosine_adjacent_centered, [0.0, 0.0])  # centered vectors are zero


def test_save_load__round_trips_with_and_without_centered_pass(tmp_path):
    resid = make_resid(12, 2, 3)
    one_pass = ResidualNormStats(2, 3)
    one_pass.update(resid)
    for stats in (one_pass, two_pass(resid)):
        path = tmp_path / "resid.safetensors"
        stats.save(path)
        assert [p.name for p in tmp_path.iterdir()] == [path.name]
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["meta"])
        assert meta["n_layers"] == 2 and meta["d_model"] == 3 and meta["n_tokens_seen"] == 12
        loaded = ResidualNormStats.load(path)
        assert_same_stats(loaded, stats)
        assert (loaded.centering_means is None) == (stats.centering_means is None)
        assert loaded.compute().to_dict() == stats.compute().to_dict()


def test_update_centered__rejects_changed_means_and_bad_shapes():
    resid = make_resid(5, 3, 4)
    stats = ResidualNormStats(3, 4)
    stats.update_centered(resid, torch.zeros(3, 4))
    with pytest.raises(MLSAEError, match="same means"):
        stats.update_centered(resid, torch.ones(3, 4))
    with pytest.raises(MLSAEError, match="layer_means"):
        stats.update_centered(resid, torch.zeros(4, 3))
    with pytest.raises(MLSAEError, match="resid has shape"):
        stats.update(resid[:, :2])
    with pytest.raises(MLSAEError, match="n_layers"):
        ResidualNormStats(3, 4).load_state_dict(ResidualNormStats(3, 5).state_dict())


def test_from_two_passes__rejects_a_source_that_changes_between_passes():
    sources = iter([[make_resid(5, 3, 4)], [make_resid(4, 3, 4)]])
    with pytest.raises(MLSAEError, match="same data"):
        ResidualNormStats.from_two_passes(lambda: next(sources), 3, 4)
