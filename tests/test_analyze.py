"""The analysis pipeline end to end on a tiny random TransformerLens model and a tiny run."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer

from mlsae_lens import MLSAEError
from mlsae_lens.activations import harvest_resid_post, valid_token_vectors
from mlsae_lens.analysis import reference_per_batch_ratios, variance_ratios
from mlsae_lens.analysis_options import AnalysisOptions
from mlsae_lens.analysis_prompt import analyze_prompt
from mlsae_lens.analysis_state import AnalysisStats
from mlsae_lens.analyze import analyze_run
from mlsae_lens.checkpoint import atomic_write_json
from mlsae_lens.cli import main
from mlsae_lens.config import MultiLayerRunnerConfig
from mlsae_lens.data import TokenSplits
from mlsae_lens.evals import evaluate_reconstruction
from mlsae_lens.report_compare import compare_runs
from mlsae_lens.run_files import load_sae
from mlsae_lens.run_report import build_run_report
from mlsae_lens.sae_mixin import scatter_topk
from mlsae_lens.topk_contexts import valid_token_positions
from mlsae_lens.run_training import TrainingRun
from tiny import tiny_token_splits, tiny_transformer

EOS = 0
N_CTX = 32
BATCH = 2  # contexts per model forward: 4 batches over the 8 test contexts


class CharTokenizer:
    """One token per character (ids 1..63), EOS = 0: enough for prompts and special masks."""

    eos_token_id = EOS
    bos_token_id = None
    pad_token_id = None
    unk_token_id = None
    padding_side = "right"

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [1 + ord(c) % 63 for c in text]}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(31 + i) for i in ids)


@pytest.fixture(scope="module")
def tiny_model() -> HookedTransformer:
    return tiny_transformer(n_ctx=N_CTX, tokenizer=CharTokenizer())

@pytest.fixture(scope="module")
def tiny_splits() -> TokenSplits:
    return tiny_token_splits()  # 8 test contexts hold 120 valid tokens

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model, tiny_splits) -> Path:
    out = tmp_path_factory.mktemp("run")
    cfg = MultiLayerRunnerConfig(
        model_name="tiny",
        output_dir=str(out),
        context_size=16,
        expansion_factor=4,
        k=4,
        training_tokens=15 * 12,
        batch_size_tokens=15,
        contexts_per_chunk=4,
        model_batch_size=BATCH,
        lr=1e-3,
        dead_tokens_threshold=30,
        log_every_steps=1,
        seed=3,
    )
    TrainingRun(cfg, model=tiny_model, splits=tiny_splits).run()
    return out


@pytest.fixture
def run_dir(tmp_path, trained_run) -> Path:
    """A private copy of the trained run (the analysis writes into it)."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def analyze(run_dir, model, splits, **options):
    options.setdefault("save_every_tokens", 1)
    options.setdefault("prompt", "John gave Mary")  # the default prompt exceeds n_ctx=32 chars
    return analyze_run(run_dir, AnalysisOptions(**options), model=model, splits=splits)


def dense_test_codes(run_dir, model, splits, n_tokens):
    """Residual vectors and dense latent codes of the first ``n_tokens`` valid test tokens."""
    sae = load_sae(run_dir)
    parts = []
    for i in range(0, splits.test.shape[0], BATCH):
        acts = harvest_resid_post(model, splits.test[i : i + BATCH])
        parts.append(valid_token_vectors(acts, splits.test[i : i + BATCH] == EOS))
    vectors = torch.cat(parts)[:n_tokens]
    with torch.no_grad():
        codes = scatter_topk(sae.encode_topk(vectors), sae.cfg.d_sae)
    return vectors, codes


def test_metrics_equal_brute_force_ratios_and_norms(run_dir, tiny_model, tiny_splits) -> None:
    metrics = analyze(run_dir, tiny_model, tiny_splits, tokens=50)  # cuts a model batch
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["layer_distribution"] == metrics["layer_distribution"]

    vectors, codes = dense_test_codes(run_dir, tiny_model, tiny_splits, 50)
    expected = variance_ratios(codes).to_dict()
    got = saved["layer_distribution"]
    assert got["n_tokens"] == 50
    for key in ("n_active_latents", "n_dead_latents", "n_latents", "n_layers"):
        assert got[key] == expected[key], key
    for key in (
        "latent_ratio",
        "token_ratio",
        "var_layer",
        "mean_var_given_latent",
        "total_variance_identity_rhs",
        "within_latent_identity_rhs",
    ):
        assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
    assert got["total_variance_identity_lhs"] == pytest.approx(got["total_variance_identity_rhs"])
    assert got["within_latent_identity_lhs"] == pytest.approx(got["within_latent_identity_rhs"])

    x = vectors.double()
    centered = x - x.mean(0)
    resid = saved["residual"]
    assert resid["n_tokens"] == resid["n_tokens_centered"] == 50
    assert resid["mean_norm"] == pytest.approx(x.norm(dim=-1).mean(0).tolist(), rel=1e-6)
    assert resid["centered_mean_norm"] == pytest.approx(
        centered.norm(dim=-1).mean(0).tolist(), rel=1e-6
    )
    cos = F.cosine_similarity(centered[:, :-1], centered[:, 1:], dim=-1).mean(0)
    assert resid["mean_cosine_adjacent_centered"] == pytest.approx(cos.tolist(), rel=1e-6)


