"""The ``mlsae-lens`` command line (also ``python -m mlsae_lens``).

Flags of ``train`` and ``demo`` are generated from :class:`MultiLayerRunnerConfig`, so every
field's help text and default show up in ``--help``. Problems a user can fix end in one
line on stderr and exit code 2; nothing else is printed.
"""

import argparse
import dataclasses
import logging
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from mlsae_lens.config import MultiLayerRunnerConfig
from mlsae_lens.errors import MLSAEError

logger = logging.getLogger("mlsae_lens")

DEMO_DEFAULTS = {"training_tokens": 40_000, "output_dir": None, "lr": 1e-3}


def add_config_flags(parser: argparse.ArgumentParser, overrides: dict[str, Any] | None = None) -> None:
    """One ``--flag`` per config field, typed from its annotation."""
    overrides = overrides or {}
    hints = typing.get_type_hints(MultiLayerRunnerConfig)
    for f in dataclasses.fields(MultiLayerRunnerConfig):
        flag = "--" + f.name.replace("_", "-")
        default = overrides.get(f.name, f.default)
        kind = hints[f.name]
        help_text = f.metadata.get("help", "") + " (default: %(default)s)"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        args = typing.get_args(kind)
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in args if a is not type(None))
            args = typing.get_args(kind)
        if typing.get_origin(kind) is Literal:
            parser.add_argument(flag, choices=list(args), default=default, help=help_text)
        else:
            parser.add_argument(flag, type=int_with_underscores if kind is int else kind, default=default,
                                help=help_text, metavar=f.name.upper())


def int_with_underscores(text: str) -> int:
    """Accept ``10_000_000`` and ``1e6`` as well as ``1000``."""
    try:
        return int(text.replace("_", ""))
    except ValueError:
        value = float(text)
        if not value.is_integer():
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        return int(value)


def config_from_args(args: argparse.Namespace) -> MultiLayerRunnerConfig:
    names = {f.name for f in dataclasses.fields(MultiLayerRunnerConfig)}
    return MultiLayerRunnerConfig(**{k: v for k, v in vars(args).items() if k in names})


def cmd_train(args: argparse.Namespace) -> None:
    from mlsae_lens.training import MultiLayerSAETrainingRunner

    cfg = config_from_args(args)
    runner = MultiLayerSAETrainingRunner(cfg)
    runner.run()
    logger.info("saved the MLSAE to %s (load it with sae_lens.SAE.load_from_disk)", runner.out)


def cmd_demo(args: argparse.Namespace) -> None:
    from mlsae_lens.pipeline import run_demo

    if args.output_dir is None:
        args.output_dir = f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    report = run_demo(config_from_args(args), eval_tokens=args.eval_tokens)
    print(f"report: {report}")


def cmd_analyze(args: argparse.Namespace) -> None:
    from mlsae_lens.analyze import AnalysisOptions, analyze_run
    from mlsae_lens.training import resolve_device

    options = AnalysisOptions(
        tokens=args.tokens,
        prompt=args.prompt,
        batch_size=args.batch_size,
        weighting=args.weighting,
        centered_tokens=args.centered_tokens,
        save_every_tokens=args.save_every_tokens,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    analyze_run(Path(args.run_dir), options, device=resolve_device(args.device))
    print(f"report: {Path(args.run_dir) / 'report.html'}")


def cmd_compare(args: argparse.Namespace) -> None:
    from mlsae_lens.analyze import compare_runs

    print(f"report: {compare_runs(args.runs, args.output)}")


def add_analyze_parsers(sub: Any) -> None:
    from mlsae_lens.analysis.layer_stats import WEIGHTINGS
    from mlsae_lens.analyze import DEFAULT_PROMPT, AnalysisOptions

    defaults = AnalysisOptions()
    analyze = sub.add_parser(
        "analyze", help="latent distributions over layers and residual-stream norms on the test split",
        description="Stream a run's held-out test split through the model and its MLSAE: P(L|J), the "
        "Eq. 11/12 variance ratios, residual norms and adjacent-layer cosines (raw and centered; the "
        "centered pass re-reads the same tokens), a single-prompt heatmap. Writes stats.safetensors "
        "(saved periodically; --resume continues), metrics.json and report.html into RUN_DIR.")
    analyze.add_argument("run_dir", metavar="RUN_DIR", help="a training run's --output-dir")
    analyze.add_argument("--tokens", type=int_with_underscores, default=defaults.tokens,
                         help="valid test tokens to analyse, capped at the test split (default: %(default)s)")
    analyze.add_argument("--prompt", default=DEFAULT_PROMPT,
                         help="prompt of the single-prompt heatmap (default: %(default)r)")
    analyze.add_argument("--batch-size", type=int_with_underscores, default=None,
                         help="contexts per model forward pass (default: the run's --model-batch-size)")
    analyze.add_argument("--weighting", choices=list(WEIGHTINGS), default=defaults.weighting,
                         help="P(T|J): uniform over active tokens (the paper) or by activation mass "
                         "(the reference heatmaps) (default: %(default)s)")
    analyze.add_argument("--centered-tokens", type=int_with_underscores, default=None,
                         help="tokens of the centered second pass (default: all of the first pass)")
    analyze.add_argument("--save-every-tokens", type=int_with_underscores, default=defaults.save_every_tokens,
                         help="save stats.safetensors every N tokens (default: %(default)s)")
    analyze.add_argument("--resume", action="store_true", help="continue a partial analysis in RUN_DIR")
    analyze.add_argument("--overwrite", action="store_true", help="discard a partial analysis and start over")
    analyze.add_argument("--device", default="auto", help="cpu, cuda, or auto (default: %(default)s)")
    analyze.set_defaults(func=cmd_analyze)

    compare = sub.add_parser(
        "compare", help="Eq. 11/12 bars and norm profiles of several analysed runs",
        description="Draw the variance ratios (paper Fig. 5) and residual norm profiles of runs that "
        "`mlsae-lens analyze` has processed into one HTML file.")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="analysed run directories")
    compare.add_argument("--output", required=True, metavar="FILE.html", help="where to write the HTML")
    compare.set_defaults(func=cmd_compare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlsae-lens",
        description="Train and analyse Multi-Layer SAEs on every layer of a TransformerLens model.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train an MLSAE on every layer's residual stream",
                           description="Train an MLSAE; writes cfg.json + sae_weights.safetensors (SAELens format), "
                           "checkpoints and training_log.json into --output-dir.")
    add_config_flags(train)
    train.set_defaults(func=cmd_train)

    demo = sub.add_parser("demo", help="train a small MLSAE on the embedded model and corpus, evaluate it, write the report",
                          description="End to end on the embedded model (offline): train, evaluate on the held-out "
                          "split against a rank-k PCA floor, and write report.html.")
    add_config_flags(demo, DEMO_DEFAULTS)
    demo.add_argument("--eval-tokens", type=int_with_underscores, default=2048,
                      help="held-out tokens for the evaluation and the analysis (default: %(default)s)")
    demo.set_defaults(func=cmd_demo)
    add_analyze_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except MLSAEError as exc:
        print(f"mlsae-lens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlsae-lens: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
