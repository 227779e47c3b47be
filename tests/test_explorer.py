"""The latent explorer: streaming top-N contexts, their file, the Python API and the page in
headless Chromium (on the tiny random model of test_analyze)."""

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from test_analyze import (  # the tiny model, its test split and a run trained on it
    BATCH,
    EOS,
    Crash,
    analyze,
    dense_test_codes,
    load_screenshot_script,
    png_size_and_ink,
    tiny_model,  # noqa: F401 (fixture)
    tiny_splits,  # noqa: F401 (fixture)
    trained_run,  # noqa: F401 (fixture)
)

from mlsae_lens import MLSAEError
from mlsae_lens.activation_samples import N_BINS, bin_index, sample_priority
from mlsae_lens.cli import main
from mlsae_lens.explorer import Explorer
from mlsae_lens.run_dir import TOP_CONTEXTS_FILE
from mlsae_lens.run_files import load_sae
from mlsae_lens.top_contexts_file import load_top_contexts
from mlsae_lens.topk_contexts import (
    TopContexts,
    co_appearing_latents,
    decoder_logit_lens,
    valid_token_positions,
)

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


# ---------------------------------------------------------------------- brute-force references


def brute_force_top(entries, n_latents, n_layers, top_n):
    """``entries``: (latent, layer, value, position) with value > 0. Sorted by value desc,
    then position asc; padded with (0, -1)."""
    lists: dict[tuple[int, int], list[tuple[float, int]]] = {}
    for latent, layer, value, position in entries:
        lists.setdefault((latent, layer), []).append((-value, position))
    values = torch.zeros(n_latents, n_layers, top_n)
    positions = torch.full((n_latents, n_layers, top_n), -1, dtype=torch.int64)
    for (latent, layer), items in lists.items():
        for i, (neg, position) in enumerate(sorted(items)[:top_n]):
            values[latent, layer, i] = -neg
            positions[latent, layer, i] = position
    return values, positions


def random_codes(gen, tokens, n_layers, n_latents, k):
    """Top-k-like codes: distinct latents per (token, layer), values from a small set (many
    ties) with some zeros (inactive slots)."""
    indices = torch.stack(
        [torch.randperm(n_latents, generator=gen)[:k] for _ in range(tokens * n_layers)]
    ).view(tokens, n_layers, k)
    values = torch.randint(0, 4, (tokens, n_layers, k), generator=gen).float() * 0.5
    return indices, values


def entries_of(indices, values, positions):
    out = []
    for t, l, s in (values > 0).nonzero().tolist():
        out.append((int(indices[t, l, s]), l, float(values[t, l, s]), int(positions[t])))
    return out


# ---------------------------------------------------------------------- streaming math


@pytest.mark.parametrize(("n_latents", "top_n", "seed"), [(6, 3, 0), (40, 5, 1), (9, 50, 2)])
def test_streaming_top_n_equals_brute_force_with_ties_and_short_lists(
    n_latents, top_n, seed
) -> None:
    gen = torch.Generator().manual_seed(seed)
    n_layers, k = 3, 4
    top = TopContexts(n_latents, n_layers, top_n)
    entries = []
    start = 0
    for tokens in (7, 1, 13, 5):  # uneven batches; positions with gaps, as special tokens leave
        indices, values = random_codes(gen, tokens, n_layers, n_latents, k)
        positions = torch.arange(start, start + 2 * tokens, 2)
        start += 2 * tokens + 3
        top.update(indices, values, positions)
        entries += entries_of(indices, values, positions)
    values, positions = brute_force_top(entries, n_latents, n_layers, top_n)
    assert torch.equal(top.values, values)
    assert torch.equal(top.positions, positions)
    assert top.n_tokens == 26
    if top_n == 50:  # more slots than occurrences: the tail stays empty
        assert bool((top.positions == -1).any())


def test_merging_shards_equals_one_stream_and_state_round_trips() -> None:
    gen = torch.Generator().manual_seed(3)
    indices, values = random_codes(gen, 30, 2, 12, 3)
    positions = torch.arange(30) * 5
    whole = TopContexts(12, 2, 4)
    whole.update(indices, values, positions)
    first, second = TopContexts(12, 2, 4), TopContexts(12, 2, 4)
    first.update(indices[:11], values[:11], positions[:11])
    second.update(indices[11:], values[11:], positions[11:])
    for merged in (
        TopContexts.from_state_dict(first.state_dict()).merge(second),
        TopContexts.from_state_dict(second.state_dict()).merge(first),
    ):
        assert torch.equal(merged.values, whole.values)
        assert torch.equal(merged.positions, whole.positions)
        assert merged.n_tokens == 30