def test_metrics_hold_the_reference_estimator_of_the_ratios(run_dir, tiny_model, tiny_splits) -> None:
    metrics = analyze(run_dir, tiny_model, tiny_splits, tokens=50)
    _, codes = dense_test_codes(run_dir, tiny_model, tiny_splits, 50)
    expected = reference_per_batch_ratios([codes])  # 50 tokens: one (partial) 2,048-token batch
    got = metrics["reference_ratios"]
    assert got["n_batches"] == 1 and got["batch_tokens"] == 2048 and got["last_batch_tokens"] == 50
    assert got["latent_ratio"] == pytest.approx(expected["latent_ratio"], rel=1e-9)
    assert got["token_ratio"] == pytest.approx(expected["token_ratio"], rel=1e-9)
    assert got["latent_ratio"] != pytest.approx(metrics["layer_distribution"]["latent_ratio"])


def test_skip_first_position_drops_position_zero_from_the_norm_statistics(
    run_dir, tiny_model, tiny_splits
) -> None:
    metrics = analyze(run_dir, tiny_model, tiny_splits, tokens=1000, skip_first_position=True)
    vectors, _ = dense_test_codes(run_dir, tiny_model, tiny_splits, 120)
    positions = valid_token_positions(tiny_splits.test == EOS, 0, tiny_splits.test.shape[0])
    keep = positions % tiny_splits.test.shape[1] != 0
    assert 0 < int((~keep).sum()) < 120  # the tiny split has valid tokens at position 0
    x = vectors[keep].double()
    resid = metrics["residual"]
    assert resid["n_tokens"] == resid["n_tokens_centered"] == int(keep.sum())
    assert resid["mean_norm"] == pytest.approx(x.norm(dim=-1).mean(0).tolist(), rel=1e-6)
    assert resid["centered_mean_norm"] == pytest.approx(
        (x - x.mean(0)).norm(dim=-1).mean(0).tolist(), rel=1e-6
    )
    assert metrics["layer_distribution"]["n_tokens"] == 120  # latents still see every token
    assert metrics["analysis"]["skip_first_position"] is True
    assert "left each context's first position out" in (run_dir / "report.html").read_text()
    with pytest.raises(MLSAEError, match="skip_first_position"):  # resume checks the setting
        analyze(run_dir, tiny_model, tiny_splits, tokens=1000, resume=True)


def test_cli_passes_skip_first_position_to_the_analysis() -> None:
    from mlsae_lens.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["analyze", "RUN", "--skip-first-position"]).skip_first_position
    assert not parser.parse_args(["analyze", "RUN"]).skip_first_position


def test_token_budget_is_capped_at_the_test_split(run_dir, tiny_model, tiny_splits) -> None:
    metrics = analyze(run_dir, tiny_model, tiny_splits, tokens=10_000_000)
    assert metrics["layer_distribution"]["n_tokens"] == 120
    assert metrics["analysis"]["tokens_available"] == 120


def test_centered_pass_can_be_capped(run_dir, tiny_model, tiny_splits) -> None:
    metrics = analyze(run_dir, tiny_model, tiny_splits, tokens=100, centered_tokens=40)
    vectors, _ = dense_test_codes(run_dir, tiny_model, tiny_splits, 100)
    x = vectors.double()
    centered = x[:40] - x.mean(0)  # means of all 100 tokens, norms of the first 40
    assert metrics["residual"]["n_tokens_centered"] == 40
    assert metrics["residual"]["centered_mean_norm"] == pytest.approx(
        centered.norm(dim=-1).mean(0).tolist(), rel=1e-6
    )


