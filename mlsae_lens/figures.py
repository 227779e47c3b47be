"""Figures as ``plotly.graph_objects.Figure`` objects; nothing here writes to disk.

The report module owns output; figure functions take plain tensors or dicts so notebooks
can call them directly.
"""

from collections.abc import Sequence

import plotly.graph_objects as go


def training_curve_figure(log: Sequence[dict[str, float]]) -> go.Figure:
    """Loss, FVU, L0 and dead fraction against training tokens."""
    tokens = [row["tokens"] for row in log]
    fig = go.Figure()
    for key, axis in (("fvu", "y"), ("loss", "y"), ("dead_fraction", "y"), ("l0", "y2")):
        fig.add_trace(
            go.Scatter(
                x=tokens,
                y=[row[key] for row in log],
                name=key,
                yaxis=axis,
                hovertemplate=f"{key}: %{{y:.4f}}<br>tokens: %{{x}}<extra></extra>",
            )
        )
    fig.update_layout(
        title="Training curve",
        xaxis_title="training tokens",
        yaxis=dict(title="loss / FVU / dead fraction", rangemode="tozero"),
        yaxis2=dict(title="L0 per vector", overlaying="y", side="right", rangemode="tozero"),
        legend=dict(orientation="h", y=-0.2),
    )
    return fig


def per_layer_fvu_figure(series: dict[str, Sequence[float]], n_layers: int) -> go.Figure:
    """FVU per layer against the relative layer l / n_layers, one line per method."""
    relative = [layer / n_layers for layer in range(n_layers)]
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
        xaxis_title="relative layer l / n_layers",
        yaxis=dict(title="fraction of variance unexplained", rangemode="tozero"),
    )
    return fig
