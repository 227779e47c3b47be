"""LayerDistributionStats against explicit loops over tokens and latents (Eqs. 10-12)."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from mlsae_lens.analysis import (
    LayerDistributionStats,
    reference_per_batch_ratios,
    variance_ratios,
)
from mlsae_lens.errors import MLSAEError

# (tokens, n_layers, n_latents): one token, one layer, two layers, and larger odd sizes.
SIZES = [(1, 3, 5), (6, 1, 5), (13, 2, 4), (24, 5, 9), (40, 7, 16)]
WEIGHTINGS = ["uniform_tokens", "activation_mass"]


def make_acts(tokens: int, n_layers: int, n_latents: int, seed: int = 0) -> torch.Tensor:
    """Sparse non-negative activations with every edge case the statistics must handle.

    Latent 0 is dead, latent 1 is only ever active at one layer, the last latent is active at
    every layer of every token but the first, and token 0 is active at one layer only.
    """
    g = torch.Generator().manual_seed(seed)
    acts = torch.rand(tokens, n_layers, n_latents, generator=g)
    acts[torch.rand(acts.shape, generator=g) < 0.6] = 0.0
    acts[:, :, 0] = 0.0
    acts[:, :, 1] = 0.0
    acts[:, n_layers // 2, 1] = torch.rand(tokens, generator=g) * (torch.arange(tokens) % 3 != 1)
    acts[:, :, -1] = torch.rand(tokens, n_layers, generator=g) + 0.1
    acts[0, 1:, :] = 0.0
    return acts


def brute_force(acts: torch.Tensor, mask=None, weighting="uniform_tokens") -> dict:
    """The definitions of sec. 4.3, one (token, latent) at a time, in Python floats."""
    tokens, n_layers, n_latents = acts.shape
    a = acts.double().tolist()
    valid = [t for t in range(tokens) if mask is None or bool(mask[t])]
    layers = range(n_layers)
    nan = math.nan
    out = {k: [nan] * n_latents for k in ("E", "var", "var_tok", "var_m")}
    out["P"] = [[nan] * n_layers for _ in range(n_latents)]
    out["count"] = [0] * n_latents
    for j in range(n_latents):
        rows = []  # (weight, P(L|t,j), E[L|t,j], Var(L|t,j))
        for t in valid:
            h = [a[t][layer][j] for layer in layers]
            total = sum(h)
            if total > 0:
                p = [x / total for x in h]
                m = sum(layer * p[layer] for layer in layers)
                v = sum((layer - m) ** 2 * p[layer] for layer in layers)
                rows.append((1.0 if weighting == "uniform_tokens" else total, p, m, v))
        if not rows:
            continue
        w_sum = sum(r[0] for r in rows)
        p_j = [sum(w * p[layer] for w, p, _, _ in rows) / w_sum for layer in layers]
        e_j = sum(layer * p_j[layer] for layer in layers)
        out["count"][j] = len(rows)
        out["P"][j] = p_j
        out["E"][j] = e_j
        out["var"][j] = sum((layer - e_j) ** 2 * p_j[layer] for layer in layers)
        out["var_tok"][j] = sum(w * v for w, _, _, v in rows) / w_sum
        out["var_m"][j] = sum(w * (m - e_j) ** 2 for w, _, m, _ in rows) / w_sum
    active = [j for j in range(n_latents) if out["count"][j] > 0]
    n = len(active)
    marginal = [sum(out["P"][j][layer] for j in active) / n if n else nan for layer in layers]
    mean_l = sum(layer * marginal[layer] for layer in layers)
    mean_e = sum(out["E"][j] for j in active) / n if n else nan

    def mean_over_active(key):
        return sum(out[key][j] for j in active) / n if n else nan

    def ratio(a, b):
        return a / b if b > 0 else nan

    out.update(
        active=active,
        n_tokens=len(valid),
        marginal=marginal,
        var_layer=sum((layer - mean_l) ** 2 * marginal[layer] for layer in layers),
        mean_var=mean_over_active("var"),
        var_e=sum((out["E"][j] - mean_e) ** 2 for j in active) / n if n else nan,
        mean_var_tok=mean_over_active("var_tok"),
        mean_var_m=mean_over_active("var_m"),
    )
    out["latent_ratio"] = ratio(out["mean_var"], out["var_layer"])
    out["token_ratio"] = ratio(out["mean_var_tok"], out["mean_var"])
    return out


def assert_close(actual, expected, atol=1e-10):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-10, equal_nan=True)


def assert_same_stats(a: LayerDistributionStats, b: LayerDistributionStats) -> None:
    assert a.n_tokens == b.n_tokens
    assert torch.equal(a.active_token_counts, b.active_token_counts)
    for name in ("sum_p", "sum_expected_sq", "sum_var", "weight_sum"):
        assert_close(getattr(a, name), getattr(b, name), atol=1e-12)


def stats_of(acts, weighting="uniform_tokens", mask=None) -> LayerDistributionStats:
    stats = LayerDistributionStats(acts.shape[1], acts.shape[2], weighting=weighting)
    stats.update(acts, mask)
    return stats


def to_sparse(acts: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k form of a dense tensor (the SAE's output); selected zeros stay as zero values."""
    values, indices = acts.topk(min(k, acts.shape[2]), dim=2)
    return indices, values


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("sizes", SIZES)
def test_compute__matches_brute_force_definitions(sizes, weighting):
    acts = make_acts(*sizes)
    result = variance_ratios(acts, weighting=weighting)
    ref = brute_force(acts, weighting=weighting)

    assert result.weighting == weighting
    assert result.n_tokens == ref["n_tokens"]
    assert result.active_token_counts.dtype == torch.int64
    assert result.active_token_counts.tolist() == ref["count"]
    assert result.n_active_latents == len(ref["active"])
    assert result.n_dead_latents == sizes[2] - len(ref["active"])
    assert result.n_dead_latents >= 1  # latent 0
    assert_close(result.layer_given_latent, ref["P"])
    assert_close(result.expected_layer, ref["E"])
    assert_close(result.var_layer_given_latent, ref["var"])
    assert_close(result.var_given_latent_token, ref["var_tok"])
    assert_close(result.var_token_expected_layer, ref["var_m"])
    assert_close(result.layer_marginal, ref["marginal"])
    for field, key in [
        ("var_layer", "var_layer"),
        ("mean_var_given_latent", "mean_var"),
        ("var_expected_layer", "var_e"),
        ("mean_var_given_latent_token", "mean_var_tok"),
        ("mean_var_token_expected_layer", "mean_var_m"),
        ("latent_ratio", "latent_ratio"),
        ("token_ratio", "token_ratio"),
    ]:
        value = getattr(result, field)
        assert isinstance(value, float), field
        assert_close(value, ref[key])
    expected_order = sorted(ref["active"], key=lambda j: ref["E"][j])
    assert result.latent_order.tolist() == expected_order


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("sizes", SIZES)
def test_compute__satisfies_law_of_total_variance(sizes, weighting):
    result = variance_ratios(make_acts(*sizes, seed=1), weighting=weighting)
    d = result.to_dict()
    assert abs(d["total_variance_identity_lhs"] - d["total_variance_identity_rhs"]) < 1e-9
    assert abs(d["within_latent_identity_lhs"] - d["within_latent_identity_rhs"]) < 1e-9
    active = result.active_token_counts > 0
    per_latent = result.var_given_latent_token + result.var_token_expected_layer
    assert_close(per_latent[active], result.var_layer_given_latent[active], atol=1e-9)
    assert_close(result.layer_given_latent[active].sum(1), torch.ones(int(active.sum())))


