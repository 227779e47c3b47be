"""The latent explorer: what each MLSAE latent responds to, layer by layer, offline.

``mlsae-lens analyze`` collects, for every (latent, layer) pair, the top-N activating test tokens,
a uniform sample of its active tokens and a histogram of its activations in its streaming pass
(:class:`~mlsae_lens.activation_samples.LatentContexts`) and saves them to
``top_contexts.safetensors`` beside ``stats.safetensors``, with the same progress, so
``--resume`` continues both. When the pass ends the file is completed with what the explorer
needs to stand alone, without the model or the corpus:

* the test contexts that hold a collected or sampled token (token ids), so windows can be cut
  at any width;
* each decoder row's logit effects through the model's final norm (top 10 positive and
  negative tokens with values; :func:`~mlsae_lens.topk_contexts.decoder_logit_lens`);
* the strings of every token id it mentions.

:class:`Explorer` reads it together with P(L|J), Var(L|J) and activation frequencies from
``stats.safetensors`` (``Explorer.from_run(run_dir).top_contexts(latent, layer)`` in a
notebook), and :meth:`Explorer.write_html` writes one self-contained page (inline JS and JSON
data; no network; :mod:`mlsae_lens.explorer_page`) for ``mlsae-lens explore``.
"""

from __future__ import annotations

import http.server
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import Tensor

from mlsae_lens.activation_samples import LatentContexts, quantile_of
from mlsae_lens.analysis.layer_stats import read_safetensors, write_safetensors
from mlsae_lens.atomic import atomic_write_text
from mlsae_lens.errors import MLSAEError
from mlsae_lens.explorer_page import render_page
from mlsae_lens.topk_contexts import (
    EMPTY_POSITION,
    TopContexts,
    co_appearing_latents,
    decoder_logit_lens,
)

if TYPE_CHECKING:
    from mlsae_lens.analyze import AnalysisOptions, AnalysisStats
    from mlsae_lens.models import LanguageModel
    from mlsae_lens.sae import MultiLayerMixin

logger = logging.getLogger(__name__)

TOP_CONTEXTS_FILE = "top_contexts.safetensors"
EXPLORER_FILE = "explore.html"
_FORMAT = "mlsae_lens.TopContexts/1"
_IDENTITY = ("test_sha256", "sae_sha256", "tokens_target")
LOGIT_LENS_TOKENS = 10
SAMPLES_PER_LAYER = 8
"""Quantile samples kept per (latent, layer) (:mod:`mlsae_lens.activation_samples`)."""
LOGIT_EFFECTS = (
    "(ln_final(d_j) - ln_final(0)) @ W_U minus its mean over the vocabulary, "
    "for the unit decoder row d_j (the logits of a unit-RMS residual along d_j, through the "
    "model's final norm; the same for folded and unfolded norms)"
)
DEFAULT_WINDOW = (12, 4)
"""Tokens shown before and after the activating token (cut at the context's edges)."""


# ---------------------------------------------------------------------- the file