def test_stats_file_reloads_and_merges(run_dir, tiny_model, tiny_splits) -> None:
    metrics = analyze(run_dir, tiny_model, tiny_splits, tokens=1000)
    stats = AnalysisStats.load(run_dir / "stats.safetensors")
    assert stats.progress["phase"] == "done"
    assert stats.layer.compute().to_dict() == metrics["layer_distribution"]
    assert stats.resid.compute().to_dict() == metrics["residual"]

    doubled = AnalysisStats.load(run_dir / "stats.safetensors").merge(stats)
    assert doubled.layer.n_tokens == 240 and doubled.resid.n_tokens_centered == 240
    assert torch.equal(doubled.layer.sum_p, 2 * stats.layer.sum_p)
    merged = doubled.layer.compute()
    assert merged.latent_ratio == pytest.approx(metrics["layer_distribution"]["latent_ratio"])
    assert merged.token_ratio == pytest.approx(metrics["layer_distribution"]["token_ratio"])
    assert doubled.resid.compute().mean_cosine_adjacent_centered.tolist() == pytest.approx(
        metrics["residual"]["mean_cosine_adjacent_centered"]
    )


class Crash:
    """Raise on the n-th model forward (a real TransformerLens hook)."""

    def __init__(self, model: HookedTransformer, at_call: int) -> None:
        self.calls, self.at_call = 0, at_call
        model.blocks[0].hook_resid_post.add_hook(self)

    def __call__(self, x, hook):
        self.calls += 1
        if self.calls == self.at_call:
            raise RuntimeError("simulated crash")
        return x


@pytest.mark.parametrize(("crash_at", "phase"), [(3, "latents"), (6, "centered")])
def test_resume_after_a_crash_equals_a_single_run(
    tmp_path, trained_run, tiny_model, tiny_splits, crash_at, phase
) -> None:
    single = Path(shutil.copytree(trained_run, tmp_path / "single"))
    crashed = Path(shutil.copytree(trained_run, tmp_path / "crashed"))
    expected = analyze(single, tiny_model, tiny_splits, tokens=1000, batch_size=BATCH)
    Crash(tiny_model, crash_at)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            analyze(crashed, tiny_model, tiny_splits, tokens=1000, batch_size=BATCH)
    finally:
        tiny_model.reset_hooks()
    partial = AnalysisStats.load(crashed / "stats.safetensors")
    assert partial.progress["phase"] == phase  # 4 model batches per pass, saved after each
    assert partial.layer.n_tokens == (60 if phase == "latents" else 120)
    assert not (crashed / "metrics.json").exists()
    with pytest.raises(MLSAEError, match="partial analysis .* pass --resume"):
        analyze(crashed, tiny_model, tiny_splits, tokens=1000, batch_size=BATCH)
    with pytest.raises(MLSAEError, match="tokens_target"):
        analyze(crashed, tiny_model, tiny_splits, tokens=60, resume=True)

    resumed = analyze(crashed, tiny_model, tiny_splits, tokens=1000, batch_size=BATCH, resume=True)
    assert resumed["layer_distribution"] == expected["layer_distribution"]
    assert resumed["reference_ratios"] == expected["reference_ratios"]
    assert resumed["residual"] == expected["residual"]
    a = AnalysisStats.load(single / "stats.safetensors")
    b = AnalysisStats.load(crashed / "stats.safetensors")
    for mine, theirs in (
        (a.layer.state_dict(), b.layer.state_dict()),
        (a.resid.state_dict(), b.resid.state_dict()),
    ):
        assert mine.keys() == theirs.keys()
        for name, value in mine.items():
            same = (
                torch.equal(value, theirs[name])
                if torch.is_tensor(value)
                else value == theirs[name]
            )
            assert same, name


def test_resume_in_the_centered_pass_with_skip_first_position_equals_a_single_run(
    tmp_path, trained_run, tiny_model, tiny_splits
) -> None:
    single = Path(shutil.copytree(trained_run, tmp_path / "single"))
    crashed = Path(shutil.copytree(trained_run, tmp_path / "crashed"))
    opts = {"tokens": 1000, "batch_size": BATCH, "skip_first_position": True}
    expected = analyze(single, tiny_model, tiny_splits, **opts)
    Crash(tiny_model, 7)  # the third model batch of the centered pass
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            analyze(crashed, tiny_model, tiny_splits, **opts)
    finally:
        tiny_model.reset_hooks()
    assert AnalysisStats.load(crashed / "stats.safetensors").progress["phase"] == "centered"
    resumed = analyze(crashed, tiny_model, tiny_splits, **opts, resume=True)
    assert resumed["residual"] == expected["residual"]


