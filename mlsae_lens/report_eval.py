"""The evaluation in the report and on the terminal: reconstruction and MLSAE vs baselines.

Draws what ``eval.json`` holds (and, in the demo, a fresh
:class:`~mlsae_lens.evals.ReconstructionResult`): the per-layer FVU with its PCA floor, and the
comparison table of the MLSAE and its baselines, which ``mlsae-lens eval`` also prints as
Markdown. It reads results only; computing them is :mod:`mlsae_lens.eval_run`'s.
"""

import html
from typing import Any

import torch

from mlsae_lens.evals import ReconstructionResult
from mlsae_lens.figures import eval_metrics_figure, frequency_histogram_figure, per_layer_fvu_figure
from mlsae_lens.report import ReportSection

TABLE_METRICS = (
    ("fvu", "FVU"),
    ("delta_ce", "Δ CE (nats)"),
    ("kl_div_with_sae", "KL (nats/token)"),
    ("ce_loss_score", "CE loss recovered (vs zero-abl.)"),
    ("ce_loss_score_mean_ablation", "CE loss recovered (vs mean-abl.)"),
    ("l0", "L0"),
)


def comparison_table(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method of an eval.json: means over the evaluated layers, dead fraction,
    parameter count and training time (the table of the report and the CLI)."""
    rows = []
    for name, method in data.get("methods", {}).items():
        row: dict[str, Any] = {"method": method["label"]}
        for key, title in TABLE_METRICS:
            row[title] = method["mean"].get(key)
        row["dead fraction"] = method.get("dead_fraction")
        row["parameters"] = method.get("n_parameters")
        row["training s"] = method.get("training_seconds")
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`comparison_table` rows."""
    if not rows:
        return ""
    keys = list(rows[0])

    def cell(value: Any) -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def reconstruction_section(result: ReconstructionResult, n_layers: int, k: int) -> ReportSection:
    """Per-layer FVU of the MLSAE (and its PCA floor, when measured) with the summary table."""
    series = {"MLSAE": result.fvu.tolist()}
    if result.pca_fvu is not None:
        series[f"PCA rank {k} (in-sample)"] = result.pca_fvu.tolist()
    summary = result.to_dict()
    table = {key: value for key, value in summary.items() if key != "per_layer"}
    return ReportSection(
        title="Reconstruction on the held-out split",
        html=(
            "<p>FVU per layer in the SAE's normalized space. The PCA floor is the best rank-k "
            "linear reconstruction of the very same vectors (fit in-sample, per layer).</p>"
        ),
        figures=[per_layer_fvu_figure(series, n_layers)],
        table=table,
    )


def reconstruction_section_from_eval(data: dict[str, Any], k: int) -> ReportSection:
    """:func:`reconstruction_section` of the MLSAE's results saved in ``eval.json``."""
    per_layer = data["per_layer"]
    result = ReconstructionResult(
        n_tokens=data["n_tokens"],
        fvu=torch.tensor(per_layer["fvu"]),
        mse=torch.tensor(per_layer["mse"]),
        l0=torch.tensor(per_layer["l0"]),
        l1=torch.tensor(per_layer["l1"]),
        dead_fraction=data["dead_fraction"],
        pca_fvu=torch.tensor(per_layer["pca_fvu"]) if "pca_fvu" in per_layer else None,
    )
    return reconstruction_section(result, len(per_layer["fvu"]), k)


def evaluation_section(data: dict[str, Any]) -> ReportSection:
    """MLSAE vs baselines from eval.json: the comparison table, metrics per layer, firing."""
    rows = comparison_table(data)
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join(
        "<tr>" + "".join(
            f"<td>{'—' if v is None else html.escape(f'{v:.4g}' if isinstance(v, float) else str(v))}</td>"
            for v in row.values()
        ) + "</tr>"
        for row in rows
    )
    down = data.get("downstream")
    note = (
        f"<p>{data['n_tokens']} test tokens for reconstruction"
        + (f", {down['n_predicted_positions']} predicted positions for the downstream metrics "
           f"(clean CE {down['ce_loss_without_sae']:.4f} nats)" if down else "")
        + f"; means over layers {data['layers'] if len(data['layers']) < 12 else 'all'}. "
        "FVU in the MLSAE's normalized space; Δ CE and KL(clean ‖ spliced) splice a "
        "reconstruction into one layer's hook_resid_post (non-special positions only) and run "
        "the rest of the model; CE loss recovered is SAELens' ce_loss_score (relative to zero- "
        "or mean-ablation of that layer). PCA is fit in-sample on the evaluated tokens.</p>"
    )
    histograms = {
        m["label"]: m["frequency_histogram"]
        for m in data["methods"].values()
        if m.get("frequency_histogram")
    }
    figures = [eval_metrics_figure(data["methods"], data["layers"], data["n_layers"])]
    if histograms:
        figures.append(frequency_histogram_figure(histograms))
    return ReportSection(
        title="Evaluation: MLSAE vs baselines",
        html=note + f"<table><tr>{head}</tr>{body}</table>",
        figures=figures,
    )


__all__ = [
    "TABLE_METRICS",
    "comparison_table",
    "evaluation_section",
    "format_table",
    "reconstruction_section",
    "reconstruction_section_from_eval",
]
