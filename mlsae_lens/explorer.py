"""The latent explorer: what each MLSAE latent responds to, layer by layer, offline.

``mlsae-lens analyze`` collects the top-N activating test tokens of every (latent, layer) pair
in its streaming pass (:class:`~mlsae_lens.topk_contexts.TopContexts`) and saves them to
``top_contexts.safetensors`` beside ``stats.safetensors``, with the same progress, so
``--resume`` continues both. When the pass ends the file is completed with what the explorer
needs to stand alone, without the model or the corpus:

* the test contexts that hold a collected token (token ids), so windows can be cut at any width;
* each decoder row's logit lens ``W_dec[j] @ W_U`` (top 10 positive and negative tokens);
* the strings of every token id it mentions.

:class:`Explorer` reads it together with P(L|J) and activation frequencies from
``stats.safetensors`` (``Explorer.from_run(run_dir).top_contexts(latent, layer)`` in a
notebook), and :meth:`Explorer.write_html` writes one self-contained page (inline JS and JSON
data; no network) for ``mlsae-lens explore``.
"""

from __future__ import annotations

import html
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

from mlsae_lens.analysis.layer_stats import read_safetensors, write_safetensors
from mlsae_lens.atomic import atomic_write_text
from mlsae_lens.errors import MLSAEError
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


def _top_tensors(top: TopContexts) -> dict[str, Tensor]:
    positions = top.positions
    if positions.numel() and int(positions.max()) < torch.iinfo(torch.int32).max:
        positions = positions.to(torch.int32)  # half the size; read back as int64
    return {"values": top.values, "positions": positions}


def _top_meta(top: TopContexts, progress: dict[str, Any], complete: bool) -> dict[str, Any]:
    state = top.state_dict()
    return {
        **{k: v for k, v in state.items() if not isinstance(v, Tensor)},
        "identity": {key: progress.get(key) for key in _IDENTITY},
        "complete": complete,
    }


def save_partial_top_contexts(path: Path, top: TopContexts, progress: dict[str, Any]) -> None:
    """Save the tables mid-analysis (called with every save of ``stats.safetensors``).

    Nothing is written when the file already holds these tokens (the centered pass saves the
    statistics again but leaves the tables alone), so a completed file is never downgraded.
    """
    meta = _read_meta(path)
    if meta is not None and meta.get("n_tokens") == top.n_tokens:
        return
    write_safetensors(path, _top_tensors(top), _FORMAT, _top_meta(top, progress, False))


def load_top_contexts(path: Path) -> tuple[TopContexts, dict[str, Tensor], dict[str, Any]]:
    """The tables, the other tensors of a completed file, and the metadata."""
    try:
        tensors, meta = read_safetensors(path, _FORMAT)
        top = TopContexts.from_state_dict({**tensors, **meta})
    except MLSAEError:
        raise
    except Exception as exc:  # safetensors / json raise their own types
        raise MLSAEError(
            f"{path} is damaged ({type(exc).__name__}: {exc}); rerun `mlsae-lens analyze` with "
            "--overwrite"
        ) from exc
    extra = {k: v for k, v in tensors.items() if k not in ("values", "positions")}
    return top, extra, meta


def start_or_resume_top_contexts(
    run_dir: Path, stats: AnalysisStats, options: AnalysisOptions, sae: MultiLayerMixin
) -> TopContexts | None:
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
        return TopContexts(sae.cfg.d_sae, sae.cfg.n_layers, options.top_n, sae.W_enc.device)
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
    top, _, meta = load_top_contexts(path)
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
    return TopContexts.from_state_dict(top.state_dict(), sae.W_enc.device)


def _token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    if tokenizer is None:
        return [f"<{i}>" for i in ids]
    if hasattr(tokenizer, "batch_decode"):
        return list(tokenizer.batch_decode([[i] for i in ids]))
    return [tokenizer.decode([i]) for i in ids]


