"""Figure functions: traces, axes and hover on small inputs, checked against direct math."""

import math

import numpy as np
import pytest
import torch

from mlsae_lens.analysis import ResidualNormStats, variance_ratios
from mlsae_lens.figures import (
    adjacent_cosine_figure,
    latent_token_figure,
    layer_heatmap_figure,
    layer_moment_histograms_figure,
    per_layer_fvu_figure,
    residual_norm_figure,
    training_curve_figure,
    variance_ratio_figure,
)


def norm_result(n_layers: int, seed: int, centered: bool = True):
    resid = torch.randn(50, n_layers, 8, generator=torch.Generator().manual_seed(seed)) + 3.0
    if centered:
        return ResidualNormStats.from_two_passes(lambda: [resid], n_layers, 8).compute()
    stats = ResidualNormStats(n_layers, 8)
    stats.update(resid)
    return stats.compute()


def test_norm_profiles_of_several_models_overlay_on_the_relative_layer() -> None:
    results = {"small": norm_result(3, 0), "deep": norm_result(6, 1)}
    fig = residual_norm_figure(results)
    assert [t.name for t in fig.data] == [
        "small (raw)",
        "small (centered)",
        "deep (raw)",
        "deep (centered)",
    ]
    assert fig.data[0].x.tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert fig.data[2].x.tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])
    assert fig.data[0].y.tolist() == pytest.approx(results["small"].mean_norm.tolist())
    assert fig.data[1].y.tolist() == pytest.approx(results["small"].centered_mean_norm.tolist())
    assert fig.data[1].line.dash == "dash"
    assert fig.data[0].line.color == fig.data[1].line.color != fig.data[2].line.color
    assert "layer %{customdata}" in fig.data[0].hovertemplate


def test_norm_profile_without_a_centered_pass_shows_the_rms_centered_norm() -> None:
    result = norm_result(3, 0, centered=False)
    fig = residual_norm_figure({"m": result})
    assert fig.data[1].name == "m (centered (RMS))"
    assert fig.data[1].y.tolist() == pytest.approx(result.centered_rms_norm.tolist())


def test_adjacent_cosines_are_drawn_at_the_lower_layer() -> None:
    result = norm_result(4, 2)
    fig = adjacent_cosine_figure({"m": result})
    assert [t.name for t in fig.data] == ["m (raw)", "m (centered)"]
    assert fig.data[0].x.tolist() == pytest.approx([0.25, 0.5, 0.75])
    assert fig.data[1].y.tolist() == pytest.approx(result.mean_cosine_adjacent_centered.tolist())
    assert len(adjacent_cosine_figure({"m": norm_result(4, 2, centered=False)}).data) == 1


def test_heatmap_puts_layer_zero_on_top_and_sorts_latents_by_expected_layer() -> None:
    acts = torch.zeros(4, 3, 5)
    acts[:, 2, 0] = 1.0  # latent 0: always layer 2
    acts[:, 0, 1] = 1.0  # latent 1: always layer 0
    acts[:2, 1, 3] = 1.0  # latent 3: layer 1 on half the tokens, layer 2 on the others
    acts[2:, 2, 3] = 1.0
    result = variance_ratios(acts)  # latents 2 and 4 are dead
    fig = layer_heatmap_figure(result.layer_given_latent, result.latent_order, "P(L|J)")
    heat = fig.data[0]
    assert heat.z.shape == (3, 3)  # layers x active latents
    assert heat.customdata[0].tolist() == [1, 3, 0]  # E[L|J] = 0, 1.5, 2
    np.testing.assert_allclose(heat.z[:, 1], [0.0, 0.5, 0.5])
    assert fig.layout.yaxis.autorange == "reversed"
    assert heat.colorscale is not None
    for word in ("latent", "layer", "P(L|J)"):
        assert word in heat.hovertemplate


def test_heatmap_can_name_latents_of_a_subset() -> None:
    p = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    fig = layer_heatmap_figure(p, torch.tensor([1, 0]), "prompt", latent_ids=torch.tensor([40, 7]))
    assert fig.data[0].customdata[0].tolist() == [7, 40]