def test_compute__gives_zero_spread_for_single_layer_latents_and_tokens():
    acts = make_acts(24, 5, 9)
    result = variance_ratios(acts)
    assert result.var_layer_given_latent[1].item() == 0.0
    assert result.expected_layer[1].item() == 5 // 2
    # Latent 1 is single-layer, and token 0's pairs are single-layer: Var(L|J,T) is 0 there.
    single = variance_ratios(acts[:1])
    assert (single.var_given_latent_token[single.active_token_counts > 0] == 0).all()
    assert single.mean_var_given_latent_token == 0.0


def test_compute__marks_dead_latents_nan_and_leaves_them_out():
    result = variance_ratios(make_acts(24, 5, 9))
    assert torch.isnan(result.layer_given_latent[0]).all()
    assert math.isnan(result.expected_layer[0]) and math.isnan(result.var_layer_given_latent[0])
    assert 0 not in result.latent_order.tolist()
    assert len(result.latent_order) == result.n_active_latents == 9 - result.n_dead_latents


def test_compute__is_nan_not_an_error_when_nothing_is_active():
    result = variance_ratios(torch.zeros(4, 3, 5))
    assert result.n_active_latents == 0 and result.n_dead_latents == 5 and result.n_tokens == 4
    assert result.latent_order.numel() == 0
    assert math.isnan(result.latent_ratio) and math.isnan(result.var_layer)
    d = result.to_dict()
    assert d["latent_ratio"] is None and d["token_ratio"] is None
    json.dumps(d, allow_nan=False)