@torch.inference_mode()
def finalize_top_contexts(
    run_dir: Path,
    top: TopContexts,
    progress: dict[str, Any],
    model: LanguageModel,
    sae: MultiLayerMixin,
    test: Tensor,
) -> Path:
    """Complete ``top_contexts.safetensors`` so the explorer needs neither model nor corpus:
    add the referenced test contexts, the decoder logit lens and the token strings."""
    path = run_dir / TOP_CONTEXTS_FILE
    meta = _read_meta(path)
    if meta is not None and meta.get("complete") and meta.get("n_tokens") == top.n_tokens:
        return path
    positions = top.positions.cpu()
    context_size = test.shape[1]
    context_ids = torch.unique(positions[positions != EMPTY_POSITION] // context_size)
    context_tokens = test[context_ids].to(torch.int32)
    lens = decoder_logit_lens(sae.W_dec.detach(), model.W_U.detach(), LOGIT_LENS_TOKENS)
    vocab_ids = torch.unique(
        torch.cat([context_tokens.reshape(-1).long(), lens[0].reshape(-1), lens[2].reshape(-1)])
    )
    strings = _token_strings(model.tokenizer, vocab_ids.tolist())
    tensors = {
        **_top_tensors(top),
        "context_ids": context_ids,
        "context_tokens": context_tokens,
        "lens_top_ids": lens[0].to(torch.int32),
        "lens_top_values": lens[1],
        "lens_bottom_ids": lens[2].to(torch.int32),
        "lens_bottom_values": lens[3],
        "vocab_ids": vocab_ids,
    }
    meta = {
        **_top_meta(top, progress, True),
        "context_size": context_size,
        "vocab_strings": strings,
        "logit_lens": "W_dec[j] @ W_U of the model (unnormalized; the final norm is not applied "
        "to a direction, TransformerLens folds its scale into W_U)",
    }
    write_safetensors(path, tensors, _FORMAT, meta)
    logger.info("saved the top %d contexts of every latent and layer to %s", top.top_n, path)
    return path


# ---------------------------------------------------------------------- the explorer


@dataclass
class Explorer:
    """Top contexts, layer distributions and decoder logit lens of an analysed run.

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
        top, extra, meta = load_top_contexts(path)
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
        out = []
        values = self.top.values[latent, layer].tolist()
        for value, position in zip(values, self.top.positions[latent, layer].tolist(), strict=True):
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

    def logit_lens(self, latent: int) -> dict[str, list[tuple[str, float]]]:
        """The 10 tokens whose unembedding aligns most (``positive``) and least (``negative``)
        with the latent's decoder row, by ``W_dec[j] @ W_U`` (unnormalized)."""
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

    def shown_latents(self, max_latents: int) -> Tensor:
        """The ``max_latents`` most frequently active latents, sorted by E[L|J] (then id)."""
        active = (self.active_token_counts > 0).nonzero().squeeze(1)
        counts = self.active_token_counts[active]
        keep = active[torch.argsort(-counts, stable=True)[:max_latents]].sort().values
        return keep[torch.argsort(self.expected_layer[keep], stable=True)]

    # ------------------------------------------------------------------ the page

    def page_data(self, max_latents: int = 2000, contexts_per_layer: int = 8) -> dict[str, Any]:
        """The JSON the page renders: one entry per shown latent plus the token tables."""
        if max_latents < 1 or contexts_per_layer < 1:
            raise MLSAEError(
                "--max-latents and --contexts-per-layer must be positive, got "
                f"{max_latents} and {contexts_per_layer}"
            )
        shown = self.shown_latents(max_latents)
        partners, partner_counts = co_appearing_latents(self.top, shown, 5)
        top_ids, top_vals, bottom_ids, bottom_vals = self.lens
        n = min(contexts_per_layer, self.top.top_n)
        values = self.top.values[shown, :, :n]
        positions = self.top.positions[shown, :, :n]
        used_tokens: set[int] = set()
        used_contexts: set[int] = set()
        cards = []
        for row, latent in enumerate(shown.tolist()):
            contexts: dict[str, list[list[float]]] = {}
            for layer in range(self.n_layers):
                pos = positions[row, layer]
                filled = pos != EMPTY_POSITION
                if bool(filled.any()):
                    contexts[str(layer)] = [
                        [p, _round(v)]
                        for p, v in zip(
                            pos[filled].tolist(), values[row, layer][filled].tolist(), strict=True
                        )
                    ]
                    used_contexts.update(p // self.context_size for p in pos[filled].tolist())
            pos_ids, neg_ids = top_ids[latent].tolist(), bottom_ids[latent].tolist()
            used_tokens.update(pos_ids + neg_ids)
            cards.append(
                {
                    "id": latent,
                    "el": _round(float(self.expected_layer[latent])),
                    "count": int(self.active_token_counts[latent]),
                    "p": [_round(float(x)) for x in self.layer_given_latent[latent].tolist()],
                    "ctx": contexts,
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
        return {
            "model": self.model_name,
            "run": str(self.run_dir),
            "n_tokens": self.n_tokens,
            "n_layers": self.n_layers,
            "d_sae": self.n_latents,
            "top_n": self.top.top_n,
            "contexts_per_layer": n,
            "n_active": int((self.active_token_counts > 0).sum()),
            "n_shown": len(cards),
            "max_latents": max_latents,
            "context_size": self.context_size,
            "window": list(self.window),
            "vocab": {str(i): self.token_string(i) for i in sorted(used_tokens)},
            "contexts": contexts_out,
            "latents": cards,
        }

    def write_html(
        self, path: str | Path, max_latents: int = 2000, contexts_per_layer: int = 8
    ) -> Path:
        """Write the self-contained explorer page (atomically) and return its path."""
        data = self.page_data(max_latents, contexts_per_layer)
        title = f"MLSAE latent explorer — {self.model_name or self.run_dir.name}"
        payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
        page = (
            _PAGE.replace("__TITLE__", html.escape(title))
            .replace("__STYLE__", _STYLE)
            .replace("__SCRIPT__", _SCRIPT)
            .replace("__DATA__", payload)
        )
        path = Path(path)
        atomic_write_text(path, page)
        logger.info("wrote the explorer (%d latents) to %s", data["n_shown"], path)
        return path


def _round(x: float) -> float | None:
    """Four significant digits keep the page small; NaN becomes ``null``."""
    if math.isnan(x):
        return None
    return float(f"{x:.4g}")


def explore_run(
    run_dir: str | Path,
    output: str | Path | None = None,
    max_latents: int = 2000,
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


# ---------------------------------------------------------------------- page template

_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>__TITLE__</title><style>__STYLE__</style></head>
<body><h1>__TITLE__</h1>
<div id="summary"></div>
<div id="controls"><input id="search" type="search" placeholder="latent id, or text of a token">
<span id="status"></span></div>
<div id="cards"></div><button id="more" hidden>show more</button>
<script type="application/json" id="explorer-data">__DATA__</script>
<script>__SCRIPT__</script>
</body></html>
"""

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 1.5em auto; color: #222; }
h1 { font-size: 1.4em; } #summary { font-size: 0.9em; color: #444; margin-bottom: 1em; }
#controls { position: sticky; top: 0; background: #fff; padding: 0.5em 0; z-index: 1; }
#search { width: 28em; padding: 4px 8px; font-size: 1em; } #status { margin-left: 1em; color: #555; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 0.6em 1em; margin: 0.8em 0; }
.card h2 { font-size: 1.1em; margin: 0.2em 0 0.4em; } .card h2 small { color: #666; font-weight: normal; }
.row { display: flex; gap: 2em; } .row > div { flex: 1; min-width: 0; } .lens { font-size: 0.85em; }
.lens span, .tok { white-space: pre; font-family: ui-monospace, monospace; }
.lens span { background: #eef; margin: 1px; padding: 0 2px; border-radius: 2px; display: inline-block;
  max-width: 10em; overflow: hidden; text-overflow: ellipsis; vertical-align: bottom; }
.lens .neg span { background: #fee; }
svg .bar { fill: #4a7bd0; cursor: pointer; } svg .bar.sel { fill: #e07b00; }
.ctx { font-size: 0.85em; margin: 2px 0; } .ctx .v { color: #777; width: 5em; display: inline-block; }
.tok.act { outline: 1px solid #c55; font-weight: bold; }
.co { font-size: 0.85em; } .co a { margin-right: 0.6em; } .note { color: #666; font-size: 0.85em; }
"""

_SCRIPT = r"""
"use strict";
window.addEventListener("error", (e) => { document.body.dataset.explorerError = String(e.message); });
const D = JSON.parse(document.getElementById("explorer-data").textContent);
const PAGE = 50;
let matches = [], shown = 0;
const byId = new Map(D.latents.map((c) => [c.id, c]));
const tokStr = (i) => (i in D.vocab ? D.vocab[i] : "<" + i + ">").replace(/\n/g, "\u21b5");
const el = (tag, attrs, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) e.append(k);
  return e;
};
const fmt = (x) => (x === null ? "n/a" : Number(x).toPrecision(3));

function searchText(c) {
  if (!c._text) {
    const ids = c.pos.map((p) => p[0]);
    for (const list of Object.values(c.ctx)) for (const [p] of list) {
      ids.push(D.contexts[Math.floor(p / D.context_size)][p % D.context_size]);
    }
    c._text = ids.map(tokStr).join("\u0000").toLowerCase();
  }
  return c._text;
}

function barChart(card, c, pick) {
  const w = 300, h = 60, n = D.n_layers, bw = w / n;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", h + 14);
  const maxP = Math.max(...c.p.map((x) => x || 0), 1e-9);
  c.p.forEach((x, l) => {
    const r = document.createElementNS(svg.namespaceURI, "rect");
    const bh = Math.max(1, ((x || 0) / maxP) * h);
    r.setAttribute("x", l * bw + 0.5); r.setAttribute("width", Math.max(1, bw - 1));
    r.setAttribute("y", h - bh); r.setAttribute("height", bh);
    r.setAttribute("class", "bar"); r.dataset.layer = l;
    const t = document.createElementNS(svg.namespaceURI, "title");
    t.textContent = "layer " + l + ": P(L|J) = " + fmt(x) + (String(l) in c.ctx ? "" : " (no contexts)");
    r.append(t); r.addEventListener("click", () => pick(l)); svg.append(r);
  });
  const lab = document.createElementNS(svg.namespaceURI, "text");
  lab.setAttribute("x", 0); lab.setAttribute("y", h + 12); lab.setAttribute("font-size", 10);
  lab.textContent = "P(L|J) over layers 0.." + (n - 1) + " (click a bar)";
  svg.append(lab);
  return svg;
}

function contextsOf(c, layer) {
  const list = c.ctx[String(layer)] || [];
  const box = el("div", {"class": "contexts", "data-layer": layer});
  if (!list.length) { box.append(el("p", {"class": "note"}, "no collected tokens at layer " + layer)); return box; }
  const maxV = Math.max(...Object.values(c.ctx).flat().map((e) => e[1]));
  const valueAt = new Map(list.map(([p, v]) => [p, v]));
  box.append(el("p", {"class": "note"}, "layer " + layer + ": top " + list.length +
    " tokens (activating token outlined; background \u221d activation of this latent at this layer, where collected)"));
  for (const [p, v] of list) {
    const ctx = Math.floor(p / D.context_size), off = p % D.context_size;
    const row = D.contexts[ctx];
    const a = Math.max(0, off - D.window[0]), b = Math.min(row.length, off + D.window[1] + 1);
    const line = el("div", {"class": "ctx"}, el("span", {"class": "v"}, fmt(v)));
    for (let i = a; i < b; i++) {
      const q = ctx * D.context_size + i;
      const s = el("span", {"class": "tok" + (i === off ? " act" : "")}, tokStr(row[i]));
      if (valueAt.has(q)) s.style.background = "rgba(255,120,0," + (valueAt.get(q) / maxV).toFixed(3) + ")";
      line.append(s);
    }
    box.append(line);
  }
  return box;
}

function card(c) {
  const layers = Object.keys(c.ctx).map(Number);
  let best = layers.length ? layers[0] : 0;
  for (const l of layers) if ((c.p[l] || 0) > (c.p[best] || 0)) best = l;
  const root = el("div", {"class": "card", "id": "card-" + c.id, "data-latent": c.id});
  root.append(el("h2", {}, "Latent " + c.id + " ",
    el("small", {}, "E[L|J] = " + fmt(c.el) + " \u00b7 active on " + c.count + " of " + D.n_tokens +
      " tokens (" + (100 * c.count / D.n_tokens).toPrecision(3) + "%)")));
  let ctxBox = contextsOf(c, best);
  const chart = barChart(root, c, (l) => { const nb = contextsOf(c, l); ctxBox.replaceWith(nb); ctxBox = nb; mark(l); });
  const mark = (l) => chart.querySelectorAll(".bar").forEach((r) => r.classList.toggle("sel", Number(r.dataset.layer) === l));
  mark(best);
  const lens = el("div", {"class": "lens"},
    el("div", {}, "decoder logit lens +: ", ...c.pos.map(([i, v]) => el("span", {"title": fmt(v)}, tokStr(i)))),
    el("div", {"class": "neg"}, "decoder logit lens \u2212: ", ...c.neg.map(([i, v]) => el("span", {"title": fmt(v)}, tokStr(i)))));
  const co = el("div", {"class": "co"}, "co-appearing latents: ");
  if (!c.co.length) co.append("none");
  for (const [j, n] of c.co) co.append(el("a", {"href": "#latent=" + j, "title": n + " shared (token, layer) entries"}, String(j) + " (" + n + ")"));
  root.append(el("div", {"class": "row"}, chart, el("div", {}, lens, co)), ctxBox);
  return root;
}

function render() {
  const box = document.getElementById("cards");
  const end = Math.min(matches.length, shown + PAGE);
  for (let i = shown; i < end; i++) box.append(card(matches[i]));
  shown = end;
  document.getElementById("more").hidden = shown >= matches.length;
}

function applySearch(q) {
  q = q.trim();
  document.getElementById("cards").replaceChildren();
  shown = 0;
  const status = document.getElementById("status");
  if (/^\d+$/.test(q)) {
    const c = byId.get(Number(q));
    matches = c ? [c] : [];
    if (!c) {
      const why = Number(q) >= D.d_sae ? "this SAE has " + D.d_sae + " latents" :
        "it is never active on the analysed tokens, or not among the " + D.n_shown + " most frequently active latents on this page (Explorer.from_run in Python reads every latent)";
      status.textContent = "latent " + q + " is not on this page: " + why;
      render(); return;
    }
  } else {
    const t = q.toLowerCase();
    matches = t ? D.latents.filter((c) => searchText(c).includes(t)) : D.latents;
  }
  status.textContent = matches.length + " of " + D.n_shown + " latents" + (q ? " match \u201c" + q + "\u201d" : "");
  render();
}

function fromHash() {
  const m = /latent=([^&]*)/.exec(location.hash);
  const q = m ? decodeURIComponent(m[1]) : "";
  document.getElementById("search").value = q;
  applySearch(q);
}

document.getElementById("summary").innerHTML = "";
document.getElementById("summary").append(
  el("p", {}, "Run " + D.run + ": " + D.n_tokens + " test tokens analysed; " + D.n_active + " of " + D.d_sae +
    " latents active. This page holds the " + D.n_shown + " most frequently active latents" +
    (D.n_shown < D.n_active ? " (--max-latents " + D.max_latents + ")" : "") +
    ", sorted by E[L|J], with their top " + D.contexts_per_layer + " of " + D.top_n + " collected tokens per layer."),
  el("p", {"class": "note"}, "P(L|J): the latent's distribution over layers (Eq. 10, 0-based layers). Decoder logit lens: " +
    "tokens with the largest and smallest W_dec[j] \u00b7 W_U (the direction's unnormalized logits; no final norm). " +
    "Co-appearing latents: how often another latent's own top tokens include the same token at the same layer " +
    "(counted among collected contexts only, not over all tokens). Search by latent id or token text; #latent=ID in the URL searches too."));
document.getElementById("search").addEventListener("input", (e) => {
  history.replaceState(null, "", "#latent=" + encodeURIComponent(e.target.value));
  applySearch(e.target.value);
});
document.getElementById("more").addEventListener("click", render);
window.addEventListener("hashchange", fromHash);
fromHash();
document.body.dataset.explorerReady = "1";
"""

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
