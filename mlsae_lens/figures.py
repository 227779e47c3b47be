"""Figures as ``plotly.graph_objects.Figure`` objects; nothing here writes to disk.

The report module owns output; figure functions take plain tensors, dicts or the result
dataclasses of :mod:`mlsae_lens.analysis` so notebooks can call them directly. Arrays go to
plotly as numpy arrays, which plotly embeds as compact base64 typed arrays.

Heatmaps follow the reference figures (Lawson et al. 2024, Figs. 2/3/6/7): layers on the y axis
with layer 0 on top, latents on the x axis sorted by E[L|J], colormap ``magma_r``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from torch import Tensor

from mlsae_lens.analysis.residual import ResidualNormResult

HEATMAP_COLORSCALE = "magma_r"
MAX_HEATMAP_COLUMNS = 2000
"""Aggregate heatmaps with more sorted latents than this are averaged into this many bins."""


def training_curve_figure(log: Sequence[dict[str, float]]) -> go.Figure:
    """Loss, FVU, L0 and dead fraction against training tokens, one panel each.

    One panel per metric because the loss of a TopK SAE is (close to) its FVU: on one shared
    axis the FVU line was drawn exactly under the loss line and could not be seen.
    """
    tokens = [row["tokens"] for row in log]
    panels = (
        ("loss", "training loss"),
        ("fvu", "FVU"),
        ("l0", "L0 per vector"),
        ("dead_fraction", "dead fraction"),
    )
    panels = tuple((key, title) for key, title in panels if any(key in row for row in log))
    n_cols = 2
    n_rows = max(1, -(-len(panels) // n_cols))
    fig = make_subplots(
        rows=n_rows,
        cols=n_cols,
        shared_xaxes=True,
        subplot_titles=[title for _, title in panels],
        vertical_spacing=0.12,
    )
    for i, (key, title) in enumerate(panels):
        row, col = divmod(i, n_cols)
        fig.add_trace(
            go.Scatter(
                x=tokens,
                y=[row_.get(key, np.nan) for row_ in log],
                name=title,
                mode="lines",
                line={"color": _color(i)},
                showlegend=False,
                hovertemplate=f"{title}: %{{y:.4g}}<br>tokens: %{{x}}<extra></extra>",
            ),
            row=row + 1,
            col=col + 1,
        )
        fig.update_yaxes(title_text=title, rangemode="tozero", row=row + 1, col=col + 1)
    for col in range(1, n_cols + 1):
        fig.update_xaxes(title_text="training tokens", row=n_rows, col=col)
    fig.update_layout(title="Training curve", height=280 * n_rows + 100)
    return fig


def per_layer_fvu_figure(series: dict[str, Sequence[float]], n_layers: int) -> go.Figure:
    """FVU per layer against the relative layer (l + 1) / n_layers (layer l is the output of
    l + 1 blocks, as in the other per-layer figures), one line per method."""
    relative = [(layer + 1) / n_layers for layer in range(n_layers)]
    fig = go.Figure()
    for name, values in series.items():
        fig.add_trace(
            go.Scatter(
                x=relative,
                y=list(values),
                mode="lines+markers",
                name=name,
                customdata=list(range(n_layers)),
                hovertemplate=f"{name}<br>layer %{{customdata}}<br>FVU %{{y:.4f}}<extra></extra>",
            )
        )
    fig.update_layout(
        title="Test FVU per layer (normalized space)",
        xaxis_title="relative layer (l + 1) / n_layers",
        yaxis={"title": "fraction of variance unexplained", "rangemode": "tozero"},
    )
    return fig


# ---------------------------------------------------------------------- residual stream


def _color(i: int) -> str:
    """One colour per model, shared by its raw and centered lines."""
    palette = plotly.colors.qualitative.Plotly
    return palette[i % len(palette)]


def residual_norm_figure(results: Mapping[str, ResidualNormResult]) -> go.Figure:
    """Mean L2 norm per layer against the relative layer, raw and centered (paper Fig. 4).

    One solid line (raw) and one dashed line (after subtracting each layer's dataset mean) per
    model, so models with different depths overlay on the same ``(0, 1]`` axis. Where no
    centered second pass ran, the dashed line shows the exact one-pass RMS centered norm.
    """
    fig = go.Figure()
    for i, (name, result) in enumerate(results.items()):
        layers = np.arange(result.relative_layer.shape[0])
        x = result.relative_layer.numpy()
        centered, label = result.centered_mean_norm, "centered"
        if bool(centered.isnan().all()):
            centered, label = result.centered_rms_norm, "centered (RMS)"
        for values, kind, dash in ((result.mean_norm, "raw", "solid"), (centered, label, "dash")):
            hover = f"{name}, {kind}<br>layer %{{customdata}} (relative %{{x:.3f}})<br>mean norm %{{y:.4g}}"
            fig.add_trace(_profile_trace(x, values, f"{name} ({kind})", dash, i, layers, hover))
    fig.update_layout(
        title="Mean L2 norm of the residual stream per layer",
        xaxis_title="relative layer (l + 1) / n_layers",
        yaxis={"title": "mean L2 norm", "rangemode": "tozero"},
    )
    return fig


def _profile_trace(x, values, name: str, dash: str, color_index: int, customdata, hover: str) -> go.Scatter:
    """One line of a per-layer profile (norms, cosines): one color per model, dash per kind."""
    return go.Scatter(
        x=x,
        y=values.numpy(),
        mode="lines+markers",
        name=name,
        line={"dash": dash, "color": _color(color_index)},
        customdata=customdata,
        hovertemplate=hover + "<extra></extra>",
    )


def adjacent_cosine_figure(results: Mapping[str, ResidualNormResult]) -> go.Figure:
    """Mean cosine similarity of a token's residual vectors at layers l and l + 1.

    Raw (solid) and after per-layer centering (dashed), plotted at the lower layer's relative
    position. The centered line is left out where no second pass ran.
    """
    fig = go.Figure()
    for i, (name, result) in enumerate(results.items()):
        n_pairs = result.mean_cosine_adjacent.shape[0]
        x = result.relative_layer[:n_pairs].numpy()
        pairs = np.arange(n_pairs)
        series = [(result.mean_cosine_adjacent, "raw", "solid")]
        if not bool(result.mean_cosine_adjacent_centered.isnan().all()):
            series.append((result.mean_cosine_adjacent_centered, "centered", "dash"))
        for values, kind, dash in series:
            hover = f"{name}, {kind}<br>layers %{{customdata}} → %{{customdata}}+1<br>mean cosine %{{y:.4f}}"
            fig.add_trace(_profile_trace(x, values, f"{name} ({kind})", dash, i, pairs, hover))
    fig.update_layout(
        title="Mean cosine similarity between adjacent layers",
        xaxis_title="relative layer of the lower layer (l + 1) / n_layers",
        yaxis={"title": "mean cosine similarity", "range": [-0.05, 1.05]},
    )
    return fig


# ---------------------------------------------------------------------- latents over layers


def layer_heatmap_figure(
    layer_given_latent: Tensor,
    latent_order: Tensor,
    title: str,
    max_columns: int = MAX_HEATMAP_COLUMNS,
    latent_ids: Tensor | None = None,
) -> go.Figure:
    """P(L | J) as a heatmap: layers down (layer 0 on top), latents across sorted by E[L|J].

    Args:
        layer_given_latent: ``[n_latents, n_layers]`` distributions (NaN rows for dead latents).
        latent_order: Indices of the latents to show, in plotting order (e.g. active latents
            sorted by E[L|J], as ``LayerDistributionResult.latent_order``).
        title: Figure title; a note is appended when columns are binned.
        max_columns: With more latents than this, consecutive sorted latents are averaged into
            ``max_columns`` bins so the HTML stays small (d_sae reaches ~37k); the hover then
            names the range of ranks in each bin.
        latent_ids: The latent index of each row of ``layer_given_latent``, for the hover,
            when the rows are a subset (e.g. a prompt's active latents); default: row numbers.
    """
    order = latent_order.long().cpu().numpy()
    n_layers = layer_given_latent.shape[1]
    sorted_p = layer_given_latent.cpu().numpy()[order].T.astype(np.float32)  # [layers, latents]
    layers = np.arange(n_layers)
    n = order.shape[0]
    if n <= max_columns:
        ids = order if latent_ids is None else latent_ids.long().cpu().numpy()[order]
        ids = np.broadcast_to(ids.astype(np.int64), (n_layers, n))
        trace = go.Heatmap(
            z=sorted_p,
            x=np.arange(n),
            y=layers,
            customdata=np.ascontiguousarray(ids),
            colorscale=HEATMAP_COLORSCALE,
            zmin=0.0,
            colorbar={"title": "P(L|J)"},
            hovertemplate=(
                "latent %{customdata} (rank %{x})<br>layer %{y}<br>P(L|J) %{z:.3f}<extra></extra>"
            ),
        )
        xaxis_title = "latents sorted by E[L|J]"
    else:
        edges = np.linspace(0, n, max_columns + 1).round().astype(np.int64)
        sums = np.add.reduceat(sorted_p, edges[:-1], axis=1)
        binned = (sums / np.diff(edges)[None, :]).astype(np.float32)
        ranges = np.stack([edges[:-1], edges[1:] - 1], axis=-1)  # [bins, 2] first/last rank
        trace = go.Heatmap(
            z=binned,
            x=np.arange(max_columns),
            y=layers,
            customdata=np.ascontiguousarray(np.broadcast_to(ranges, (n_layers, max_columns, 2))),
            colorscale=HEATMAP_COLORSCALE,
            zmin=0.0,
            colorbar={"title": "mean P(L|J)"},
            hovertemplate=(
                "latents ranked %{customdata[0]}–%{customdata[1]} by E[L|J]<br>layer %{y}"
                "<br>mean P(L|J) %{z:.3f}<extra></extra>"
            ),
        )
        title = f"{title} ({n} latents averaged into {max_columns} bins of consecutive ranks)"
        xaxis_title = f"bins of latents sorted by E[L|J] (~{n / max_columns:.1f} latents each)"
    fig = go.Figure(trace)
    fig.update_layout(
        title=title,
        xaxis_title=xaxis_title,
        yaxis={"title": "layer", "autorange": "reversed"},
    )
    return fig


def latent_token_figure(
    activations: Tensor,
    token_strings: Sequence[str],
    latent: int,
) -> go.Figure:
    """One latent's activation at every (token, layer) of a prompt.

    Args:
        activations: ``[n_tokens, n_layers]`` post-ReLU activations of ``latent``.
        token_strings: The prompt's tokens as text, one per row of ``activations``.
        latent: The latent's index, for the title and hover.
    """
    acts = activations.float().cpu().numpy().T  # [layers, tokens]
    n_layers, n_tokens = acts.shape
    if len(token_strings) != n_tokens:
        raise ValueError(f"{len(token_strings)} token strings for {n_tokens} token rows")
    labels = [repr(s)[1:-1] for s in token_strings]  # make whitespace and newlines visible
    fig = go.Figure(
        go.Heatmap(
            z=acts,
            x=np.arange(n_tokens),
            y=np.arange(n_layers),
            customdata=[labels] * n_layers,
            colorscale=HEATMAP_COLORSCALE,
            zmin=0.0,
            colorbar={"title": "activation"},
            hovertemplate=(
                f"latent {latent}<br>token %{{x}} '%{{customdata}}'<br>layer %{{y}}"
                "<br>activation %{z:.4g}<extra></extra>"
            ),
        )
    )
    fig.update_layout(
        title=f"Latent {latent}: activation per token and layer",
        xaxis={
            "title": "token",
            "tickmode": "array",
            "tickvals": list(range(n_tokens)),
            "ticktext": labels,
            "tickangle": -45,
        },
        yaxis={"title": "layer", "autorange": "reversed"},
    )
    return fig


def layer_moment_histograms_figure(expected_layer: Tensor, var_layer: Tensor) -> go.Figure:
    """Histograms of E[L|J] and Var(L|J) across active latents (NaN = dead, left out)."""
    active = ~expected_layer.isnan()
    fig = make_subplots(rows=1, cols=2, subplot_titles=("E[L|J]", "Var(L|J)"))
    for col, (values, name) in enumerate(
        ((expected_layer[active], "E[L|J]"), (var_layer[active], "Var(L|J)")), start=1
    ):
        fig.add_trace(
            go.Histogram(
                x=values.cpu().numpy(),
                name=name,
                showlegend=False,
                hovertemplate=f"{name} %{{x}}<br>%{{y}} latents<extra></extra>",
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text=f"{name} (layers{'²' if col == 2 else ''})", row=1, col=col)
    fig.update_yaxes(title_text="active latents", row=1, col=1)
    fig.update_layout(title=f"Distribution over {int(active.sum())} active latents", bargap=0.05)
    return fig


def variance_ratio_figure(
    ratios: Mapping[str, Mapping[str, float | None]],
    reference: Mapping[str, Mapping[str, float | None] | None] | None = None,
) -> go.Figure:
    """Eq. 11 and Eq. 12 side by side for one or several MLSAEs (paper Fig. 5).

    Args:
        ratios: Run name → dict with ``latent_ratio`` (Eq. 11) and ``token_ratio`` (Eq. 12)
            by the paper's definition; ``None`` (undefined) gives no bar, as in the paper.
        reference: Run name → the same keys as the reference code estimates them (per-batch
            ratios averaged over batches, ``metrics.json``'s ``reference_ratios``); drawn as
            hatched bars beside the paper's. Runs without them get no hatched bars.
    """
    names = list(ratios)
    reference = {k: v for k, v in (reference or {}).items() if v}
    estimators = [("paper definition", ratios, "")]
    if reference:
        estimators.append(("reference estimator", reference, "/"))
    fig = go.Figure()
    for i, (key, label) in enumerate(
        (
            ("latent_ratio", "Eq. 11: E[Var(L|J)] / Var(L)"),
            ("token_ratio", "Eq. 12: E[Var(L|J,T)] / E[Var(L|J)]"),
        )
    ):
        for estimator, source, pattern in estimators:
            values = [(source.get(name) or {}).get(key) for name in names]
            name = label if not reference else f"{label} ({estimator})"
            fig.add_trace(
                go.Bar(
                    x=names,
                    y=[np.nan if v is None else v for v in values],
                    name=name,
                    marker={"color": _color(i), "pattern": {"shape": pattern}},
                    text=["" if v is None else f"{v:.3f}" for v in values],
                    textposition="outside",
                    hovertemplate=f"%{{x}}<br>{name}<br>%{{y:.4f}}<extra></extra>",
                )
            )
    fig.update_layout(
        title="Variance ratios over layers",
        barmode="group",
        yaxis={"title": "ratio", "range": [0, 1.05]},
        xaxis_title="MLSAE",
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


# ---------------------------------------------------------------------- evaluation

EVAL_PLOT_METRICS = (
    ("fvu", "FVU"),
    ("delta_ce", "Δ CE (nats)"),
    ("kl_div_with_sae", "KL(clean ‖ spliced)"),
    ("ce_loss_score", "CE loss recovered"),
    ("l0", "L0"),
)


def eval_metrics_figure(methods: Mapping[str, Mapping], layers: Sequence[int], n_layers: int) -> go.Figure:
    """Each evaluation metric against the relative layer (l + 1) / n_layers, one line per method.

    ``methods`` maps a method key to its eval.json entry (``label`` and ``per_layer`` lists over
    ``layers``); metrics no method has are left out.
    """
    metrics = [
        (key, title)
        for key, title in EVAL_PLOT_METRICS
        if any(key in m["per_layer"] for m in methods.values())
    ]
    fig = make_subplots(rows=len(metrics), cols=1, shared_xaxes=True, vertical_spacing=0.04,
                        subplot_titles=[title for _, title in metrics])
    x = [(layer + 1) / n_layers for layer in layers]
    for i, (name, method) in enumerate(methods.items()):
        for row, (key, _) in enumerate(metrics, start=1):
            values = method["per_layer"].get(key)
            if values is None:
                continue
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=[np.nan if v is None else v for v in values],
                    mode="lines+markers",
                    name=method["label"],
                    legendgroup=name,
                    showlegend=row == 1,
                    line={"color": _color(i)},
                    customdata=list(layers),
                    hovertemplate=f"{method['label']}<br>layer %{{customdata}}<br>{key} %{{y:.4g}}<extra></extra>",
                ),
                row=row,
                col=1,
            )
    fig.update_layout(title="Evaluation per layer (test split)", height=260 * len(metrics) + 80,
                      legend={"orientation": "h", "y": -0.05})
    fig.update_xaxes(title_text="relative layer (l + 1) / n_layers", row=len(metrics), col=1)
    return fig


def frequency_histogram_figure(histograms: Mapping[str, Mapping]) -> go.Figure:
    """Histogram of log10 latent firing frequency per method (from eval.json's
    ``frequency_histogram``: bin edges, counts, and the never-active latents in the legend)."""
    fig = go.Figure()
    for i, (label, hist) in enumerate(histograms.items()):
        edges = hist["log10_edges"]
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
        fig.add_trace(
            go.Bar(
                x=centers,
                y=hist["counts"],
                name=f"{label} ({hist['never_active']} of {hist['n_latents']} never active)",
                marker={"color": _color(i)},
                opacity=0.6,
            )
        )
    fig.update_layout(title="Latent firing frequency", barmode="overlay",
                      xaxis_title="log10 firing frequency (per vector)", yaxis_title="latents",
                      legend={"orientation": "h", "y": -0.2})
    return fig
