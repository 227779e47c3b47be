"""The latent explorer's page: one self-contained HTML file (inline CSS, JS and JSON; no network).

:func:`render_page` fills the template with the JSON of :meth:`Explorer.page_data`. The script
keeps an index of every shown latent (id, peak layer, E[L|J], Var(L|J), active-token count) for
sorting and filtering, and builds a latent's card (SVG charts, contexts) only when it is shown,
50 at a time, so the page stays responsive with tens of thousands of latents.
"""

from __future__ import annotations

import html
import json
from typing import Any


def render_page(title: str, data: dict[str, Any]) -> str:
    """The page for ``data`` (``</`` is escaped so the JSON cannot close its script tag)."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    return (
        _PAGE.replace("__TITLE__", html.escape(title))
        .replace("__STYLE__", _STYLE)
        .replace("__SCRIPT__", _SCRIPT)
        .replace("__DATA__", payload)
    )


_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>__TITLE__</title><style>__STYLE__</style></head>
<body><h1>__TITLE__</h1>
<div id="summary"></div>
<div id="controls">
<div><input id="search" type="search" placeholder="latent id, or text of a token">
<label>sort by <select id="sort">
<option value="count">density (most active first)</option>
<option value="peak">peak layer</option>
<option value="el">E[L|J]</option>
<option value="var">Var(L|J)</option>
<option value="id">latent id</option>
</select></label>
<label><input id="reverse" type="checkbox"> reverse</label></div>
<div class="filters">
<label>peak layer <input id="peak-min" type="number" step="1"> to <input id="peak-max" type="number" step="1"></label>
<label>E[L|J] <input id="el-min" type="number" step="any"> to <input id="el-max" type="number" step="any"></label>
<label>Var(L|J) <input id="var-min" type="number" step="any"> to <input id="var-max" type="number" step="any"></label>
<label>density &ge; <input id="dens-min" type="number" step="any" min="0"> %</label>
<button id="clear">clear</button>
</div>
<span id="status"></span></div>
<div id="cards"></div><button id="more" hidden>show more</button>
<script type="application/json" id="explorer-data">__DATA__</script>
<script>__SCRIPT__</script>
</body></html>
"""

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1150px; margin: 1.5em auto; color: #222; }
h1 { font-size: 1.4em; } #summary { font-size: 0.9em; color: #444; margin-bottom: 1em; }
#controls { position: sticky; top: 0; background: #fff; padding: 0.5em 0; z-index: 1;
  border-bottom: 1px solid #ddd; font-size: 0.9em; }