def test_report_holds_training_evaluation_and_analysis(run_dir, tiny_model, tiny_splits) -> None:
    sae = load_sae(run_dir)
    result = evaluate_reconstruction(sae, tiny_model, tiny_splits.test, tiny_splits.test == EOS)
    atomic_write_json(run_dir / "eval.json", result.to_dict())
    analyze(run_dir, tiny_model, tiny_splits, tokens=1000, prompt="John gave Mary")
    text = (run_dir / "report.html").read_text()
    # training, FVU, Eq. 11/12 bars, 2 latent, 2 prompt, 2 norm
    assert text.count('class="plotly-graph-div"') == 9
    for heading in (
        "Training",
        "Reconstruction on the held-out split",
        "Latent distributions over layers",
        "Single prompt",
        "Residual stream",
        "Analysis provenance",
    ):
        assert f"<h2>{heading}</h2>" in text, heading
    assert "E[Var(L|J)] + Var(E[L|J])" in text and "never-active latents" in text
    assert "Eq. 11, reference estimator" in text and "reference estimator" in text
    assert "first position of each packed context" in text and "--skip-first-position" in text
    # config and corpus as nested tables, not JSON text in a cell
    assert "<h3>Configuration (run.json)</h3><table><tr><th>" in text
    assert "{&quot;" not in text and '{"' not in text.split("<script")[0]

    (run_dir / "report.html").unlink()
    build_run_report(run_dir)  # redrawn from the saved files alone
    assert (run_dir / "report.html").read_text().count('class="plotly-graph-div"') == 9


def test_prompt_view_picks_the_latent_with_the_largest_total_activation(
    trained_run, tiny_model
) -> None:
    sae = load_sae(trained_run)
    prompt = analyze_prompt(sae, tiny_model, "John gave Mary")
    assert prompt["tokens"] == [
        CharTokenizer().decode([i]) for i in CharTokenizer()("John gave Mary")["input_ids"]
    ]
    ids = torch.tensor(prompt["token_ids"])[None]
    with torch.no_grad():
        codes = scatter_topk(sae.encode_topk(harvest_resid_post(tiny_model, ids)[0]), sae.cfg.d_sae)
    assert prompt["top_latent"] == int(codes.sum((0, 1)).argmax())
    assert torch.tensor(prompt["top_latent_activations"]).float() == pytest.approx(
        codes[:, :, prompt["top_latent"]]
    )
    assert sorted(prompt["latents"]) == codes.sum((0, 1)).nonzero().squeeze(1).tolist()
    assert prompt["expected_layer"] == sorted(prompt["expected_layer"])
    sparse = prompt["layer_given_latent"]
    dense = torch.zeros(sparse["shape"], dtype=torch.float64)
    dense[sparse["row"], sparse["layer"]] = torch.tensor(sparse["value"], dtype=torch.float64)
    expected = variance_ratios(codes).layer_given_latent[prompt["latents"]]
    assert dense == pytest.approx(expected, rel=1e-6)


def test_compare_draws_ratios_of_several_runs(
    tmp_path, trained_run, tiny_model, tiny_splits
) -> None:
    runs = []
    for weighting in ("uniform_tokens", "activation_mass"):
        run = Path(shutil.copytree(trained_run, tmp_path / weighting))
        analyze(run, tiny_model, tiny_splits, tokens=1000, weighting=weighting)
        runs.append(run)
    out = compare_runs(runs, tmp_path / "out" / "compare.html")
    text = out.read_text()
    assert text.count('class="plotly-graph-div"') == 3
    assert "uniform_tokens" in text and "activation_mass" in text


# ---------------------------------------------------------------------- bad inputs


def test_a_missing_run_dir_is_named(tmp_path, tiny_model, tiny_splits) -> None:
    with pytest.raises(MLSAEError, match="does not exist"):
        analyze(tmp_path / "nope", tiny_model, tiny_splits)
    assert main(["analyze", str(tmp_path / "nope")]) == 2


def test_a_directory_that_is_not_a_run_is_named(tmp_path, tiny_model, tiny_splits) -> None:
    with pytest.raises(MLSAEError, match="not an mlsae-lens run directory"):
        analyze(tmp_path, tiny_model, tiny_splits)


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ("", "--prompt is empty"),
        ("   ", "--prompt is empty"),
        ("x" * (N_CTX + 1), f"{N_CTX + 1} tokens but the model's context holds at most {N_CTX}"),
    ],
)
def test_bad_prompts_are_refused(run_dir, tiny_model, tiny_splits, prompt, match) -> None:
    with pytest.raises(MLSAEError, match=match):
        analyze(run_dir, tiny_model, tiny_splits, prompt=prompt)
    assert not (run_dir / "stats.safetensors").exists()  # refused before the long pass