def test_top_contexts_refuse_mismatched_inputs() -> None:
    top = TopContexts(5, 2, 3)
    with pytest.raises(MLSAEError, match=r"\[tokens, 2, k\]"):
        top.update(torch.zeros(4, 3, 2, dtype=torch.long), torch.zeros(4, 3, 2), torch.arange(4))
    with pytest.raises(MLSAEError, match="one position per token"):
        top.update(torch.zeros(4, 2, 2, dtype=torch.long), torch.zeros(4, 2, 2), torch.arange(3))
    with pytest.raises(MLSAEError, match="same MLSAE and --top-n"):
        top.merge(TopContexts(5, 2, 4))


def test_valid_token_positions_follow_the_special_mask() -> None:
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[1, 0] = mask[2, 3] = True
    assert valid_token_positions(mask, 1, 3).tolist() == [5, 6, 7, 8, 9, 10]


def test_co_appearing_latents_equal_brute_force() -> None:
    gen = torch.Generator().manual_seed(4)
    indices, values = random_codes(gen, 20, 2, 8, 3)
    top = TopContexts(8, 2, 3)
    top.update(indices, values, torch.arange(20))
    keys: dict[int, set[tuple[int, int]]] = {j: set() for j in range(8)}
    for j, layer, slot in (top.positions >= 0).nonzero().tolist():
        keys[j].add((int(top.positions[j, layer, slot]), layer))
    asked = torch.tensor([5, 0, 2])
    partners, counts = co_appearing_latents(top, asked, n=3)
    for row, j in enumerate(asked.tolist()):
        shared = [(-len(keys[j] & keys[i]), i) for i in range(8) if i != j and keys[j] & keys[i]]
        expected = sorted(shared)[:3]
        got = [(-c, p) for p, c in zip(partners[row].tolist(), counts[row].tolist()) if p >= 0]
        assert got == expected


def test_decoder_logit_lens_equals_the_dense_product() -> None:
    W_dec, W_U = torch.randn(7, 5), torch.randn(5, 30)
    top_ids, top_vals, bottom_ids, bottom_vals = decoder_logit_lens(W_dec, W_U, n=4, chunk=3)
    logits = W_dec @ W_U
    assert torch.allclose(top_vals, logits.sort(1, descending=True).values[:, :4])
    assert torch.allclose(bottom_vals, logits.sort(1).values[:, :4])
    assert torch.allclose(logits.gather(1, top_ids), top_vals)
    assert torch.allclose(logits.gather(1, bottom_ids), bottom_vals)


def test_logit_effects_through_the_final_norm_are_the_same_folded_or_not() -> None:
    import copy

    from tiny import tiny_transformer

    model = tiny_transformer()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a final LayerNorm with a non-trivial weight and bias
        model.ln_final.w.copy_(torch.rand(16, generator=g) + 0.5)
        model.ln_final.b.copy_(torch.randn(16, generator=g))
    folded = copy.deepcopy(model)
    folded.process_weights_(fold_ln=True, center_writing_weights=False, center_unembed=True)
    assert not hasattr(folded.ln_final, "w") and not torch.allclose(folded.W_U, model.W_U)
    W_dec = torch.nn.functional.normalize(torch.randn(7, 16, generator=g), dim=1)
    mine = decoder_logit_lens(W_dec, model.W_U.detach(), 5, 3, final_norm=model.ln_final)
    theirs = decoder_logit_lens(W_dec, folded.W_U.detach(), 5, 3, final_norm=folded.ln_final)
    assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[2], theirs[2])
    assert torch.allclose(mine[1], theirs[1], atol=1e-5)
    # by hand: LayerNorm of the direction without its bias, the unfolded W_U, centered logits
    d = W_dec - W_dec.mean(1, keepdim=True)
    normed = d / (d.square().mean(1, keepdim=True) + model.cfg.eps).sqrt() * model.ln_final.w
    logits = normed.detach() @ model.W_U.detach()
    logits -= logits.mean(1, keepdim=True)
    assert torch.allclose(mine[1], logits.sort(1, descending=True).values[:, :5], atol=1e-5)


# ---------------------------------------------------------------------- in the analysis


@pytest.fixture
def run_dir(tmp_path, trained_run) -> Path:  # noqa: F811 (fixture)
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