def test_wide_heatmaps_average_consecutive_sorted_latents_into_bins() -> None:
    n_latents, n_layers, bins = 4101, 3, 20
    p = torch.rand(n_latents, n_layers, generator=torch.Generator().manual_seed(0))
    p = p / p.sum(1, keepdim=True)
    order = torch.randperm(n_latents, generator=torch.Generator().manual_seed(1))
    fig = layer_heatmap_figure(p, order, "P(L|J)", max_columns=bins)
    z = fig.data[0].z
    assert z.shape == (n_layers, bins)
    edges = np.linspace(0, n_latents, bins + 1).round().astype(int)
    sorted_p = p[order].T.numpy()
    for b in (0, 7, bins - 1):
        np.testing.assert_allclose(z[:, b], sorted_p[:, edges[b] : edges[b + 1]].mean(1), rtol=1e-5)
    assert fig.data[0].customdata[0, -1].tolist() == [edges[-2], n_latents - 1]
    assert f"{n_latents} latents averaged into {bins} bins" in fig.layout.title.text
    np.testing.assert_allclose(z.sum(0), 1.0, rtol=1e-5)  # bins of distributions still sum to 1


def test_token_view_labels_tokens_and_layers() -> None:
    acts = torch.arange(12.0).reshape(4, 3)  # [tokens, layers]
    tokens = ["When", " John", " and", "\n"]
    fig = latent_token_figure(acts, tokens, latent=17)
    heat = fig.data[0]
    assert heat.z.shape == (3, 4)
    np.testing.assert_array_equal(heat.z, acts.numpy().T)
    assert list(fig.layout.xaxis.ticktext) == ["When", " John", " and", "\\n"]
    assert fig.layout.yaxis.autorange == "reversed"
    assert "latent 17" in heat.hovertemplate and "token" in heat.hovertemplate
    with pytest.raises(ValueError, match="token strings"):
        latent_token_figure(acts, tokens[:2], latent=17)


def test_histograms_leave_out_dead_latents() -> None:
    expected = torch.tensor([0.5, math.nan, 2.0, 1.0])
    var = torch.tensor([0.25, math.nan, 0.0, 1.0])
    fig = layer_moment_histograms_figure(expected, var)
    assert len(fig.data) == 2
    assert fig.data[0].x.tolist() == [0.5, 2.0, 1.0]
    assert fig.data[1].x.tolist() == [0.25, 0.0, 1.0]
    assert "3 active latents" in fig.layout.title.text


def test_variance_ratio_bars_group_runs_and_skip_undefined_values() -> None:
    ratios = {
        "a": {"latent_ratio": 0.6, "token_ratio": 0.05},
        "b": {"latent_ratio": 0.8, "token_ratio": None},
    }
    fig = variance_ratio_figure(ratios)
    assert [list(t.x) for t in fig.data] == [["a", "b"], ["a", "b"]]
    assert list(fig.data[0].y) == [0.6, 0.8]
    assert fig.data[1].y[0] == 0.05 and math.isnan(fig.data[1].y[1])
    assert fig.layout.barmode == "group"
    assert "Eq. 11" in fig.data[0].name and "Eq. 12" in fig.data[1].name


def test_variance_ratio_bars_show_the_reference_estimator_beside_the_paper() -> None:
    fig = variance_ratio_figure(
        {"run": {"latent_ratio": 0.6, "token_ratio": 0.05}},
        {"run": {"latent_ratio": 0.7, "token_ratio": 0.1}},
    )
    assert [t.name for t in fig.data] == [
        "Eq. 11: E[Var(L|J)] / Var(L) (paper definition)",
        "Eq. 11: E[Var(L|J)] / Var(L) (reference estimator)",
        "Eq. 12: E[Var(L|J,T)] / E[Var(L|J)] (paper definition)",
        "Eq. 12: E[Var(L|J,T)] / E[Var(L|J)] (reference estimator)",
    ]
    assert [list(t.y) for t in fig.data] == [[0.6], [0.7], [0.05], [0.1]]
    assert [t.text[0] for t in fig.data] == ["0.600", "0.700", "0.050", "0.100"]
    assert fig.data[1].marker.pattern.shape == "/" and not fig.data[0].marker.pattern.shape


def test_training_curve_puts_each_metric_on_its_own_axis() -> None:
    log = [
        {"tokens": t, "fvu": 0.5, "loss": 0.5, "dead_fraction": 0.0, "l0": 4.0} for t in (10, 20)
    ]
    fig = training_curve_figure(log)
    # loss equals FVU here: on one axis one line would hide the other
    assert [t.name for t in fig.data] == ["training loss", "FVU", "L0 per vector", "dead fraction"]
    assert len({t.yaxis for t in fig.data}) == 4


def test_existing_training_and_fvu_figures_still_draw() -> None:
    log = [
        {"tokens": t, "fvu": 1.0, "loss": 1.0, "dead_fraction": 0.0, "l0": 4.0} for t in (10, 20)
    ]
    assert len(training_curve_figure(log).data) == 4
    fig = per_layer_fvu_figure({"MLSAE": [0.5, 0.4], "PCA": [0.6, 0.5]}, n_layers=2)
    assert [t.name for t in fig.data] == ["MLSAE", "PCA"]
