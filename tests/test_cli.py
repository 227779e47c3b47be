"""The ``mlsae-lens`` command line: help, bad input, and end-to-end runs on the embedded model."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from sae_lens import SAE

from mlsae_lens import MultiLayerSAE
from mlsae_lens.cli import build_parser, main
from mlsae_lens.config import MultiLayerRunnerConfig

TINY = [
    "--training-tokens", "96", "--batch-size-tokens", "32", "--expansion-factor", "1", "--k", "4",
    "--contexts-per-chunk", "2", "--model-batch-size", "2", "--context-size", "64",
    "--max-corpus-tokens", "4096",
]


def test_every_train_flag_has_help_and_a_default() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    train = sub.choices["train"]
    flags = {a.dest: a for a in train._actions if a.dest != "help"}
    for f in dataclasses.fields(MultiLayerRunnerConfig):
        assert f.name in flags, f.name
        assert flags[f.name].help and "default" in flags[f.name].help


def test_python_dash_m_runs_the_cli() -> None:
    out = subprocess.run([sys.executable, "-m", "mlsae_lens", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "demo" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--k", "0"], "--k must be positive"),
        (["train", "--expansion-factor", "0"], "expansion-factor"),
        (["train", "--expansion-factor", "-2"], "expansion-factor"),
        (["train", "--test-fraction", "0"], "test-fraction"),
    ],
)
def test_bad_settings_exit_nonzero_with_one_line(args, message, capsys, tmp_path) -> None:
    assert main([*args, "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_missing_corpus_file_is_named(capsys, tmp_path, embedded_model) -> None:  # noqa: ARG001 (warm cache)
    code = main(["train", "--dataset", str(tmp_path / "missing.txt"), "--output-dir", str(tmp_path / "run")])
    assert code == 2
    assert "missing.txt" in capsys.readouterr().err


@pytest.mark.slow
def test_train_end_to_end_on_the_embedded_model(tmp_path, embedded_model) -> None:  # noqa: ARG001
    out = tmp_path / "run"
    assert main(["train", *TINY, "--output-dir", str(out)]) == 0
    sae = SAE.load_from_disk(out)
    assert isinstance(sae, MultiLayerSAE)
    assert sae.cfg.n_layers == 30 and sae.cfg.d_in == 576 and sae.cfg.d_sae == 576
    log = json.loads((out / "training_log.json").read_text())
    assert log[-1]["tokens"] >= 96


@pytest.mark.slow
def test_demo_end_to_end_writes_report_and_metrics(tmp_path, embedded_model) -> None:  # noqa: ARG001
    out = tmp_path / "demo"
    assert main(["demo", *TINY, "--eval-tokens", "256", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "eval.json").read_text())
    assert len(metrics["per_layer"]["fvu"]) == 30 and "pca_mean_fvu" in metrics
    assert (out / "report.html").stat().st_size > 100_000  # plotly.js embedded: opens offline


def test_resume_of_a_directory_without_a_run_is_refused(tmp_path, capsys) -> None:
    assert main(["train", "--resume", "--output-dir", str(tmp_path)]) == 2
    assert "holds no run to resume" in capsys.readouterr().err


def test_an_sae_whose_shape_does_not_fit_the_model_is_refused(embedded_model) -> None:
    from mlsae_lens import MLSAEError, MultiLayerSAEConfig
    from mlsae_lens.run_files import check_sae_fits_model

    sae = MultiLayerSAE(MultiLayerSAEConfig(d_in=64, d_sae=128, k=4, n_layers=6))
    with pytest.raises(MLSAEError, match="d_in=64 over n_layers=6.*d_model=576 and n_layers=30"):
        check_sae_fits_model(sae, embedded_model)


def test_runner_config_round_trips_through_its_json_dict(tmp_path: Path) -> None:
    cfg = MultiLayerRunnerConfig(output_dir=str(tmp_path), k=7, normalization="center")
    assert MultiLayerRunnerConfig.from_dict(cfg.to_dict()) == cfg