@pytest.fixture
def analysed(run_dir, tiny_model, tiny_splits) -> Path:  # noqa: F811 (fixture)
    analyze(run_dir, tiny_model, tiny_splits, tokens=100, top_n=4)
    return run_dir


def test_analysis_collects_the_brute_force_top_contexts(analysed, tiny_model, tiny_splits) -> None:  # noqa: F811
    contexts, extra, meta = load_top_contexts(analysed / TOP_CONTEXTS_FILE)
    top = contexts.top
    assert meta["complete"] and top.n_tokens == 100 and top.top_n == 4
    _, codes = dense_test_codes(analysed, tiny_model, tiny_splits, 100)  # [tokens, L, d_sae]
    positions = valid_token_positions(tiny_splits.test == EOS, 0, tiny_splits.test.shape[0])[:100]
    entries = [
        (j, layer, float(codes[t, layer, j]), int(positions[t]))
        for t, layer, j in (codes > 0).nonzero().tolist()
    ]
    values, expected_positions = brute_force_top(entries, top.n_latents, top.n_layers, 4)
    assert torch.equal(top.positions, expected_positions)
    assert torch.allclose(top.values, values, rtol=1e-5, atol=1e-6)  # batched vs one-shot encode
    assert int(top.positions.max()) < tiny_splits.test.numel()
    kept = extra["context_ids"].tolist()
    assert torch.equal(extra["context_tokens"].long(), tiny_splits.test[kept])

    # histograms and quantile samples of the same pass, against brute force over the dense codes
    hist = torch.zeros(top.n_latents, top.n_layers, N_BINS, dtype=torch.int32)
    sampled: dict[tuple[int, int], list[tuple[float, int, float]]] = {}
    for t, layer, j in (codes > 0).nonzero().tolist():
        value = codes[t, layer, j]
        hist[j, layer, int(bin_index(value.view(1)))] += 1
        latent = torch.full((1, top.n_layers, 1), j)
        priority = float(sample_priority(latent, positions[t].view(1), top.n_layers)[0, layer, 0])
        sampled.setdefault((j, layer), []).append((-priority, int(positions[t]), float(value)))
    # batched and one-shot encodes may differ in the last bits, so a bin edge may flip
    assert (contexts.hist.counts != hist).sum() <= 2
    assert int(contexts.hist.counts.sum()) == int((codes > 0).sum())
    samples = contexts.samples
    for (j, layer), entries in sampled.items():
        want = sorted(entries)[: samples.top_n]  # largest priority, then earliest position
        kept = [p for p in samples.positions[j, layer].tolist() if p >= 0]
        assert kept == [p for _, p, _ in want]
        assert samples.payload[j, layer, : len(want)].tolist() == pytest.approx(
            [v for *_, v in want], rel=1e-5
        )


def test_python_api_gives_windows_around_the_activating_token(analysed, tiny_splits) -> None:  # noqa: F811
    explorer = Explorer.from_run(analysed, window=(3, 2))
    flat = tiny_splits.test.reshape(-1)
    latent, layer = (explorer.top.positions[:, :, 0] >= 0).nonzero()[0].tolist()
    contexts = explorer.top_contexts(latent, layer)
    assert 1 <= len(contexts) <= 4
    assert [c["value"] for c in contexts] == sorted((c["value"] for c in contexts), reverse=True)
    for c in contexts:
        pos, i = c["position"], c["index"]
        assert c["token_ids"][i] == int(flat[pos])
        start = pos - i
        assert start // 16 == pos // 16 and i <= 3  # the window stays inside its context
        assert c["token_ids"] == flat[start : start + len(c["token_ids"])].tolist()
        assert c["tokens"] == [chr(31 + t) for t in c["token_ids"]]  # CharTokenizer.decode
    lens = explorer.logit_lens(latent)
    assert len(lens["positive"]) == len(lens["negative"]) == 10
    assert lens["positive"][0][1] >= lens["positive"][-1][1] > lens["negative"][-1][1]
    sae = load_sae(analysed)
    assert explorer.n_latents == sae.cfg.d_sae
    with pytest.raises(MLSAEError, match="out of range"):
        explorer.top_contexts(sae.cfg.d_sae, 0)
    with pytest.raises(MLSAEError, match="out of range"):
        explorer.top_contexts(0, 3)