def test_latent_order__is_stable_for_ties():
    acts = torch.zeros(3, 4, 6)
    acts[:, 2, [5, 1, 3]] = 1.0  # E[L|J] = 2 for three latents
    acts[:, 0, 4] = 1.0
    assert variance_ratios(acts).latent_order.tolist() == [4, 1, 3, 5]


def test_activation_mass__heatmap_is_summed_activation_normalised_over_layers():
    acts = make_acts(40, 7, 16)
    result = variance_ratios(acts, weighting="activation_mass")
    mass = acts.double().sum(0).T  # [n_latents, n_layers]
    active = mass.sum(1) > 0
    assert_close(
        result.layer_given_latent[active], mass[active] / mass[active].sum(1, keepdim=True)
    )
    uniform = variance_ratios(acts)
    assert not torch.allclose(result.layer_given_latent[active], uniform.layer_given_latent[active])


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_update__streaming_in_chunks_equals_one_update(weighting):
    acts = make_acts(40, 7, 16)
    streamed = LayerDistributionStats(7, 16, weighting=weighting)
    for start, stop in [(0, 1), (1, 1), (1, 10), (10, 33), (33, 40)]:
        streamed.update(acts[start:stop])
    assert_same_stats(streamed, stats_of(acts, weighting))


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_merge__equals_one_shot_and_leaves_parts_unchanged(weighting):
    acts = make_acts(40, 7, 16)
    parts = [stats_of(acts[:15], weighting), stats_of(acts[15:], weighting)]
    before = parts[0].sum_p.clone()
    merged = LayerDistributionStats.merged(parts)
    assert_same_stats(merged, stats_of(acts, weighting))
    assert torch.equal(parts[0].sum_p, before)
    in_place = stats_of(acts[:15], weighting).merge(parts[1])
    assert_same_stats(in_place, merged)


def test_merge__rejects_different_weighting_or_sizes():
    stats = LayerDistributionStats(3, 4)
    with pytest.raises(MLSAEError, match="merge"):
        stats.merge(LayerDistributionStats(3, 4, weighting="activation_mass"))
    with pytest.raises(MLSAEError, match="merge"):
        stats.merge(LayerDistributionStats(3, 5))


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize(("sizes", "k"), [((1, 3, 5), 2), ((13, 2, 4), 4), ((40, 7, 16), 5)])
def test_update_sparse__equals_dense_update(sizes, k, weighting):
    g = torch.Generator().manual_seed(3)
    dense = torch.rand(sizes, generator=g)
    dense[dense < 0.7] = 0.0  # some top-k values are zero, i.e. inactive
    indices, values = to_sparse(dense, k)
    as_dense = torch.zeros(sizes).scatter_(2, indices, values)
    assert (values == 0).any()
    mask = torch.arange(sizes[0]) % 4 != 2

    sparse = LayerDistributionStats(sizes[1], sizes[2], weighting=weighting)
    sparse.update_sparse(indices, values, mask)
    assert_same_stats(sparse, stats_of(as_dense, weighting, mask))
    ref = brute_force(as_dense, mask, weighting)
    assert_close(sparse.compute().token_ratio, ref["token_ratio"])
    assert_close(sparse.compute().layer_given_latent, ref["P"])


def test_mask__excludes_tokens_but_counts_only_valid_ones():
    acts = make_acts(24, 5, 9)
    mask = torch.rand(24, generator=torch.Generator().manual_seed(5)) < 0.5
    masked = stats_of(acts, mask=mask)
    assert masked.n_tokens == int(mask.sum())
    assert_same_stats(masked, stats_of(acts[mask]))
    ref = brute_force(acts, mask)
    assert_close(masked.compute().latent_ratio, ref["latent_ratio"])
    assert_close(masked.compute().var_layer, ref["var_layer"])


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_save_load__round_trips_with_metadata(tmp_path, weighting):
    stats = stats_of(make_acts(24, 5, 9), weighting, mask=torch.arange(24) > 2)
    path = tmp_path / "sub" / "layer_stats.safetensors"
    stats.save(path)
    stats.save(path)  # overwriting is atomic too
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    assert meta == {"n_layers": 5, "n_latents": 9, "weighting": weighting, "n_tokens_seen": 21}

    loaded = LayerDistributionStats.load(path)
    assert loaded.weighting == weighting
    assert_same_stats(loaded, stats)
    assert loaded.compute().to_dict() == stats.compute().to_dict()

    copy = LayerDistributionStats(5, 9, weighting=weighting)
    copy.load_state_dict(stats.state_dict())
    assert_same_stats(copy, stats)