@pytest.mark.parametrize("tokens", [0, -5])
def test_a_non_positive_token_budget_is_refused(tmp_path, tokens, capsys) -> None:
    with pytest.raises(MLSAEError, match="--tokens must be a positive integer"):
        AnalysisOptions(tokens=tokens)
    assert main(["analyze", str(tmp_path), "--tokens", str(tokens)]) == 2
    assert "argument --tokens: must be positive" in capsys.readouterr().err  # argparse, before any load


def test_resume_without_saved_stats_is_refused(run_dir, tiny_model, tiny_splits) -> None:
    with pytest.raises(MLSAEError, match="no stats.safetensors yet"):
        analyze(run_dir, tiny_model, tiny_splits, resume=True)


def test_compare_with_an_unanalysed_run_says_to_analyze_it(run_dir, tmp_path, capsys) -> None:
    with pytest.raises(MLSAEError, match=r"run `mlsae-lens analyze .*run` first"):
        compare_runs([run_dir], tmp_path / "c.html")
    assert main(["compare", str(run_dir), "--output", str(tmp_path / "c.html")]) == 2
    assert "mlsae-lens analyze" in capsys.readouterr().err


def test_compare_of_one_run_twice_is_refused_under_any_spelling(run_dir, tmp_path, capsys) -> None:
    link = tmp_path / "link"
    link.symlink_to(run_dir)
    for second in (run_dir, Path(f"{run_dir}/"), run_dir / ".." / run_dir.name, link):
        assert main(["compare", str(run_dir), str(second), "--output", str(tmp_path / "c.html")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "twice" in err and "pass each run directory once" in err, err
    assert not (tmp_path / "c.html").exists()


# ---------------------------------------------------------------------- the real CLI


@pytest.mark.slow
def test_cli_analyze_on_the_embedded_model(tmp_path) -> None:
    from mlsae_lens.sae import MultiLayerSAE, MultiLayerSAEConfig

    run = tmp_path / "run"
    run.mkdir()
    cfg = MultiLayerRunnerConfig(
        output_dir=str(run),
        context_size=64,
        max_corpus_tokens=5000,
        expansion_factor=1,
        k=8,
        seed=0,
        model_batch_size=4,
    )
    atomic_write_json(run / "run.json", cfg.to_dict())
    torch.manual_seed(0)
    MultiLayerSAE(MultiLayerSAEConfig(d_in=576, d_sae=576, k=8, n_layers=30)).save_model(run)

    assert main(["analyze", str(run), "--tokens", "200", "--device", "cpu"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["layer_distribution"]["n_tokens"] == 200
    assert 0 <= metrics["layer_distribution"]["latent_ratio"] <= 1
    assert metrics["prompt"]["tokens"][:2] == ["When", " John"]
    # Eq. 11/12 bars, 2 latent, 2 prompt, 2 norm
    assert (run / "report.html").read_text().count('class="plotly-graph-div"') == 7


# ---------------------------------------------------------------------- the report in a browser


def load_screenshot_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_report.py"
    spec = importlib.util.spec_from_file_location("screenshot_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_size_and_ink(path: Path) -> tuple[tuple[int, int], float]:
    """(width, height) and the fraction of non-zero bytes of the filtered image data: PNG rows
    are delta-filtered, so a blank page is almost all zeros (0.04% for a page of one heading)
    while a page of figures is not (~3%)."""
    import struct
    import zlib

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    return size, 1 - raw.count(0) / len(raw)


def test_report_renders_in_headless_chromium(run_dir, tmp_path, tiny_model, tiny_splits) -> None:
    script = load_screenshot_script()
    chromium = script.find_chromium()
    if chromium is None:
        pytest.skip(
            "chromium is not installed (apt-get install -y chromium): cannot render the report"
        )
    analyze(run_dir, tiny_model, tiny_splits, tokens=1000)
    report = run_dir / "report.html"
    out = script.screenshot(report, tmp_path / "report.png", chromium)
    size, ink = png_size_and_ink(out)
    assert size == (1200, 3000)
    assert ink > 0.01, f"the screenshot is nearly blank ({ink:.1%} non-zero filtered bytes)"
    # training + Eq. 11/12 bars + 2 latent + 2 prompt + 2 norm
    assert script.drawn_figures(report, chromium) == 8


def test_a_damaged_stats_file_is_named_and_overwrite_replaces_it(
    run_dir, tiny_model, tiny_splits
) -> None:
    (run_dir / "stats.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MLSAEError, match="stats.safetensors is damaged"):
        analyze(run_dir, tiny_model, tiny_splits, resume=True)
    metrics = analyze(run_dir, tiny_model, tiny_splits, tokens=30, overwrite=True)
    assert metrics["layer_distribution"]["n_tokens"] == 30