def test_resume_after_a_crash_gives_the_same_top_contexts(
    tmp_path, trained_run, tiny_model, tiny_splits  # noqa: F811
) -> None:
    single = Path(shutil.copytree(trained_run, tmp_path / "single"))
    crashed = Path(shutil.copytree(trained_run, tmp_path / "crashed"))
    analyze(single, tiny_model, tiny_splits, tokens=1000, batch_size=BATCH)
    Crash(tiny_model, 3)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            analyze(crashed, tiny_model, tiny_splits, tokens=1000, batch_size=BATCH)
    finally:
        tiny_model.reset_hooks()
    partial, _, meta = load_top_contexts(crashed / TOP_CONTEXTS_FILE)
    assert not meta["complete"] and partial.n_tokens == 60
    with pytest.raises(MLSAEError, match="keeps the top 16 tokens, not 5"):
        analyze(crashed, tiny_model, tiny_splits, tokens=1000, batch_size=BATCH, resume=True, top_n=5)
    analyze(crashed, tiny_model, tiny_splits, tokens=1000, batch_size=BATCH, resume=True)
    a, a_extra, _ = load_top_contexts(single / TOP_CONTEXTS_FILE)
    b, b_extra, _ = load_top_contexts(crashed / TOP_CONTEXTS_FILE)
    a_tables, b_tables = a.tensors(), b.tensors()
    assert a_tables.keys() == b_tables.keys() and "hist_counts" in a_tables
    assert all(torch.equal(a_tables[k], b_tables[k]) for k in a_tables)
    assert a_extra.keys() == b_extra.keys()
    assert all(torch.equal(a_extra[k], b_extra[k]) for k in a_extra)


def test_without_top_contexts_the_explorer_says_how_to_get_them(
    analysed, tiny_model, tiny_splits  # noqa: F811
) -> None:
    analyze(analysed, tiny_model, tiny_splits, tokens=50, top_contexts=False)
    assert not (analysed / TOP_CONTEXTS_FILE).exists()  # the stale file of 100 tokens is gone
    with pytest.raises(MLSAEError, match="--top-contexts"):
        Explorer.from_run(analysed)


def page_json(path: Path) -> dict:
    text = path.read_text()
    return json.loads(re.search(r'id="explorer-data">(.*?)</script>', text, re.S).group(1))


def test_cli_explore_writes_a_page_holding_every_active_latent(analysed, capsys) -> None:
    out = analysed / "page" / "x.html"
    assert main(["explore", str(analysed), "--output", str(out)]) == 0
    assert f"explorer: {out}" in capsys.readouterr().out
    data = page_json(out)
    explorer = Explorer.from_run(analysed)
    counts = explorer.active_token_counts
    active = (counts > 0).nonzero().squeeze(1).tolist()
    assert data["n_shown"] == data["n_active"] == len(active)  # every active latent by default
    assert sorted(data["index"]["id"]) == active
    assert data["index"]["count"] == sorted(data["index"]["count"], reverse=True)
    ids = torch.tensor(data["index"]["id"])
    peak = explorer.layer_given_latent[ids].argmax(1)
    assert data["index"]["peak"] == peak.tolist()
    assert data["index"]["var"] == pytest.approx(explorer.var_layer[ids].tolist(), rel=1e-3)
    first = data["cards"][0]
    layer = next(iter(first["hist"]))
    start, *hist_counts = first["hist"][layer]
    expected = explorer.histogram(data["index"]["id"][0], int(layer))[1]
    assert hist_counts == expected[start : start + len(hist_counts)].tolist()
    assert sum(hist_counts) == int(expected.sum())
    assert "ln_final" in data["logit_note"]

    assert main(["explore", str(analysed), "--output", str(out), "--max-latents", "5"]) == 0
    data = page_json(out)
    assert data["n_shown"] == 5 and data["n_active"] > 5
    shown = data["index"]["id"]
    assert min(counts[shown]) >= sorted(counts.tolist(), reverse=True)[4]  # the most frequent
    assert main(["explore", str(analysed.parent / "nope")]) == 2


def test_files_written_before_samples_still_open(analysed, tmp_path) -> None:
    from mlsae_lens.analysis.stats_files import read_safetensors, write_safetensors

    path = analysed / TOP_CONTEXTS_FILE
    tensors, meta = read_safetensors(path, "mlsae_lens.TopContexts/1")
    old = {k: v for k, v in tensors.items() if not k.startswith(("sample_", "hist_"))}
    write_safetensors(path, old, "mlsae_lens.TopContexts/1", meta)
    explorer = Explorer.from_run(analysed)
    assert explorer.samples is None and explorer.quantile_samples(0, 0) == []
    with pytest.raises(MLSAEError, match="before histograms were collected"):
        explorer.histogram(0, 0)
    data = page_json(explorer.write_html(tmp_path / "old.html"))
    assert data["sample_n"] == 0 and all(not c["smp"] and not c["hist"] for c in data["cards"])