def test_load__explains_a_missing_file_or_mismatched_state(tmp_path):
    with pytest.raises(MLSAEError, match="No statistics file"):
        LayerDistributionStats.load(tmp_path / "missing.safetensors")
    with pytest.raises(MLSAEError, match="n_latents"):
        LayerDistributionStats(5, 8).load_state_dict(LayerDistributionStats(5, 9).state_dict())


def test_update__rejects_negative_values_bad_shapes_and_indices():
    stats = LayerDistributionStats(2, 3)
    with pytest.raises(MLSAEError, match=">= 0"):
        stats.update(-torch.ones(1, 2, 3))
    with pytest.raises(MLSAEError, match="shape"):
        stats.update(torch.ones(1, 3, 3))
    with pytest.raises(MLSAEError, match="mask"):
        stats.update(torch.ones(2, 2, 3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(MLSAEError, match="latent indices"):
        stats.update_sparse(torch.full((1, 2, 1), 3), torch.ones(1, 2, 1))
    with pytest.raises(MLSAEError, match="k\\]"):
        stats.update_sparse(torch.zeros(1, 2, 1, dtype=torch.long), torch.ones(1, 2, 2))
    with pytest.raises(MLSAEError, match="weighting"):
        LayerDistributionStats(2, 3, weighting="mass")  # type: ignore[arg-type]


def brute_reference_ratios(acts: torch.Tensor) -> tuple[float, float]:
    """The literal reading of the reference code, with explicit loops (see its docstring)."""
    tokens, n_layers, n_latents = acts.shape
    a = acts.double().tolist()
    layers = range(n_layers)
    p = [[[0.0] * n_layers for _ in range(n_latents)] for _ in range(tokens)]
    for t in range(tokens):
        for j in range(n_latents):
            total = sum(a[t][layer][j] for layer in layers)
            if total > 0:
                p[t][j] = [a[t][layer][j] / total for layer in layers]

    def raw_var(r):
        return sum(lay * lay * r[lay] for lay in layers) - sum(lay * r[lay] for lay in layers) ** 2

    q = [
        [sum(p[t][j][lay] for t in range(tokens)) / tokens for lay in layers]
        for j in range(n_latents)
    ]
    q_all = [sum(q[j][lay] for j in range(n_latents)) / n_latents for lay in layers]
    mean_var_latent = sum(raw_var(q[j]) for j in range(n_latents)) / n_latents
    mean_var_token = sum(raw_var(p[t][j]) for t in range(tokens) for j in range(n_latents))
    mean_var_token /= tokens * n_latents
    return mean_var_latent / raw_var(q_all), mean_var_token / mean_var_latent


def test_reference_per_batch_ratios__match_literal_loops_and_average_over_batches():
    batches = [make_acts(13, 4, 6, seed=s) for s in range(3)]
    expected = [brute_reference_ratios(b) for b in batches]
    out = reference_per_batch_ratios(batches)
    assert out["n_batches"] == 3
    assert_close(out["latent_ratios"], [e[0] for e in expected])
    assert_close(out["token_ratios"], [e[1] for e in expected])
    assert_close(out["latent_ratio"], sum(e[0] for e in expected) / 3)
    assert_close(out["token_ratio"], sum(e[1] for e in expected) / 3)
    # Not the paper's estimator: the un-renormalised variances give other numbers.
    assert abs(out["latent_ratios"][0] - variance_ratios(batches[0]).latent_ratio) > 1e-3


def test_reference_per_batch_ratios__accepts_top_k_pairs():
    dense = make_acts(13, 4, 6)
    indices, values = to_sparse(dense, 6)
    out = reference_per_batch_ratios([(indices, values)], n_latents=6)
    assert_close(out["latent_ratios"], reference_per_batch_ratios([dense])["latent_ratios"])
    with pytest.raises(MLSAEError, match="n_latents"):
        reference_per_batch_ratios([(indices, values)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_update_sparse__on_cuda_equals_cpu():
    dense = make_acts(40, 7, 16)
    indices, values = to_sparse(dense, 5)
    cpu = LayerDistributionStats(7, 16)
    cpu.update_sparse(indices, values)
    cuda = LayerDistributionStats(7, 16, device="cuda")
    cuda.update_sparse(indices.cuda(), values.cuda())
    assert_close(cuda.compute().layer_given_latent, cpu.compute().layer_given_latent)
    assert cuda.compute().to_dict() == pytest.approx(cpu.compute().to_dict(), nan_ok=True)
