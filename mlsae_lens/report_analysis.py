"""The analysis in the report: latent layer distributions, the single prompt, the residual stream.

Draws what ``mlsae-lens analyze`` saved (``metrics.json`` and, when present,
``stats.safetensors``) as report sections; it reads results only.
"""

import html
from typing import Any

import torch

from mlsae_lens.analysis_state import AnalysisStats
from mlsae_lens.figures import (
    adjacent_cosine_figure,
    latent_token_figure,
    layer_heatmap_figure,
    layer_moment_histograms_figure,
    residual_norm_figure,
    variance_ratio_figure,
)
from mlsae_lens.report import ReportSection
from mlsae_lens.run_dir import STATS_FILE

_FIRST_POSITION_NOTE = (
    "<p>Why the centered norm can exceed the raw norm at middle layers: the first position of "
    "each packed context (in SmolLM2, which has no BOS token, whatever token starts the "
    "context) carries a residual vector far larger than every other position's (~23,600 vs "
    "~150 at SmolLM2's layers 11–27), so it dominates the layer mean μ<sub>l</sub>, and "
    "subtracting μ<sub>l</sub> adds a large, nearly constant vector to every ordinary token "
    "(only the RMS centered norm is bounded by the raw RMS norm, not the mean norm).</p>"
)


def analysis_sections(metrics: dict[str, Any], stats: AnalysisStats | None) -> list[ReportSection]:
    """The analysis' report sections from ``metrics.json`` (``stats``: ``stats.safetensors``,
    for the heatmap, the histograms and the residual-stream figures, when present)."""
    layer = metrics["layer_distribution"]
    info = metrics["analysis"]
    ratios_table = {
        "Eq. 11  E[Var(L|J)] / Var(L)": layer["latent_ratio"],
        "Eq. 12  E[Var(L|J,T)] / E[Var(L|J)]": layer["token_ratio"],
        "Var(L)": layer["total_variance_identity_lhs"],
        "E[Var(L|J)] + Var(E[L|J])  (= Var(L))": layer["total_variance_identity_rhs"],
        "E[Var(L|J)]": layer["within_latent_identity_lhs"],
        "E[Var(L|J,T)] + E_J[Var_T(E[L|J,T])]  (= E[Var(L|J)])": layer[
            "within_latent_identity_rhs"
        ],
        "active latents": layer["n_active_latents"],
        "never-active latents": layer["n_dead_latents"],
        "latents (d_sae)": layer["n_latents"],
        "test tokens": layer["n_tokens"],
        "weighting": layer["weighting"],
    }
    reference = metrics.get("reference_ratios")
    if reference:
        ratios_table["Eq. 11, reference estimator"] = reference["latent_ratio"]
        ratios_table["Eq. 12, reference estimator"] = reference["token_ratio"]
        n_batches, last = reference["n_batches"], reference["last_batch_tokens"]
        ratios_table["reference batches"] = (
            f"{n_batches} of {reference['batch_tokens']} tokens"
            + ("" if last == reference["batch_tokens"] else f" (the last of {last})")
        )
    run_name = metrics["model"]["name"]
    latent_figures = [
        variance_ratio_figure({run_name: layer}, {run_name: reference} if reference else None)
    ]
    note = ""
    if stats is not None:
        result = stats.layer.compute()
        latent_figures += [
            layer_heatmap_figure(
                result.layer_given_latent,
                result.latent_order,
                f"P(L|J) over {result.n_tokens} test tokens",
            ),
            layer_moment_histograms_figure(result.expected_layer, result.var_layer_given_latent),
        ]
    else:
        note = f"<p>{STATS_FILE} is missing, so the heatmap and histograms are not drawn.</p>"
    p_token = (
        "P(T|J) uniform over the tokens where the latent is active (the paper)"
        if layer["weighting"] == "uniform_tokens"
        else "P(T|J) proportional to the latent's total activation on each token (the reference "
        "heatmaps)"
    )
    sections = [
        ReportSection(
            title="Latent distributions over layers",
            html=(
                "<p>P(L=l|T=t,J=j) ∝ h<sub>j</sub>(x<sub>t,l</sub>) (Eq. 10); "
                f"{p_token}; P(J) uniform over active latents. Layers are 0-based; variances "
                "are in layers². Both law-of-total-variance identities are shown with both "
                "sides. The bars give Eq. 11/12 by the paper's definition (over all analysed "
                "tokens)"
                + (
                    " and, hatched, as the reference code estimates them (per batch of "
                    f"{reference['batch_tokens']} tokens over every latent, dead ones included, "
                    "un-renormalised, then averaged over batches; special tokens dropped here)"
                    if reference
                    else ""
                )
                + ".</p>"
                + note
            ),
            figures=latent_figures,
            table=ratios_table,
        )
    ]
    prompt = metrics.get("prompt")
    if prompt:
        sparse = prompt["layer_given_latent"]
        p_layer = torch.zeros(sparse["shape"], dtype=torch.float64)
        values = torch.tensor(sparse["value"], dtype=torch.float64)
        p_layer[sparse["row"], sparse["layer"]] = values
        sections.append(
            ReportSection(
                title="Single prompt",
                html=(
                    f"<p>Prompt: <code>{html.escape(prompt['text'])}</code> "
                    f"({len(prompt['tokens'])} tokens; {prompt['n_special_tokens_dropped']} "
                    "special tokens dropped). Latents active on the prompt only, sorted by the "
                    "prompt's E[L|J].</p>"
                ),
                figures=[
                    layer_heatmap_figure(
                        p_layer,
                        torch.arange(p_layer.shape[0]),
                        f"P(L|J) over the prompt ({p_layer.shape[0]} active latents)",
                        latent_ids=torch.tensor(prompt["latents"], dtype=torch.long),
                    ),
                    latent_token_figure(
                        torch.tensor(prompt["top_latent_activations"]),
                        prompt["tokens"],
                        prompt["top_latent"],
                    ),
                ],
                table={
                    "Eq. 11 on the prompt": prompt["latent_ratio"],
                    "Eq. 12 on the prompt": prompt["token_ratio"],
                    "latent with the largest total activation": prompt["top_latent"],
                },
            )
        )
    if stats is not None:
        resid = stats.resid.compute()
        name = metrics["model"]["name"]
        skipped = info.get("skip_first_position", False)
        sections.append(
            ReportSection(
                title="Residual stream",
                html=(
                    "<p>Mean L2 norm and adjacent-layer cosine similarity of hook_resid_post, raw "
                    "and after subtracting each layer's mean over the analysed tokens (Fig. 4). "
                    "Relative layer (l + 1) / n_layers: layer l is the output of l + 1 blocks.</p>"
                    + _FIRST_POSITION_NOTE
                    + (
                        "<p>This analysis left each context's first position out of these "
                        "statistics (--skip-first-position).</p>"
                        if skipped
                        else "<p>Every analysed token is included; <code>mlsae-lens analyze "
                        "--skip-first-position</code> leaves each context's first position "
                        "out of these statistics and the layer means.</p>"
                    )
                ),
                figures=[
                    residual_norm_figure({name: resid}),
                    adjacent_cosine_figure({name: resid}),
                ],
                table={
                    "tokens (raw)": resid.n_tokens,
                    "tokens (centered pass)": resid.n_tokens_centered,
                },
            )
        )
    sections.append(
        ReportSection(
            title="Analysis provenance",
            table={
                **info,
                "model": metrics["model"],
                "sae": metrics["sae"],
                "data": metrics["data"],
                "versions": metrics["versions"],
                "created": metrics["created"],
            },
        )
    )
    return sections


__all__ = ["analysis_sections"]