def _read_meta(path: Path) -> dict[str, Any] | None:
    """The JSON metadata of a top-contexts file, or ``None`` if absent or not one."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception:  # a damaged file is rewritten or reported by its reader
        return None
    if header.get("format") != _FORMAT:
        return None
    return json.loads(header["meta"])


def _top_meta(
    contexts: LatentContexts, progress: dict[str, Any], complete: bool
) -> dict[str, Any]:
    return {
        **contexts.meta(),
        "identity": {key: progress.get(key) for key in _IDENTITY},
        "complete": complete,
    }


def save_partial_top_contexts(
    path: Path, contexts: LatentContexts, progress: dict[str, Any]
) -> None:
    """Save the tables mid-analysis (called with every save of ``stats.safetensors``).

    Nothing is written when the file already holds these tokens (the centered pass saves the
    statistics again but leaves the tables alone), so a completed file is never downgraded.
    """
    meta = _read_meta(path)
    if meta is not None and meta.get("n_tokens") == contexts.n_tokens:
        return
    write_safetensors(path, contexts.tensors(), _FORMAT, _top_meta(contexts, progress, False))


_TABLES = (
    "values", "positions", "sample_priority", "sample_positions", "sample_values", "hist_counts"
)


def load_top_contexts(path: Path) -> tuple[LatentContexts, dict[str, Tensor], dict[str, Any]]:
    """The tables, the other tensors of a completed file, and the metadata."""
    try:
        tensors, meta = read_safetensors(path, _FORMAT)
        contexts = LatentContexts.from_saved(tensors, meta)
    except MLSAEError:
        raise
    except Exception as exc:  # safetensors / json raise their own types
        raise MLSAEError(
            f"{path} is damaged ({type(exc).__name__}: {exc}); rerun `mlsae-lens analyze` with "
            "--overwrite"
        ) from exc
    extra = {k: v for k, v in tensors.items() if k not in _TABLES}
    return contexts, extra, meta


def start_or_resume_top_contexts(
    run_dir: Path, stats: AnalysisStats, options: AnalysisOptions, sae: MultiLayerMixin
) -> LatentContexts | None:
    """Fresh tables for a fresh analysis, the saved ones for a resumed one, or ``None``.

    A fresh analysis deletes an older ``top_contexts.safetensors`` (it described other tokens
    or another SAE). A resumed one must find tables in step with the statistics.
    """
    path = run_dir / TOP_CONTEXTS_FILE
    phase = stats.progress.get("phase")
    if phase == "latents" and stats.layer.n_tokens == 0:
        path.unlink(missing_ok=True)
        if not options.collect_top_contexts:
            return None
        return LatentContexts(
            sae.cfg.d_sae, sae.cfg.n_layers, options.top_n, SAMPLES_PER_LAYER, sae.W_enc.device
        )
    if not options.collect_top_contexts:
        return None
    if not path.is_file():
        if phase == "latents":
            raise MLSAEError(
                f"--resume: {run_dir} holds a partial analysis without {TOP_CONTEXTS_FILE}; "
                "pass --no-top-contexts to resume it without them, or --overwrite to start over"
            )
        logger.warning("%s is missing, so this analysis has no top contexts", path)
        return None
    contexts, _, meta = load_top_contexts(path)
    top = contexts.top
    for key, value in meta["identity"].items():
        if stats.progress.get(key) != value:
            raise MLSAEError(
                f"--resume: {path} was collected with {key}={value!r}, not "
                f"{stats.progress.get(key)!r}; pass --overwrite to start over"
            )
    if top.top_n != options.top_n:
        raise MLSAEError(
            f"--resume: {path} keeps the top {top.top_n} tokens, not {options.top_n}; pass "
            f"--top-n {top.top_n}, or --overwrite to start over"
        )
    if top.n_tokens != stats.layer.n_tokens:
        raise MLSAEError(
            f"--resume: {path} holds {top.n_tokens} tokens but stats.safetensors "
            f"{stats.layer.n_tokens} (the analysis stopped between the two saves); pass "
            "--overwrite to start over, or --no-top-contexts to resume without them"
        )
    return LatentContexts.from_saved(contexts.tensors(), contexts.meta(), sae.W_enc.device)


def _token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    if tokenizer is None:
        return [f"<{i}>" for i in ids]
    if hasattr(tokenizer, "batch_decode"):
        return list(tokenizer.batch_decode([[i] for i in ids]))
    return [tokenizer.decode([i]) for i in ids]


@torch.inference_mode()
def finalize_top_contexts(
    run_dir: Path,
    contexts: LatentContexts,
    progress: dict[str, Any],
    model: LanguageModel,
    sae: MultiLayerMixin,
    test: Tensor,
) -> Path:
    """Complete ``top_contexts.safetensors`` so the explorer needs neither model nor corpus:
    add the referenced test contexts, the logit effects and the token strings."""
    path = run_dir / TOP_CONTEXTS_FILE
    meta = _read_meta(path)
    top = contexts.top
    if meta is not None and meta.get("complete") and meta.get("n_tokens") == top.n_tokens:
        return path
    positions = top.positions.cpu().reshape(-1)
    if contexts.samples is not None:
        positions = torch.cat([positions, contexts.samples.positions.cpu().reshape(-1)])
    context_size = test.shape[1]
    context_ids = torch.unique(positions[positions != EMPTY_POSITION] // context_size)
    context_tokens = test[context_ids].to(torch.int32)
    lens = decoder_logit_lens(
        sae.W_dec.detach(), model.W_U.detach(), LOGIT_LENS_TOKENS, final_norm=model.ln_final
    )
    vocab_ids = torch.unique(
        torch.cat([context_tokens.reshape(-1).long(), lens[0].reshape(-1), lens[2].reshape(-1)])
    )
    strings = _token_strings(model.tokenizer, vocab_ids.tolist())
    tensors = {
        **contexts.tensors(),
        "context_ids": context_ids,
        "context_tokens": context_tokens,
        "lens_top_ids": lens[0].to(torch.int32),
        "lens_top_values": lens[1],
        "lens_bottom_ids": lens[2].to(torch.int32),
        "lens_bottom_values": lens[3],
        "vocab_ids": vocab_ids,
    }
    meta = {
        **_top_meta(contexts, progress, True),
        "context_size": context_size,
        "vocab_strings": strings,
        "logit_lens": LOGIT_EFFECTS,
    }
    write_safetensors(path, tensors, _FORMAT, meta)
    logger.info("saved the top %d contexts of every latent and layer to %s", top.top_n, path)
    return path


# ---------------------------------------------------------------------- the explorer


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
        from mlsae_lens.analyze import STATS_FILE, AnalysisStats, _check_run_dir

        run_dir = Path(run_dir)
        _check_run_dir(run_dir)
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
            model_name = json.loads((run_dir / "run.json").read_text()).get("model_name", "")
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


def page_server(path: str | Path, port: int = 8000) -> http.server.ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1 that answers ``/`` and ``/NAME`` with the page at ``path``
    and 404 with anything else (so no other file of the run directory is reachable)."""
    path = Path(path).resolve()
    body = path.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            if self.path.split("?")[0] not in ("/", f"/{path.name}"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            logger.debug(format, *args)

    try:
        return http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    except OSError as exc:
        raise MLSAEError(f"cannot serve on 127.0.0.1:{port} ({exc}); pass another --port") from exc


def serve(path: str | Path, port: int = 8000) -> None:
    """Serve the page on http://127.0.0.1:PORT/ until Ctrl-C."""
    server = page_server(path, port)
    logger.info("serving %s at http://127.0.0.1:%d/ (Ctrl-C to stop)", path, server.server_port)
    try:
        server.serve_forever()
    finally:
        server.server_close()


__all__ = [
    "EXPLORER_FILE",
    "TOP_CONTEXTS_FILE",
    "Explorer",
    "explore_run",
    "finalize_top_contexts",
    "load_top_contexts",
    "save_partial_top_contexts",
    "page_server",
    "serve",
    "start_or_resume_top_contexts",
]
