"""The latent explorer: what each MLSAE latent responds to, layer by layer, offline.

:class:`Explorer` reads ``top_contexts.safetensors`` (collected by ``mlsae-lens analyze``, see
:mod:`mlsae_lens.top_contexts_file`) together with P(L|J), Var(L|J) and activation frequencies
from ``stats.safetensors`` (``Explorer.from_run(run_dir).top_contexts(latent, layer)`` in a
notebook), and :meth:`Explorer.write_html` writes one self-contained page (inline JS and JSON
data; no network; :mod:`mlsae_lens.explorer_page`) for ``mlsae-lens explore``. Nothing here
loads the model or the corpus.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlsae_lens.activation_samples import quantile_of
from mlsae_lens.analysis_state import AnalysisStats
from mlsae_lens.atomic import atomic_write_text
from mlsae_lens.errors import MLSAEError
from mlsae_lens.explorer_page import render_page
from mlsae_lens.run_dir import EXPLORER_FILE, RUN_FILE, STATS_FILE, TOP_CONTEXTS_FILE
from mlsae_lens.run_files import check_run_dir
from mlsae_lens.top_contexts_file import load_top_contexts
from mlsae_lens.topk_contexts import EMPTY_POSITION, TopContexts, co_appearing_latents

logger = logging.getLogger(__name__)

DEFAULT_WINDOW = (12, 4)
"""Tokens shown before and after the activating token (cut at the context's edges)."""


@dataclass
class Explorer:
    """Top contexts, quantile samples, activation histograms, layer distributions and logit
    effects of an analysed run.

    Build it with :meth:`from_run`. Everything is on the CPU; nothing loads the model.
    """

    run_dir: Path
    top: TopContexts
    context_size: int
    context_row: dict[int, int]
    """Test context id → row of :attr:`context_tokens`."""
    context_tokens: Tensor  # [n_contexts_kept, context_size]
    vocab: dict[int, str]
    lens: tuple[Tensor, Tensor, Tensor, Tensor]
    """``(top_ids, top_values, bottom_ids, bottom_values)``, each ``[d_sae, 10]``."""
    layer_given_latent: Tensor  # [d_sae, n_layers], NaN rows for never-active latents
    expected_layer: Tensor  # [d_sae]
    active_token_counts: Tensor  # [d_sae]
    n_tokens: int
    model_name: str = ""
    window: tuple[int, int] = DEFAULT_WINDOW
    var_layer: Tensor | None = None  # [d_sae] Var(L|J)
    samples: TopContexts | None = None
    """Sampled tokens (``values``: priorities, ``payload``: activations); ``None`` for files
    written before samples were collected."""
    hist_counts: Tensor | None = None  # [d_sae, n_layers, N_BINS]
    logit_note: str = ""

    @classmethod
    def from_run(cls, run_dir: str | Path, window: tuple[int, int] = DEFAULT_WINDOW) -> Explorer:
        """Read ``top_contexts.safetensors`` and ``stats.safetensors`` of an analysed run.

        Args:
            run_dir: A run directory that ``mlsae-lens analyze`` has processed.
            window: Tokens shown before and after the activating one.
        """
        run_dir = Path(run_dir)
        check_run_dir(run_dir)
        path = run_dir / TOP_CONTEXTS_FILE
        if not path.is_file():
            raise MLSAEError(
                f"{run_dir} has no {TOP_CONTEXTS_FILE}; run `mlsae-lens analyze {run_dir} "
                "--top-contexts` first"
            )
        contexts, extra, meta = load_top_contexts(path)
        top = contexts.top
        if not meta.get("complete"):
            raise MLSAEError(
                f"{path} is incomplete (the analysis stopped after {top.n_tokens} tokens); "
                f"finish it with `mlsae-lens analyze {run_dir} --resume`"
            )
        stats = AnalysisStats.load(run_dir / STATS_FILE)
        for key, value in meta["identity"].items():
            if stats.progress.get(key) != value:
                raise MLSAEError(
                    f"{path} and {STATS_FILE} come from different analyses ({key} differs); "
                    f"rerun `mlsae-lens analyze {run_dir} --overwrite`"
                )
        result = stats.layer.compute()
        context_ids = extra["context_ids"].tolist()
        try:
            model_name = json.loads((run_dir / RUN_FILE).read_text()).get("model_name", "")
        except json.JSONDecodeError:
            model_name = ""
        return cls(
            run_dir=run_dir,
            top=top,
            context_size=int(meta["context_size"]),
            context_row={c: i for i, c in enumerate(context_ids)},
            context_tokens=extra["context_tokens"].long(),
            vocab=dict(zip(extra["vocab_ids"].tolist(), meta["vocab_strings"], strict=True)),
            lens=(
                extra["lens_top_ids"].long(),
                extra["lens_top_values"],
                extra["lens_bottom_ids"].long(),
                extra["lens_bottom_values"],
            ),
            layer_given_latent=result.layer_given_latent,
            expected_layer=result.expected_layer,
            active_token_counts=result.active_token_counts,
            n_tokens=result.n_tokens,
            model_name=model_name,
            window=window,
            var_layer=result.var_layer_given_latent,
            samples=contexts.samples,
            hist_counts=contexts.hist.counts if contexts.hist is not None else None,
            logit_note=str(meta.get("logit_lens", "")),
        )

    @property
    def n_latents(self) -> int:
        return self.top.n_latents

    @property
    def n_layers(self) -> int:
        return self.top.n_layers

    def _check(self, latent: int, layer: int | None = None) -> None:
        if not 0 <= latent < self.n_latents:
            raise MLSAEError(f"latent {latent} is out of range: this SAE has {self.n_latents}")
        if layer is not None and not 0 <= layer < self.n_layers:
            raise MLSAEError(
                f"layer {layer} is out of range: this MLSAE reads layers 0..{self.n_layers - 1}"
            )

    def token_string(self, token_id: int) -> str:
        return self.vocab.get(token_id, f"<{token_id}>")

    def window_of(self, position: int) -> tuple[list[int], int]:
        """Token ids around a flattened test position (within its context) and its index."""
        context, offset = divmod(position, self.context_size)
        row = self.context_tokens[self.context_row[context]]
        before, after = self.window
        start = max(0, offset - before)
        return row[start : offset + after + 1].tolist(), offset - start

    def top_contexts(self, latent: int, layer: int) -> list[dict[str, Any]]:
        """The collected tokens of ``latent`` at ``layer``, strongest first.

        Returns:
            One dict per token: ``value`` (the activation), ``position`` (into the flattened
            test split), ``token_ids`` and ``tokens`` (strings) of the window, and ``index``
            (of the activating token in the window). Fewer than ``top_n`` when the latent was
            active at that layer on fewer tokens.
        """
        self._check(latent, layer)
        values = self.top.values[latent, layer].tolist()
        return self._windows(values, self.top.positions[latent, layer].tolist())

    def _windows(self, values: list[float], positions: list[int]) -> list[dict[str, Any]]:
        out = []
        for value, position in zip(values, positions, strict=True):
            if position == EMPTY_POSITION:
                break
            ids, index = self.window_of(position)
            out.append(
                {
                    "value": value,
                    "position": position,
                    "token_ids": ids,
                    "tokens": [self.token_string(i) for i in ids],
                    "index": index,
                }
            )
        return out

    def quantile_samples(self, latent: int, layer: int) -> list[dict[str, Any]]:
        """Tokens sampled uniformly among those where ``latent`` is active at ``layer``,
        sorted by activation (weakest first), each with ``quantile``: the fraction of the
        pair's activations below it, from the histogram. Same keys as :meth:`top_contexts`."""
        self._check(latent, layer)
        if self.samples is None or self.samples.payload is None or self.hist_counts is None:
            return []
        order = self.samples.payload[latent, layer].argsort()
        positions = self.samples.positions[latent, layer][order]
        values = self.samples.payload[latent, layer][order]
        keep = positions != EMPTY_POSITION
        out = self._windows(values[keep].tolist(), positions[keep].tolist())
        for entry in out:
            entry["quantile"] = quantile_of(self.hist_counts[latent, layer], entry["value"])
        return out

    def histogram(self, latent: int, layer: int) -> tuple[Tensor, Tensor]:
        """``(edges, counts)`` of the latent's activations at ``layer`` (log-spaced bins of
        :mod:`mlsae_lens.activation_samples`; the end bins are open)."""
        from mlsae_lens.activation_samples import bin_edges

        self._check(latent, layer)
        if self.hist_counts is None:
            raise MLSAEError(
                f"{self.run_dir} was analysed before histograms were collected; rerun "
                f"`mlsae-lens analyze {self.run_dir} --overwrite`"
            )
        return bin_edges(), self.hist_counts[latent, layer].clone()

    def logit_lens(self, latent: int) -> dict[str, list[tuple[str, float]]]:
        """The 10 tokens with the largest (``positive``) and smallest (``negative``) logit
        effect of the latent's decoder row through the model's final norm (see
        :func:`~mlsae_lens.topk_contexts.decoder_logit_lens`; :attr:`logit_note` says which
        formula the file holds)."""
        self._check(latent)
        top_ids, top_vals, bottom_ids, bottom_vals = self.lens
        return {
            "positive": [
                (self.token_string(i), v)
                for i, v in zip(top_ids[latent].tolist(), top_vals[latent].tolist(), strict=True)
            ],
            "negative": [
                (self.token_string(i), v)
                for i, v in zip(
                    bottom_ids[latent].tolist(), bottom_vals[latent].tolist(), strict=True
                )
            ],
        }

    def co_appearing(self, latent: int, n: int = 5) -> list[tuple[int, int]]:
        """``(latent, count)`` of the latents whose collected tokens most often include this
        latent's (same token, same layer): co-appearance among top contexts, not over all
        tokens."""
        self._check(latent)
        partners, counts = co_appearing_latents(self.top, torch.tensor([latent]), n)
        return [(p, c) for p, c in zip(partners[0].tolist(), counts[0].tolist(), strict=True) if p >= 0]

    def shown_latents(self, max_latents: int | None = None) -> Tensor:
        """Every active latent, or the ``max_latents`` most frequently active ones, in order of
        frequency (most frequent first, then id)."""
        active = (self.active_token_counts > 0).nonzero().squeeze(1)
        counts = self.active_token_counts[active]
        return active[torch.argsort(-counts, stable=True)[:max_latents]]

    # ------------------------------------------------------------------ the page

    def page_data(
        self, max_latents: int | None = None, contexts_per_layer: int = 8
    ) -> dict[str, Any]:
        """The JSON the page renders: an index of the shown latents (id, peak layer, E[L|J],
        Var(L|J), active-token count) for sorting and filtering, one card per shown latent, and
        the token tables. Sizes grow with the shown latents times the layers where each is
        active; ``max_latents`` and ``contexts_per_layer`` bound them."""
        if (max_latents is not None and max_latents < 1) or contexts_per_layer < 1:
            raise MLSAEError(
                "--max-latents and --contexts-per-layer must be positive, got "
                f"{max_latents} and {contexts_per_layer}"
            )
        shown = self.shown_latents(max_latents)
        partners, partner_counts = co_appearing_latents(self.top, shown, 5)
        top_ids, top_vals, bottom_ids, bottom_vals = self.lens
        used_contexts: set[int] = set()
        ctx = self._entries(self.top.values, self.top.positions, shown, contexts_per_layer)
        smp: list[dict[str, list[list[Any]]]] = [{} for _ in range(len(shown))]
        hist: list[dict[str, list[int]]] = [{} for _ in range(len(shown))]
        if self.samples is not None and self.samples.payload is not None:
            smp = self._entries(self.samples.payload, self.samples.positions, shown, None)
        if self.hist_counts is not None:
            hist = _trimmed_histograms(self.hist_counts[shown])
        p_layer = self.layer_given_latent[shown].nan_to_num(0.0)
        cards = []
        used_tokens: set[int] = set()
        for row, latent in enumerate(shown.tolist()):
            for entries in (*ctx[row].values(), *smp[row].values()):
                used_contexts.update(p // self.context_size for p, _ in entries)
            pos_ids, neg_ids = top_ids[latent].tolist(), bottom_ids[latent].tolist()
            used_tokens.update(pos_ids + neg_ids)
            cards.append(
                {
                    "p": [_round(float(x)) for x in p_layer[row].tolist()],
                    "ctx": ctx[row],
                    "smp": smp[row],
                    "hist": hist[row],
                    "pos": [[i, _round(v)] for i, v in zip(pos_ids, top_vals[latent].tolist())],
                    "neg": [[i, _round(v)] for i, v in zip(neg_ids, bottom_vals[latent].tolist())],
                    "co": [
                        [p, c]
                        for p, c in zip(partners[row].tolist(), partner_counts[row].tolist())
                        if p >= 0
                    ],
                }
            )
        contexts_out = {}
        for context in sorted(used_contexts):
            ids = self.context_tokens[self.context_row[context]].tolist()
            used_tokens.update(ids)
            contexts_out[str(context)] = ids
        var = self.var_layer if self.var_layer is not None else torch.full_like(
            self.expected_layer, float("nan")
        )
        from mlsae_lens.activation_samples import BINS_PER_DECADE, LOG10_MIN, N_BINS

        return {
            "model": self.model_name,
            "run": str(self.run_dir),
            "n_tokens": self.n_tokens,
            "n_layers": self.n_layers,
            "d_sae": self.n_latents,
            "top_n": self.top.top_n,
            "sample_n": self.samples.top_n if self.samples is not None else 0,
            "contexts_per_layer": min(contexts_per_layer, self.top.top_n),
            "n_active": int((self.active_token_counts > 0).sum()),
            "n_shown": len(cards),
            "max_latents": max_latents,
            "context_size": self.context_size,
            "window": list(self.window),
            "hist": {"log10_min": LOG10_MIN, "per_decade": BINS_PER_DECADE, "n_bins": N_BINS},
            "logit_note": self.logit_note,
            "index": {
                "id": shown.tolist(),
                "peak": p_layer.argmax(1).tolist(),
                "el": [_round(float(x)) for x in self.expected_layer[shown].tolist()],
                "var": [_round(float(x)) for x in var[shown].tolist()],
                "count": self.active_token_counts[shown].tolist(),
            },
            "vocab": {str(i): self.token_string(i) for i in sorted(used_tokens)},
            "contexts": contexts_out,
            "cards": cards,
        }

    def _entries(
        self, values: Tensor, positions: Tensor, shown: Tensor, n: int | None
    ) -> list[dict[str, list[list[Any]]]]:
        """Per shown latent, ``{layer: [[position, value], ...]}`` of the filled slots (the first
        ``n`` of each), without a Python loop over empty (latent, layer) pairs."""
        pos = positions[shown, :, :n]
        vals = values[shown, :, :n]
        row, layer, slot = (pos != EMPTY_POSITION).nonzero(as_tuple=True)
        out: list[dict[str, list[list[Any]]]] = [{} for _ in range(len(shown))]
        for r, l, p, v in zip(
            row.tolist(), layer.tolist(), pos[row, layer, slot].tolist(),
            vals[row, layer, slot].tolist(), strict=True,
        ):
            out[r].setdefault(str(l), []).append([p, _round(v)])
        return out

    def write_html(
        self, path: str | Path, max_latents: int | None = None, contexts_per_layer: int = 8
    ) -> Path:
        """Write the self-contained explorer page (atomically) and return its path."""
        data = self.page_data(max_latents, contexts_per_layer)
        title = f"MLSAE latent explorer — {self.model_name or self.run_dir.name}"
        path = Path(path)
        atomic_write_text(path, render_page(title, data))
        logger.info(
            "wrote the explorer (%d latents, %.1f MB) to %s",
            data["n_shown"],
            path.stat().st_size / 1e6,
            path,
        )
        return path


def _trimmed_histograms(counts: Tensor) -> list[dict[str, list[int]]]:
    """Per latent, ``{layer: [first_bin, count, count, ...]}`` over the non-empty bin range of
    each layer where the latent is active (``counts``: ``[latents, n_layers, n_bins]``)."""
    nonzero = counts > 0
    any_bin = nonzero.any(-1)
    n_bins = counts.shape[-1]
    first = torch.where(any_bin, nonzero.int().argmax(-1), 0)
    last = n_bins - 1 - nonzero.flip(-1).int().argmax(-1)
    out: list[dict[str, list[int]]] = [{} for _ in range(counts.shape[0])]
    rows, layers = any_bin.nonzero(as_tuple=True)
    for r, l in zip(rows.tolist(), layers.tolist(), strict=True):
        a, b = int(first[r, l]), int(last[r, l])
        out[r][str(l)] = [a, *counts[r, l, a : b + 1].tolist()]
    return out


def _round(x: float) -> float | None:
    """Four significant digits keep the page small; NaN becomes ``null``."""
    if math.isnan(x):
        return None
    return float(f"{x:.4g}")


def explore_run(
    run_dir: str | Path,
    output: str | Path | None = None,
    max_latents: int | None = None,
    contexts_per_layer: int = 8,
) -> Path:
    """Write ``explore.html`` (or ``output``) for an analysed run; what ``mlsae-lens explore``
    does."""
    run_dir = Path(run_dir)
    explorer = Explorer.from_run(run_dir)
    return explorer.write_html(output or run_dir / EXPLORER_FILE, max_latents, contexts_per_layer)


__all__ = ["DEFAULT_WINDOW", "Explorer", "explore_run"]
