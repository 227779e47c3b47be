"""Every flag is checked before a model or corpus loads: exit code 2, one line, nothing written.

The walking test reads the parser itself, so a numeric flag added later is covered without
editing this file: it fails until the new flag refuses out-of-range values.
"""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from mlsae_lens import models
from mlsae_lens.cli import build_parser, main
from mlsae_lens.config import NORMALIZATION_MODES, MultiLayerRunnerConfig
from mlsae_lens.errors import MLSAEError
from mlsae_lens.flags import check_model_sizes
from test_analyze import analyze, tiny_model, tiny_splits, trained_run  # noqa: F401 (fixtures)


def positional_args(path: tuple[str, ...], tmp: Path) -> list[str]:
    """Just enough arguments for argparse to reach the flag under test."""
    out = str(tmp / "out")
    return {
        ("train",): ["--output-dir", out],
        ("demo",): ["--output-dir", out],
        ("analyze",): [str(tmp / "run")],
        ("compare",): [str(tmp / "a"), str(tmp / "b"), "--output", str(tmp / "c.html")],
        ("explore",): [str(tmp / "run")],
        ("eval",): [str(tmp / "run")],
        ("cache",): ["--output", out],
        ("train-lens",): ["--output", out],
        ("pretrained", "convert"): ["release", "sae-id", "--output", out],
        ("pretrained", "list"): [],
    }[path]


def subcommand_actions() -> list[tuple[tuple[str, ...], argparse.Action]]:
    """(command path, action) for every option of every subcommand, nested ones included."""
    found = []

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, (*path, name))
            elif path and action.option_strings:
                found.append((path, action))

    walk(build_parser(), ())
    return found


def is_numeric(action: argparse.Action) -> bool:
    """Whether the flag's type turns some plain number into an int or a float."""
    if not callable(action.type):
        return False
    for probe in ("100", "0.5"):
        try:
            value = action.type(probe)
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            continue
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return False


NUMERIC_FLAGS = [(path, action.option_strings[0]) for path, action in subcommand_actions() if is_numeric(action)]


@pytest.fixture
def nothing_loads(monkeypatch):
    """A model or corpus load means validation came too late: fail loudly instead."""

    def too_late(*args, **kwargs):
        raise AssertionError("a model or corpus was loaded before the flags were validated")

    from mlsae_lens import data

    monkeypatch.setattr(models, "load_model", too_late)
    monkeypatch.setattr(data, "load_token_splits", too_late)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)  # argparse's own errors too: main returns the exit code, never raises SystemExit
    return code, capsys.readouterr().err.strip()


def test_the_walk_finds_the_numeric_flags_of_every_subcommand() -> None:
    commands = {path[0] for path, _ in NUMERIC_FLAGS}
    assert commands == {"train", "demo", "analyze", "explore", "eval", "cache", "train-lens", "pretrained"}
    assert len(NUMERIC_FLAGS) > 40


@pytest.mark.parametrize("bad", ["-1", "nan", "inf", "abc"])
@pytest.mark.parametrize(("path", "flag"), NUMERIC_FLAGS, ids=[" ".join(p) + f" {f}" for p, f in NUMERIC_FLAGS])
def test_every_numeric_flag_refuses_out_of_range_values_before_anything_loads(
    path, flag, bad, tmp_path, capsys, nothing_loads  # noqa: ARG001
) -> None:
    before = sorted(tmp_path.iterdir())
    code, err = run_cli([*path, *positional_args(path, tmp_path), f"{flag}={bad}"], capsys)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert flag in err, err
    assert sorted(tmp_path.iterdir()) == before  # no run or cache directory left behind


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--adam-beta1", "1.5"], "--adam-beta1 must be in [0, 1)"),
        (["train", "--adam-beta2", "1"], "--adam-beta2 must be in [0, 1)"),
        (["train", "--log-every-steps", "0"], "--log-every-steps must be positive, got 0"),
        (["train", "--checkpoint-every-tokens", "-1"], "--checkpoint-every-tokens must be positive"),
        (["train", "--lr", "inf"], "--lr must be a positive finite number"),
        (["train", "--device", "tpu"], "--device 'tpu' is not a device; use cpu, cuda, cuda:N or auto"),
        (["train", "--device", "cuda:x"], "--device 'cuda:x' is not a device"),
        (["demo", "--device", "tpu"], "--device 'tpu' is not a device"),
        (["cache", "--output", "OUT", "--device", "tpu"], "--device 'tpu' is not a device"),
        (["eval", "RUN", "--device", "tpu"], "argument --device: 'tpu' is not a device; use cpu, cuda"),
        (["analyze", "RUN", "--device", "cuda:x"], "argument --device: 'cuda:x' is not a device"),
        (["eval", "RUN", "--layers=-1"], "argument --layers: must be 'all' or distinct layer indices >= 0"),
        (["eval", "RUN", "--layers", "0,0,,1"], "argument --layers: must be 'all' or distinct"),
        (["eval", "RUN", "--layers", "0,0,1"], "argument --layers: names a layer twice"),
        (["explore", "RUN", "--serve", "--port", "99999"], "argument --port: must be between 1 and 65535"),
        (["explore", "RUN", "--output", "."], "argument --output/--output-dir: . is a directory"),
        (["compare", "A", "B", "--output", "."], "argument --output/--output-dir: . is a directory"),
        (["train-lens", "--momentum", "1"], "argument --momentum: must be in [0, 1)"),
        (["train-lens", "--lr-scale", "nan"], "argument --lr-scale: must be in"),
        (["train", "--dataset", " "], "--dataset is empty"),
        (["train", "--model-name", ""], "--model-name is empty"),
        (["train", "--activation-cache", ""], "--activation-cache is empty"),
        (["cache", "--output", ""], "argument --output/--output-dir: is empty; name a directory"),
        (["pretrained", "convert", "R", "ID", "--output", ""], "argument --output/--output-dir: is empty"),
        (["analyze", "RUN", "--prompt", ""], "argument --prompt: is empty"),
    ],
)
def test_bad_flags_give_one_line_naming_the_flag_and_write_nothing(
    args, message, tmp_path, capsys, monkeypatch, nothing_loads  # noqa: ARG001
) -> None:
    monkeypatch.chdir(tmp_path)
    extra = [] if args[0] in ("eval", "analyze", "explore", "compare", "cache", "pretrained") else ["--output-dir", "OUT"]
    code, err = run_cli([*args, *extra], capsys)
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_cuda_without_cuda_is_one_line(tmp_path, capsys, monkeypatch, nothing_loads) -> None:  # noqa: ARG001
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = run_cli(["train", "--device", "cuda", "--output-dir", str(tmp_path / "run")], capsys)
    assert (code, err) == (2, "mlsae-lens: error: --device cuda was asked for but CUDA is not available; "
                              "use --device cpu")
    assert not (tmp_path / "run").exists()