def test_quantile_samples_are_active_tokens_sorted_with_their_quantiles(analysed) -> None:
    explorer = Explorer.from_run(analysed)
    latent, layer = (explorer.samples.positions[:, :, 2] >= 0).nonzero()[0].tolist()
    samples = explorer.quantile_samples(latent, layer)
    assert len(samples) >= 3
    values = [s["value"] for s in samples]
    assert values == sorted(values) and min(values) > 0
    quantiles = [s["quantile"] for s in samples]
    assert quantiles == sorted(quantiles) and 0 <= quantiles[0] and quantiles[-1] <= 1
    assert samples[-1]["value"] <= explorer.top_contexts(latent, layer)[0]["value"]


# ---------------------------------------------------------------------- the page in Chromium


def chromium_dump(chromium: str, url: str, extra: list[str]) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="mlsae-chromium-") as profile:
        cmd = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=5000", *extra, url,
        ]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_explorer_page_works_offline_in_headless_chromium(analysed, tmp_path) -> None:
    script = load_screenshot_script()
    chromium = script.find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium): cannot render the page")
    page = Explorer.from_run(analysed).write_html(tmp_path / "explore.html")
    data = page_json(page)
    latent = data["index"]["id"][len(data["index"]["id"]) // 2]

    proc = chromium_dump(chromium, page.as_uri(), ["--dump-dom"])
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if re.search(r"error|uncaught", line, re.I)], console
    assert 'data-explorer-ready="1"' in proc.stdout, proc.stderr[-2000:]
    assert "data-explorer-error" not in proc.stdout
    assert proc.stdout.count('class="card"') == min(50, data["n_shown"])

    proc = chromium_dump(chromium, f"{page.as_uri()}#latent={latent}", ["--dump-dom"])
    assert 'data-explorer-ready="1"' in proc.stdout, proc.stderr[-2000:]
    assert re.findall(r'class="card" id="card-(\d+)"', proc.stdout) == [str(latent)]
    assert 'class="ctx"' in proc.stdout and 'class="tok act"' in proc.stdout
    assert proc.stdout.count('class="bar') == data["n_layers"]
    assert proc.stdout.count('class="hbar"') >= 1  # the activation histogram
    assert ">P(L|J)</text>" in proc.stdout and ">layer</text>" in proc.stdout  # axis titles
    assert "top logit effects" in proc.stdout and "bottom logit effects" in proc.stdout
    assert "quantile samples" in proc.stdout and "density " in proc.stdout

    # sorting and filtering from the URL: peak layer 1 only, sorted by E[L|J]
    proc = chromium_dump(chromium, f"{page.as_uri()}#sort=el&peak-min=1&peak-max=1", ["--dump-dom"])
    assert 'data-explorer-ready="1"' in proc.stdout, proc.stderr[-2000:]
    peaks = re.findall(r'class="card" id="card-\d+" data-latent="\d+" data-peak="(\d+)"', proc.stdout)
    expected = sum(1 for p in data["index"]["peak"] if p == 1)
    assert expected > 0 and peaks == ["1"] * min(50, expected)
    shown_ids = [int(i) for i in re.findall(r'class="card" id="card-(\d+)"', proc.stdout)]
    el_of = dict(zip(data["index"]["id"], data["index"]["el"]))
    assert [el_of[i] for i in shown_ids] == sorted(el_of[i] for i in shown_ids)

    shot = tmp_path / "explore.png"
    chromium_dump(
        chromium, f"{page.as_uri()}#latent={latent}", [f"--screenshot={shot}", "--window-size=1200,900"]
    )
    size, ink = png_size_and_ink(shot)
    assert size == (1200, 900) and ink > 0.005
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "explore.png")


def test_page_server_answers_the_page_on_localhost_only(analysed, tmp_path) -> None:
    import threading
    import urllib.error
    import urllib.request

    from mlsae_lens.explorer_serve import page_server

    page = Explorer.from_run(analysed).write_html(tmp_path / "explore.html")
    server = page_server(page, port=0)  # any free port
    assert server.server_address[0] == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        with urllib.request.urlopen(f"{base}/") as response:
            assert response.read() == page.read_bytes()
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"{base}/../run/stats.safetensors")
    finally:
        server.shutdown()
        server.server_close()