#controls > div { margin: 0.2em 0; } #controls label { margin-right: 1em; white-space: nowrap; }
.filters input { width: 5em; } #search { width: 24em; padding: 4px 8px; font-size: 1em; }
#status { color: #555; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 0.6em 1em; margin: 0.8em 0; }
.card h2 { font-size: 1.1em; margin: 0.2em 0 0.4em; } .card h2 small { color: #555; font-weight: normal; }
.row { display: flex; gap: 2em; } .row > div { flex: 1; min-width: 0; }
.tok { white-space: pre; font-family: ui-monospace, monospace; }
table.effects { border-collapse: collapse; font-size: 0.82em; margin-right: 1em; display: inline-table;
  vertical-align: top; }
table.effects td { padding: 0 4px; } table.effects td.num { text-align: right; color: #333; }
table.effects th { text-align: left; font-weight: 600; padding: 0 4px; }
table.effects td.t { font-family: ui-monospace, monospace; white-space: pre; max-width: 10em;
  overflow: hidden; text-overflow: ellipsis; background: #eef; }
table.effects.neg td.t { background: #fee; }
svg text { font-size: 10px; fill: #333; } svg .axis { stroke: #888; stroke-width: 1; }
svg .bar { fill: #4a7bd0; cursor: pointer; } svg .bar.sel { fill: #e07b00; }
svg .hbar { fill: #7a9a3a; }
.ctx { font-size: 0.85em; margin: 2px 0; padding: 2px 0; line-height: 1.5; white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; }
.ctx .v { color: #777; width: 6.5em; display: inline-block; } .stats { font-size: 0.85em; color: #444; }
.tok.act { outline: 1px solid #c55; font-weight: bold; }
.co { font-size: 0.85em; margin-top: 0.4em; } .co a { margin-right: 0.6em; }
.note { color: #666; font-size: 0.85em; } .band { font-size: 0.8em; color: #555; margin: 0.4em 0 0.1em; }
.layer { border-top: 1px dashed #ddd; margin-top: 0.5em; padding-top: 0.3em; }
"""

_SCRIPT = r"""
"use strict";
window.addEventListener("error", (e) => { document.body.dataset.explorerError = String(e.message); });
const D = JSON.parse(document.getElementById("explorer-data").textContent);
const PAGE = 50, SVGNS = "http://www.w3.org/2000/svg";
const IX = D.index, N = IX.id.length;
const rowOf = new Map(IX.id.map((id, r) => [id, r]));
let matches = [], shown = 0;
const tokStr = (i) => (i in D.vocab ? D.vocab[i] : "<" + i + ">").replace(/\n/g, "\u21b5");
const el = (tag, attrs, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) e.append(k);
  return e;
};
const sv = (tag, attrs, text) => {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
};
const fmt = (x) => (x === null || x === undefined ? "n/a" : Number(x).toPrecision(3));
const pct = (x) => (100 * x).toPrecision(3) + "%";
const density = (r) => IX.count[r] / D.n_tokens;
const edge = (b) => Math.pow(10, D.hist.log10_min + b / D.hist.per_decade);

function searchText(r) {
  const c = D.cards[r];
  if (!c._text) {
    const ids = c.pos.map((p) => p[0]);
    for (const list of Object.values(c.ctx)) for (const [p] of list) {
      ids.push(D.contexts[Math.floor(p / D.context_size)][p % D.context_size]);
    }
    c._text = ids.map(tokStr).join("\u0000").toLowerCase();
  }
  return c._text;
}

// ------------------------------------------------------------------ charts

function axes(svg, x0, y0, w, h, yMax, yLabel, xLabel, yFmt = fmt) {
  svg.append(sv("line", {"class": "axis", x1: x0, y1: y0, x2: x0 + w, y2: y0}));
  svg.append(sv("line", {"class": "axis", x1: x0, y1: y0, x2: x0, y2: y0 - h}));
  for (const f of [0, 0.5, 1]) {
    const y = y0 - f * h;
    svg.append(sv("line", {"class": "axis", x1: x0 - 3, y1: y, x2: x0, y2: y}));
    svg.append(sv("text", {x: x0 - 5, y: y + 3, "text-anchor": "end"}, yFmt(f * yMax)));
  }
  svg.append(sv("text", {x: 8, y: y0 - h / 2, transform: "rotate(-90 8 " + (y0 - h / 2) + ")",
    "text-anchor": "middle"}, yLabel));
  svg.append(sv("text", {x: x0 + w / 2, y: y0 + 26, "text-anchor": "middle"}, xLabel));
}

function layerChart(c, pick) {
  const W = 400, H = 150, x0 = 52, y0 = 116, w = W - x0 - 8, h = 96, n = D.n_layers, bw = w / n;
  const svg = sv("svg", {width: W, height: H, "class": "pl"});
  const maxP = Math.max(...c.p.map((x) => x || 0), 1e-9);
  axes(svg, x0, y0, w, h, maxP, "P(L|J)", "layer");
  const step = Math.max(1, Math.ceil(n / 10));
  const value = sv("text", {"class": "value", "text-anchor": "middle"});
  c.p.forEach((x, l) => {
    const bh = Math.max(1, ((x || 0) / maxP) * h);
    const r = sv("rect", {x: x0 + l * bw + 0.5, width: Math.max(1, bw - 1), y: y0 - bh, height: bh, "class": "bar"});
    r.dataset.layer = l;
    r.append(sv("title", {}, "layer " + l + ": P(L|J) = " + fmt(x)));
    r.addEventListener("click", () => pick(l));
    svg.append(r);
    if (l % step === 0 || l === n - 1) {
      svg.append(sv("text", {x: x0 + (l + 0.5) * bw, y: y0 + 12, "text-anchor": "middle"}, String(l)));
    }
  });
  svg.append(value);
  svg.select = (l) => {
    svg.querySelectorAll(".bar").forEach((r) => r.classList.toggle("sel", Number(r.dataset.layer) === l));
    const x = c.p[l] || 0;
    value.setAttribute("x", x0 + (l + 0.5) * bw);
    value.setAttribute("y", Math.max(10, y0 - Math.max(1, (x / maxP) * h) - 3));
    value.textContent = fmt(x);
  };
  return svg;
}

function histChart(c, layer) {
  const hist = c.hist[String(layer)];
  if (!hist) return el("p", {"class": "note"}, "no histogram at layer " + layer);
  const first = hist[0], counts = hist.slice(1), total = counts.reduce((a, b) => a + b, 0);
  const W = 400, H = 140, x0 = 52, y0 = 106, w = W - x0 - 8, h = 86, bw = w / counts.length;
  const svg = sv("svg", {width: W, height: H, "class": "hist"});
  const maxC = Math.max(...counts, 1);
  axes(svg, x0, y0, w, h, maxC, "tokens", "activation at layer " + layer + " (log scale; " + total + " tokens)",
    (x) => String(Math.round(x)));
  counts.forEach((n, i) => {
    const bh = (n / maxC) * h;
    const r = sv("rect", {x: x0 + i * bw + 0.5, width: Math.max(1, bw - 1), y: y0 - bh, height: bh, "class": "hbar"});
    const b = first + i;
    const lo = b === 0 ? "0" : fmt(edge(b)), hi = b === D.hist.n_bins - 1 ? "\u221e" : fmt(edge(b + 1));
    r.append(sv("title", {}, "[" + lo + ", " + hi + "): " + n + " tokens"));
    svg.append(r);
  });
  const ticks = Math.min(counts.length, 4);
  for (let t = 0; t <= ticks; t++) {
    const i = Math.round((t / ticks) * counts.length);
    const anchor = t === 0 ? "start" : t === ticks ? "end" : "middle";
    svg.append(sv("text", {x: x0 + i * bw, y: y0 + 12, "text-anchor": anchor}, fmt(edge(first + i))));
  }
  return svg;
}

function quantile(c, layer, v) {
  const hist = c.hist[String(layer)];
  if (!hist) return null;
  const first = hist[0], counts = hist.slice(1), total = counts.reduce((a, b) => a + b, 0);
  let pos = (Math.log10(v) - D.hist.log10_min) * D.hist.per_decade;
  pos = Math.min(Math.max(pos, 0), D.hist.n_bins - 1e-9);
  const b = Math.floor(pos);
  let below = 0;
  for (let i = 0; i < counts.length; i++) {
    if (first + i < b) below += counts[i];
    else if (first + i === b) below += (pos - b) * counts[i];
  }
  return below / total;
}

// ------------------------------------------------------------------ contexts

function contextLine(p, label, valueAt, maxV) {
  const ctx = Math.floor(p / D.context_size), off = p % D.context_size;
  const row = D.contexts[ctx];
  const a = Math.max(0, off - D.window[0]), b = Math.min(row.length, off + D.window[1] + 1);
  const line = el("div", {"class": "ctx"}, el("span", {"class": "v"}, label));
  for (let i = a; i < b; i++) {
    const q = ctx * D.context_size + i;
    const s = el("span", {"class": "tok" + (i === off ? " act" : "")}, tokStr(row[i]));
    if (valueAt.has(q)) s.style.background = "rgba(255,120,0," + Math.min(1, valueAt.get(q) / maxV).toFixed(3) + ")";
    line.append(s);
  }
  return line;
}

function layerDetail(c, layer) {
  const box = el("div", {"class": "layer", "data-layer": layer});
  const top = c.ctx[String(layer)] || [], smp = (c.smp[String(layer)] || []).slice().sort((x, y) => x[1] - y[1]);
  const valueAt = new Map([...top, ...smp].map(([p, v]) => [p, v]));
  const maxV = Math.max(1e-9, ...top.map((e) => e[1]));
  const hist = c.hist[String(layer)];
  const active = hist ? hist.slice(1).reduce((a, b) => a + b, 0) : null;
  const stats = el("div", {"class": "stats"},
    el("p", {}, "Layer " + layer + ": P(L|J) = " + fmt(c.p[layer]) +
      (active === null ? "" : "; active on " + active + " of " + D.n_tokens + " tokens (" + pct(active / D.n_tokens) + ")") +
      (top.length ? "; largest activation " + fmt(top[0][1]) : "") + "."),
    el("p", {"class": "note"}, "Hover a bar for its range and count."));
  const right = el("div", {"class": "top"});
  right.append(el("p", {"class": "note"}, "top " + top.length +
    " tokens at layer " + layer + " (activating token outlined; background \u221d activation of this latent at this layer, where collected)"));
  if (!top.length) right.append(el("p", {"class": "note"}, "no collected tokens at layer " + layer));
  for (const [p, v] of top) right.append(contextLine(p, fmt(v), valueAt, maxV));
  const samples = el("div", {"class": "samples"});
  if (smp.length) {
    samples.append(el("p", {"class": "note"}, "quantile samples: " + smp.length +
      " tokens drawn uniformly among those where the latent is active at this layer, weakest first, " +
      "grouped by their quantile in the histogram"));
    let band = -1;
    for (const [p, v] of smp) {
      const q = quantile(c, layer, v), b = q === null ? 0 : Math.min(3, Math.floor(q * 4));
      if (b !== band) { band = b; samples.append(el("div", {"class": "band"}, "quantiles " + 25 * b + "\u2013" + 25 * (b + 1) + "%")); }
      samples.append(contextLine(p, fmt(v) + (q === null ? "" : " q" + Math.round(100 * q)), valueAt, maxV));
    }
  }
  box.append(el("div", {"class": "row"}, el("div", {}, histChart(c, layer)), stats), right, samples);
  return box;
}

function effectsTable(list, title, cls) {
  const t = el("table", {"class": "effects " + cls}, el("tr", {}, el("th", {"colspan": 2}, title)));
  for (const [i, v] of list) t.append(el("tr", {}, el("td", {"class": "t", "title": tokStr(i)}, tokStr(i)),
    el("td", {"class": "num"}, (v > 0 ? "+" : "") + Number(v).toFixed(2))));
  return t;
}

function card(r) {
  const c = D.cards[r], id = IX.id[r];
  const layers = Object.keys(c.ctx).map(Number);
  let best = IX.peak[r];
  if (!layers.includes(best) && layers.length) best = layers[0];
  const root = el("div", {"class": "card", "id": "card-" + id, "data-latent": id, "data-peak": IX.peak[r]});
  root.append(el("h2", {}, "Latent " + id + " ",
    el("small", {}, "density " + pct(density(r)) + " (active on " + IX.count[r] + " of " + D.n_tokens +
      " tokens) \u00b7 peak layer " + IX.peak[r] + " \u00b7 E[L|J] = " + fmt(IX.el[r]) +
      " \u00b7 Var(L|J) = " + fmt(IX.var[r]))));
  let detail = layerDetail(c, best);
  const chart = layerChart(c, (l) => { const nb = layerDetail(c, l); detail.replaceWith(nb); detail = nb; chart.select(l); });
  chart.select(best);
  const effects = el("div", {"class": "effects-box"},
    effectsTable(c.pos, "top logit effects", "pos"), effectsTable(c.neg, "bottom logit effects", "neg"));
  const co = el("div", {"class": "co"}, "co-appearing latents: ");
  if (!c.co.length) co.append("none");
  for (const [j, n] of c.co) co.append(el("a", {"href": "#latent=" + j, "title": n + " shared (token, layer) entries"}, String(j) + " (" + n + ")"));
  root.append(el("div", {"class": "row"}, el("div", {}, chart, el("p", {"class": "note"}, "click a bar to show that layer")),
    el("div", {}, effects, co)), detail);
  return root;
}

// ------------------------------------------------------------------ list, sort, filter

function render() {
  const box = document.getElementById("cards");
  const end = Math.min(matches.length, shown + PAGE);
  for (let i = shown; i < end; i++) box.append(card(matches[i]));
  shown = end;
  const more = document.getElementById("more");
  more.hidden = shown >= matches.length;
  more.textContent = "show more (" + shown + " of " + matches.length + " shown)";
}

const num = (id) => { const v = document.getElementById(id).value; return v === "" ? null : Number(v); };
const inRange = (x, lo, hi) => (lo === null || (x !== null && x >= lo)) && (hi === null || (x !== null && x <= hi));

function filtered(text) {
  const f = {pk: [num("peak-min"), num("peak-max")], el: [num("el-min"), num("el-max")],
    vr: [num("var-min"), num("var-max")], d: num("dens-min")};
  const out = [];
  for (let r = 0; r < N; r++) {
    if (!inRange(IX.peak[r], ...f.pk) || !inRange(IX.el[r], ...f.el) || !inRange(IX.var[r], ...f.vr)) continue;
    if (f.d !== null && 100 * density(r) < f.d) continue;
    if (text && !searchText(r).includes(text)) continue;
    out.push(r);
  }
  const key = document.getElementById("sort").value;
  const val = key === "count" ? (r) => -IX.count[r] : key === "id" ? (r) => IX.id[r] : (r) => IX[key][r];
  out.sort((a, b) => (val(a) ?? Infinity) - (val(b) ?? Infinity) || IX.id[a] - IX.id[b]);
  if (document.getElementById("reverse").checked) out.reverse();
  return out;
}

function apply() {
  const q = document.getElementById("search").value.trim();
  document.getElementById("cards").replaceChildren();
  shown = 0;
  const status = document.getElementById("status");
  if (/^\d+$/.test(q)) {
    const r = rowOf.get(Number(q));
    matches = r === undefined ? [] : [r];
    if (r === undefined) {
      const why = Number(q) >= D.d_sae ? "this SAE has " + D.d_sae + " latents" :
        "it is never active on the analysed tokens" + (D.n_shown < D.n_active ?
          ", or not among the " + D.n_shown + " most frequently active latents on this page (--max-latents)" : "");
      status.textContent = "latent " + q + " is not on this page: " + why;
      render(); return;
    }
    status.textContent = "latent " + q;
  } else {
    matches = filtered(q.toLowerCase());
    status.textContent = matches.length + " of " + N + " latents" + (q ? " match \u201c" + q + "\u201d" : "") +
      (matches.length < N && !q ? " pass the filters" : "");
  }
  render();
}

const CONTROLS = ["sort", "reverse", "peak-min", "peak-max", "el-min", "el-max", "var-min", "var-max", "dens-min"];

function fromHash() {
  // #latent=ID (or text) searches; #sort=peak&peak-min=3&reverse=1 ... set the controls.
  const params = new URLSearchParams(location.hash.slice(1));
  document.getElementById("search").value = params.get("latent") || "";
  for (const id of CONTROLS) {
    if (!params.has(id)) continue;
    const input = document.getElementById(id);
    if (input.type === "checkbox") input.checked = params.get(id) === "1"; else input.value = params.get(id);
  }
  apply();
}

document.getElementById("summary").append(
  el("p", {}, "Run " + D.run + ": " + D.n_tokens + " test tokens analysed; " + D.n_active + " of " + D.d_sae +
    " latents active; this page holds " + (D.n_shown < D.n_active ? "the " + D.n_shown + " most frequently active" :
    "all " + D.n_shown) + ", with their top " + D.contexts_per_layer + " of " + D.top_n + " collected tokens and " +
    D.sample_n + " quantile samples per layer."),
  el("p", {"class": "note"}, "P(L|J): the latent's distribution over layers (Eq. 10, 0-based layers); peak layer: its mode. " +
    "Density: the fraction of analysed tokens where the latent is active at some layer. Histogram: the latent's " +
    "activations at the chosen layer in log-spaced bins (" + D.hist.per_decade + " per decade; the end bins are open). Logit effects: " + D.logit_note + ". " +
    "Co-appearing latents: how often another latent's own top tokens include the same token at the same layer " +
    "(among collected contexts only). Search by latent id or token text; #latent=ID in the URL searches too, and e.g. #sort=peak&peak-min=3 sets the controls."));
document.getElementById("search").addEventListener("input", (e) => {
  history.replaceState(null, "", "#latent=" + encodeURIComponent(e.target.value));
  apply();
});
for (const id of CONTROLS) {
  document.getElementById(id).addEventListener(id === "sort" || id === "reverse" ? "change" : "input", apply);
}
document.getElementById("clear").addEventListener("click", () => {
  document.querySelectorAll(".filters input").forEach((i) => { i.value = ""; });
  apply();
});
document.getElementById("more").addEventListener("click", render);
window.addEventListener("hashchange", fromHash);
fromHash();
document.body.dataset.explorerReady = "1";
"""

__all__ = ["render_page"]