def test_k_context_size_and_sae_memory_are_checked_from_the_model_files_before_loading(
    tmp_path, capsys, nothing_loads  # noqa: ARG001
) -> None:
    """The embedded model's width and context come from its GGUF header, not a load."""
    code, err = run_cli(["train", "--k", "576", "--expansion-factor", "1", "--output-dir", str(tmp_path / "run")],
                        capsys)
    assert code == 2
    assert err == ("mlsae-lens: error: --k 576 must be below the SAE's 576 latents (--expansion-factor 1 x "
                   "d_model 576); lower --k or raise --expansion-factor")
    assert not (tmp_path / "run").exists()
    code, err = run_cli(["train", "--context-size", "9000", "--output-dir", str(tmp_path / "run")], capsys)
    assert (code, err) == (2, "mlsae-lens: error: --context-size 9000 is longer than the model's 8192 positions; "
                              "use at most 8192")
    assert not (tmp_path / "run").exists()
    code, err = run_cli(["train", "--expansion-factor", "100_000_000", "--device", "cpu", "--output-dir",
                         str(tmp_path / "run")], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("mlsae-lens: error: --expansion-factor 100000000 makes 57600000000 latents, whose weights, "
                          "gradients and Adam state need 1061683.2 GB but cpu has ")
    assert err.endswith("GB free; lower --expansion-factor") and not (tmp_path / "run").exists()
    # A hub model's sizes are not read before the load: the SAE config checks it after the load.
    check_model_sizes(MultiLayerRunnerConfig(model_name="pythia-70m", k=10_000, expansion_factor=1))


def test_output_and_output_dir_are_the_same_flag_everywhere() -> None:
    spellings = {}
    for path, action in subcommand_actions():
        if action.dest in ("output", "output_dir"):
            spellings[path] = set(action.option_strings)
    assert set(spellings) == {("train",), ("demo",), ("compare",), ("explore",), ("cache",), ("train-lens",),
                              ("pretrained", "convert")}
    assert all(s == {"--output", "--output-dir"} for s in spellings.values()), spellings
    args = build_parser().parse_args(["train", "--output", "somewhere"])
    assert args.output_dir == "somewhere"
    args = build_parser().parse_args(["explore", "RUN", "--output-dir", "page.html"])
    assert args.output == "page.html"


def test_help_says_default_once_and_every_flag_has_help() -> None:
    for path, action in subcommand_actions():
        if action.dest == "help":
            continue
        text = (action.help or "").replace("%(default)s", str(action.default)).replace("%(default)r", repr(action.default))
        assert text.count("(default") <= 1, (path, action.option_strings, text)
        assert text and not text.startswith("("), (path, action.option_strings, text)


def test_cache_help_shows_only_the_flags_it_uses() -> None:
    flags = {f for path, action in subcommand_actions() if path == ("cache",) for f in action.option_strings}
    assert "--training-tokens" in flags and "--model-name" in flags and "--contexts-per-shard" in flags
    for unused in ("--k", "--lr", "--expansion-factor", "--resume", "--tuned-lens", "--log-to-wandb"):
        assert unused not in flags


@pytest.mark.parametrize("argv", [["--help"], *([c, "--help"] for c in ("train", "demo", "cache", "analyze", "eval",
                                                                          "explore", "compare", "train-lens", "pretrained"))])
def test_help_imports_neither_torch_nor_sae_lens(argv) -> None:
    """`python -m mlsae_lens --help` must be instant: torch and SAELens take seconds to import."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['mlsae-lens', *{argv!r}]\n"
        "try:\n    runpy.run_module('mlsae_lens', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'sae_lens', 'transformer_lens', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: mlsae-lens" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_importing_the_package_then_sae_lens_registers_the_architectures() -> None:
    """The registration follows SAELens' import instead of forcing it at `import mlsae_lens`."""
    code = (
        "import sys, mlsae_lens\n"
        "assert 'sae_lens' not in sys.modules\n"
        "from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY\n"
        "print('multilayer_topk' in SAE_CLASS_REGISTRY, 'multilayer_topk_layer' in SAE_CLASS_REGISTRY,"
        " 'multilayer_topk' in SAE_TRAINING_CLASS_REGISTRY, mlsae_lens.MultiLayerSAE.__name__)\n"
        "import importlib.resources, sae_lens\n"  # SAELens keeps its own loader (package data)
        "print(importlib.resources.files('sae_lens').joinpath('__init__.py').is_file(),"
        " type(sae_lens.__loader__).__module__ != 'mlsae_lens')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True", "MultiLayerSAE", "True", "True"]


def test_the_light_copies_of_defaults_and_choices_agree_with_their_modules() -> None:
    from mlsae_lens import cli_defaults
    from mlsae_lens.analysis.layer_stats import WEIGHTINGS
    from mlsae_lens.analysis_options import AnalysisOptions
    from mlsae_lens.analysis_prompt import DEFAULT_PROMPT
    from mlsae_lens.baselines import BASELINES
    from mlsae_lens.lens import LensTrainingConfig
    from mlsae_lens.normalization import NORMALIZATION_MODES as modes

    assert modes == NORMALIZATION_MODES
    assert tuple(BASELINES) == cli_defaults.EVAL_BASELINES
    assert tuple(WEIGHTINGS) == cli_defaults.ANALYZE_WEIGHTINGS
    assert DEFAULT_PROMPT == cli_defaults.ANALYZE_PROMPT
    for source, copy in ((AnalysisOptions(), cli_defaults.ANALYZE_DEFAULTS),
                         (LensTrainingConfig(), cli_defaults.LENS_DEFAULTS)):
        assert {name: getattr(source, name) for name in vars(copy)} == vars(copy)


def test_config_refuses_bad_values_from_python_too() -> None:
    with pytest.raises(MLSAEError, match="--adam-beta1 must be in"):
        MultiLayerRunnerConfig(adam_beta1=float("nan"))
    with pytest.raises(MLSAEError, match="--seed must be between 0 and"):
        MultiLayerRunnerConfig(seed=-1)


def test_a_port_in_use_is_one_line_and_keeps_the_page(trained_run, tiny_model, tiny_splits, tmp_path, capsys) -> None:  # noqa: F811
    """A real analysed run (the analysis tests' tiny one) and a real socket holding the port."""
    import shutil
    import socket

    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    analyze(run, tiny_model, tiny_splits, tokens=100, top_n=4)
    capsys.readouterr()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run_cli(["explore", str(run), "--serve", "--port", str(port)], capsys)
    assert code == 2
    assert err.startswith(f"mlsae-lens: error: cannot serve on 127.0.0.1:{port} (") and len(err.splitlines()) == 1
    assert err.endswith("pass another --port")
    assert (run / "explore.html").stat().st_size > 0


def test_a_run_config_naming_cuda_still_loads_where_there_is_no_cuda(monkeypatch) -> None:
    """analyze and eval read run.json of runs trained on a GPU; only a device torch cannot parse
    is refused there."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert MultiLayerRunnerConfig.from_dict({"device": "cuda:1"}).device == "cuda:1"
    with pytest.raises(MLSAEError, match="is not a device"):
        MultiLayerRunnerConfig.from_dict({"device": "tpu"})


def test_an_activation_cache_is_checked_before_the_model_loads(tmp_path, capsys, nothing_loads) -> None:  # noqa: ARG001
    from mlsae_lens.activation_cache import write_activation_cache
    from test_crash_resume import tiny_config
    from test_crash_resume import tiny_model as tiny_lm
    from test_crash_resume import tiny_splits as tiny_lm_splits

    code, err = run_cli(["train", "--activation-cache", str(tmp_path / "none"), "--output-dir", str(tmp_path / "r")],
                        capsys)
    assert code == 2 and "is not an activation cache (no manifest.json)" in err and len(err.splitlines()) == 1
    cache = write_activation_cache(tiny_config(tmp_path / "unused"), tmp_path / "cache", model=tiny_lm(),
                                   splits=tiny_lm_splits())
    code, err = run_cli(["train", "--activation-cache", str(cache), "--output-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert f"the activation cache {cache} does not match this run: model_name (cache: 'tiny'" in err
    assert not (tmp_path / "r").exists()
