"""The ``mlsae-lens`` command line (also ``python -m mlsae_lens``).

Flags of ``train`` and ``demo`` are generated from :class:`MultiLayerRunnerConfig`, so every
field's help text and default show up in ``--help``. Problems a user can fix end in one
line on stderr and exit code 2; nothing else is printed. Every flag is checked before a model
or corpus loads: config fields in ``MultiLayerRunnerConfig.__post_init__``, the other
subcommands' flags by the argparse ``type=`` functions below.

Building the parser imports nothing heavy (no torch, no SAELens): ``mlsae-lens --help`` is
instant, and only the chosen subcommand's parser is built in full (its defaults may come from
modules that import torch).
"""

import argparse
import dataclasses
import logging
import math
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from mlsae_lens.cli_defaults import (
    ANALYZE_DEFAULTS,
    ANALYZE_PROMPT,
    ANALYZE_WEIGHTINGS,
    CACHE_FIELDS,
    COMMAND_HELP,
    DEMO_DEFAULTS,
    EVAL_BASELINES,
    LENS_DEFAULTS,
)
from mlsae_lens.config import MultiLayerRunnerConfig
from mlsae_lens.errors import MLSAEError
from mlsae_lens.flags import (
    ArgumentParser,
    bounded_float,
    bounded_int,
    check_run_before_loading,
    device_flag,
    html_file,
    int_with_underscores,
    layer_list,
    nonempty_path,
    nonempty_text,
    nonnegative_int,
    output_flags,
    port_number,
    positive_int,
)

logger = logging.getLogger("mlsae_lens")

def add_config_flags(parser: argparse.ArgumentParser, overrides: dict[str, Any] | None = None,
                     only: Sequence[str] | None = None) -> None:
    """One ``--flag`` per config field (or per field in ``only``), typed from its annotation;
    ranges are checked by the config itself, before anything loads."""
    overrides = overrides or {}
    hints = typing.get_type_hints(MultiLayerRunnerConfig)
    for f in dataclasses.fields(MultiLayerRunnerConfig):
        if only is not None and f.name not in only:
            continue
        flags = output_flags(f.name) if f.name == "output_dir" else ("--" + f.name.replace("_", "-"),)
        default = overrides.get(f.name, f.default)
        kind = hints[f.name]
        help_text = f.metadata.get("help", "")
        if "default" not in help_text:  # some fields say what their default means themselves
            help_text += " (default: %(default)s)"
        if f.name == "output_dir":
            help_text += "; --output is the same flag"
        if kind is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        args = typing.get_args(kind)
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in args if a is not type(None))
            args = typing.get_args(kind)
        if typing.get_origin(kind) is Literal:
            parser.add_argument(*flags, choices=list(args), default=default, help=help_text)
        else:
            parser.add_argument(*flags, type=int_with_underscores if kind is int else kind, default=default,
                                help=help_text, metavar=f.name.upper())


def config_from_args(args: argparse.Namespace) -> MultiLayerRunnerConfig:
    """The run config of train/demo/cache, checked as far as it can be before anything loads."""
    names = {f.name for f in dataclasses.fields(MultiLayerRunnerConfig)}
    cfg = MultiLayerRunnerConfig(**{k: v for k, v in vars(args).items() if k in names})
    check_run_before_loading(cfg)
    return cfg


def cmd_train(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)
    from mlsae_lens.run_training import TrainingRun

    run = TrainingRun(cfg)
    run.run()
    logger.info("saved the MLSAE to %s (load it with sae_lens.SAE.load_from_disk)", run.out)


def cmd_cache(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)
    from mlsae_lens.activation_cache import write_activation_cache

    path = write_activation_cache(cfg, Path(args.output), contexts_per_shard=args.contexts_per_shard)
    print(f"activation cache: {path} (train with --activation-cache {path})")


def add_cache_parser(sub: Any) -> None:
    cache = sub.add_parser(
        "cache", help=COMMAND_HELP["cache"],
        description="Run the model once over the training contexts a run of --training-tokens reads (in "
        "the order it reads them, with the same --contexts-per-chunk, --batch-size-tokens and --seed) and "
        "write their raw hook_resid_post activations (valid tokens) as sharded safetensors with a "
        "manifest.json (checksums, model and corpus settings). The size (n_layers x d_model x 4 bytes per "
        "token) is logged first and a disk without that room is refused. `train --activation-cache DIR` "
        "with the same model and corpus flags and at most that many tokens reads them instead of running "
        "the model.")
    add_config_flags(cache, only=CACHE_FIELDS)
    cache.add_argument(*output_flags("output"), dest="output", required=True, metavar="DIR", type=nonempty_path,
                       help="the cache directory to write")
    cache.add_argument("--contexts-per-shard", type=positive_int, default=256,
                       help="contexts per safetensors shard (default: %(default)s)")
    cache.set_defaults(func=cmd_cache)


def cmd_demo(args: argparse.Namespace) -> None:
    if args.output_dir is None:
        args.output_dir = f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = config_from_args(args)
    from mlsae_lens.pipeline import run_demo

    report = run_demo(cfg, eval_tokens=args.eval_tokens)
    print(f"report: {report}")


def cmd_analyze(args: argparse.Namespace) -> None:
    from mlsae_lens.analysis_options import AnalysisOptions
    from mlsae_lens.analyze import analyze_run
    from mlsae_lens.sources import resolve_device

    options = AnalysisOptions(
        tokens=args.tokens,
        prompt=args.prompt,
        batch_size=args.batch_size,
        weighting=args.weighting,
        centered_tokens=args.centered_tokens,
        save_every_tokens=args.save_every_tokens,
        resume=args.resume,
        overwrite=args.overwrite,
        top_contexts=args.top_contexts,
        top_n=args.top_n,
        skip_first_position=args.skip_first_position,
    )
    analyze_run(Path(args.run_dir), options, device=resolve_device(args.device))
    print(f"report: {Path(args.run_dir) / 'report.html'}")


def cmd_compare(args: argparse.Namespace) -> None:
    from mlsae_lens.report_compare import compare_runs

    print(f"report: {compare_runs(args.runs, args.output)}")


def add_compare_parser(sub: Any) -> None:
    compare = sub.add_parser(
        "compare", help=COMMAND_HELP["compare"],
        description="Draw the variance ratios (paper Fig. 5) and residual norm profiles of runs that "
        "`mlsae-lens analyze` has processed into one HTML file.")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="analysed run directories")
    compare.add_argument(*output_flags("output"), dest="output", required=True, metavar="FILE.html", type=html_file,
                         help="where to write the HTML (--output-dir is the same flag)")
    compare.set_defaults(func=cmd_compare)


def cmd_eval(args: argparse.Namespace) -> None:
    from mlsae_lens.eval_run import EvalOptions, evaluate_run
    from mlsae_lens.report_eval import comparison_table, format_table
    from mlsae_lens.sources import resolve_device

    options = EvalOptions(
        tokens=args.tokens,
        downstream_tokens=args.downstream_tokens,
        baselines=tuple(dict.fromkeys(args.baseline or [])),
        layers=args.layers,
        batch_size=args.batch_size,
        baseline_training_tokens=args.baseline_training_tokens,
        retrain_baselines=args.retrain_baselines,
    )
    data = evaluate_run(Path(args.run_dir), options, device=resolve_device(args.device))
    print(format_table(comparison_table(data)))
    print(f"eval: {Path(args.run_dir) / 'eval.json'}\nreport: {Path(args.run_dir) / 'report.html'}")


def add_eval_parser(sub: Any) -> None:
    ev = sub.add_parser(
        "eval", help=COMMAND_HELP["eval"],
        description="Evaluate a run on its held-out test split, layer by layer: FVU, MSE, L0, L1, dead "
        "fraction, firing-frequency histogram, and the next-token CE increase / KL(clean || spliced) / "
        "loss recovered when each layer's reconstruction is spliced into hook_resid_post. Baselines on "
        "the same tokens: rank-k PCA per layer (pca) and one SAELens TopK SAE per layer trained like the "
        "MLSAE (saelens-per-layer; saved under RUN_DIR/baselines/). Writes eval.json and report.html.")
    ev.add_argument("run_dir", metavar="RUN_DIR", help="a training run's --output-dir")
    ev.add_argument("--tokens", type=positive_int, default=4096,
                    help="valid test tokens for the reconstruction metrics (default: %(default)s)")
    ev.add_argument("--downstream-tokens", type=nonnegative_int, default=1024,
                    help="valid test tokens for the spliced CE/KL metrics, capped at --tokens; 0 skips "
                    "them (default: %(default)s)")
    ev.add_argument("--baseline", action="append", choices=list(EVAL_BASELINES),
                    help="add a baseline (repeatable): pca, saelens-per-layer")
    ev.add_argument("--layers", type=layer_list, default="all",
                    help="'all' or distinct layer indices like 0,5,10 (default: %(default)s)")
    ev.add_argument("--batch-size", type=positive_int, default=None,
                    help="contexts per model forward pass: memory and speed only (default: sized from the "
                    "free memory, logged and recorded in the output)")
    ev.add_argument("--baseline-training-tokens", type=positive_int, default=None,
                    help="training tokens per per-layer SAE (default: the MLSAE's --training-tokens)")
    ev.add_argument("--retrain-baselines", action="store_true",
                    help="train the per-layer SAEs again even if RUN_DIR holds matching ones")
    ev.add_argument("--device", type=device_flag, default="auto", help="cpu, cuda, or auto (default: %(default)s)")
    ev.set_defaults(func=cmd_eval)


def cmd_train_lens(args: argparse.Namespace) -> None:
    from mlsae_lens.data import load_token_splits
    from mlsae_lens.lens import LensTrainingConfig, format_lens_eval, train_lens_for_run
    from mlsae_lens.models import load_model
    from mlsae_lens.sources import resolve_device

    cfg = LensTrainingConfig(
        steps=args.steps, tokens_per_step=args.tokens_per_step, pool_tokens=args.pool_tokens,
        eval_tokens=args.eval_tokens, lr_scale=args.lr_scale, momentum=args.momentum,
        weight_decay=args.weight_decay, model_batch_size=args.model_batch_size, seed=args.seed,
    )
    model = load_model(args.model, device=resolve_device(args.device), backend=args.model_backend)
    splits = load_token_splits(
        args.dataset, tokenizer=model.tokenizer, context_size=args.context_size,
        test_fraction=args.test_fraction, max_tokens=args.max_corpus_tokens, seed=args.seed,
        text_column=args.text_column,
    )
    output = args.output or f"runs/lens-{Path(args.model).name}"
    _, rows = train_lens_for_run(model, splits, output, cfg, overwrite=args.overwrite)
    print(format_lens_eval(rows))
    print(f"lens: {output} (use it with mlsae-lens train --tuned-lens {output})")


def add_train_lens_parser(sub: Any) -> None:
    defaults, run = LENS_DEFAULTS, MultiLayerRunnerConfig()
    # train-lens' own flags are range-checked here; LensTrainingConfig checks them again for Python callers.
    tl = sub.add_parser(
        "train-lens", help=COMMAND_HELP["train-lens"],
        description="Train a tuned lens on the corpus' train split: tuned-lens' TunedLens module, "
        "KL(final logits || lens logits) per layer, SGD with Nesterov momentum, linear decay, grad "
        "clipping. Each step samples --tokens-per-step positions from --pool-tokens harvested "
        "train tokens. Writes params.pt + config.json (tuned-lens' format, readable by "
        "TunedLens.from_model_and_pretrained) and lens_eval.json (test-split KL per layer, tuned vs "
        "logit lens) into --output.")
    tl.add_argument("model", nargs="?", default=run.model_name, metavar="MODEL",
                    help="model name, as for train (default: %(default)s)")
    tl.add_argument(*output_flags("output"), dest="output", default=None, metavar="DIR", type=nonempty_path,
                    help="lens directory; --output-dir is the same flag (default: runs/lens-MODEL)")
    tl.add_argument("--overwrite", action="store_true", help="replace a lens already in --output")
    lens_flags = {
        "steps": (positive_int, "SGD steps"),
        "tokens_per_step": (positive_int, "token positions sampled from the pool per step"),
        "pool_tokens": (positive_int, "train-split tokens whose hidden states are harvested once and "
                        "sampled from"),
        "eval_tokens": (positive_int, "test-split tokens of the KL evaluation (lens_eval.json)"),
        "lr_scale": (bounded_float(0, math.inf, low_open=True, high_open=True),
                     "SGD learning rate = lr_scale * (1 - momentum), as tuned-lens"),
        "momentum": (bounded_float(0, 1, high_open=True), "Nesterov momentum"),
        "weight_decay": (bounded_float(0, math.inf, high_open=True), "SGD weight decay"),
        "model_batch_size": (positive_int, "contexts per model forward of the harvest"),
        "seed": (bounded_int(0, 2**32 - 1), "random seed (split, pool sample, step order)"),
    }
    for name, (kind, text) in lens_flags.items():
        tl.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name),
                        help=text + (" (default: auto, sized from the free memory)" if name == "model_batch_size"
                                     else " (default: %(default)s)"))
    corpus_types = {"context_size": bounded_int(2), "max_corpus_tokens": positive_int,
                    "test_fraction": bounded_float(0, 1, low_open=True, high_open=True)}
    for name in ("dataset", "text_column", "context_size", "test_fraction", "max_corpus_tokens"):
        f = next(f for f in dataclasses.fields(MultiLayerRunnerConfig) if f.name == name)
        help_text = f.metadata["help"] + ("" if "default" in f.metadata["help"] else " (default: %(default)s)")
        tl.add_argument("--" + name.replace("_", "-"), type=corpus_types.get(name, str), default=f.default,
                        help=help_text)
    tl.add_argument("--model-backend", choices=["bridge", "hooked"], default=run.model_backend,
                    help="as for train (default: %(default)s)")
    tl.add_argument("--device", type=device_flag, default="auto", help="cpu, cuda, or auto (default: %(default)s)")
    tl.set_defaults(func=cmd_train_lens)


def cmd_pretrained_list(args: argparse.Namespace) -> None:  # noqa: ARG001
    from mlsae_lens.releases import format_registry_table

    print(format_registry_table())
    print("\nEvery SAE id X is also available as X-tfm (the training module, with the lens of -lens SAEs).")


def cmd_pretrained_convert(args: argparse.Namespace) -> None:
    from mlsae_lens.pretrained import convert_to_run

    overrides = {name: getattr(args, name) for name in ("dataset", "text_column", "context_size")
                 if getattr(args, name) is not None}
    out = convert_to_run(args.release, args.sae_id, args.output, local_dir=args.local_dir, lens=args.lens,
                         overwrite=args.overwrite, run_overrides=overrides)
    print(f"run directory: {out} (next: mlsae-lens analyze {out})")


def add_pretrained_parser(sub: Any) -> None:
    pretrained = sub.add_parser(
        "pretrained", help=COMMAND_HELP["pretrained"],
        description="The release registry (mlsae_lens/pretrained_saes.yaml): the paper's published "
        "MLSAEs tim-lawson/mlsae-<model>-x<R>-k<k>[-lens][-tfm]. `list` prints it; `convert` turns "
        "one into a run directory that analyze, eval and explore read.")
    actions = pretrained.add_subparsers(dest="pretrained_command", required=True, metavar="ACTION")
    actions.add_parser("list", help="print the registry: release, SAE ids, hub repository, model, layers, lens",
                       description="Print every registered release and SAE id as a table."
                       ).set_defaults(func=cmd_pretrained_list)
    convert = actions.add_parser(
        "convert", help="convert a published MLSAE into an mlsae-lens run directory",
        description="Download (or read from --local-dir) a published checkpoint, convert it exactly, and "
        "write cfg.json + sae_weights.safetensors + run.json into --output. -lens SAEs map tuned-lens "
        "translator l to blocks.{l}.hook_resid_post, as the checkpoints were trained (one block off "
        "tuned-lens' own convention).")
    convert.add_argument("release", metavar="RELEASE", help="a release of `mlsae-lens pretrained list`")
    convert.add_argument("sae_id", metavar="SAE_ID", help="one of the release's SAE ids, e.g. x64-k32")
    convert.add_argument(*output_flags("output"), dest="output", required=True, metavar="DIR", type=nonempty_path,
                         help="the run directory to write (--output-dir is the same flag)")
    convert.add_argument("--local-dir", default=None, metavar="PATH",
                         help="already-downloaded config.json + model.safetensors (default: the hub)")
    convert.add_argument("--lens", default=None, metavar="PATH",
                         help="tuned lens of a -lens SAE: a tuned-lens directory (params.pt + config.json) "
                         "or a .safetensors file (default: the -tfm checkpoint's own, else tuned-lens' "
                         "pretrained lens from the hub)")
    convert.add_argument("--overwrite", action="store_true", help="replace a run already in --output")
    for name in ("dataset", "text_column", "context_size"):
        f = next(f for f in dataclasses.fields(MultiLayerRunnerConfig) if f.name == name)
        convert.add_argument("--" + name.replace("_", "-"), default=None,
                             type=bounded_int(2) if name == "context_size" else str,
                             help=f"{f.metadata['help'].split(' (default')[0]}, for analyze and eval (default: {f.default})")
    convert.set_defaults(func=cmd_pretrained_convert)


def cmd_explore(args: argparse.Namespace) -> None:
    from mlsae_lens.explorer import explore_run
    from mlsae_lens.explorer_serve import serve

    path = explore_run(Path(args.run_dir), args.output, args.max_latents, args.contexts_per_layer)
    print(f"explorer: {path}")
    if args.serve:
        serve(path, args.port)


def add_analyze_parser(sub: Any) -> None:
    defaults = ANALYZE_DEFAULTS
    analyze = sub.add_parser(
        "analyze", help=COMMAND_HELP["analyze"],
        description="Stream a run's held-out test split through the model and its MLSAE: P(L|J), the "
        "Eq. 11/12 variance ratios, residual norms and adjacent-layer cosines (raw and centered; the "
        "centered pass re-reads the same tokens), a single-prompt heatmap. Writes stats.safetensors "
        "(saved periodically; --resume continues), metrics.json and report.html into RUN_DIR.")
    analyze.add_argument("run_dir", metavar="RUN_DIR", help="a training run's --output-dir")
    analyze.add_argument("--tokens", type=positive_int, default=defaults.tokens,
                         help="valid test tokens to analyse, capped at the test split (default: %(default)s)")
    analyze.add_argument("--prompt", default=ANALYZE_PROMPT, type=nonempty_text,
                         help="prompt of the single-prompt heatmap (default: %(default)r)")
    analyze.add_argument("--batch-size", type=positive_int, default=None,
                         help="contexts per model forward pass: memory and speed only (default: sized "
                         "from the free memory, logged and recorded in the output)")
    analyze.add_argument("--weighting", choices=list(ANALYZE_WEIGHTINGS), default=defaults.weighting,
                         help="P(T|J): uniform over active tokens (the paper) or by activation mass "
                         "(the reference heatmaps) (default: %(default)s)")
    analyze.add_argument("--centered-tokens", type=positive_int, default=None,
                         help="tokens of the centered second pass (default: all of the first pass)")
    analyze.add_argument("--save-every-tokens", type=positive_int, default=defaults.save_every_tokens,
                         help="save stats.safetensors every N tokens (default: %(default)s)")
    analyze.add_argument("--resume", action="store_true", help="continue a partial analysis in RUN_DIR")
    analyze.add_argument("--overwrite", action="store_true", help="discard a partial analysis and start over")
    analyze.add_argument("--skip-first-position", action="store_true",
                         help="leave each context's first position out of the residual norms, layer "
                         "means and cosines (an outlier in packed contexts without BOS)")
    analyze.add_argument("--top-contexts", action=argparse.BooleanOptionalAction, default=None,
                         help="collect every latent's top tokens per layer for `mlsae-lens explore` "
                         "(top_contexts.safetensors) (default: on when --tokens <= 1M)")
    analyze.add_argument("--top-n", type=positive_int, default=defaults.top_n,
                         help="tokens kept per latent and layer by --top-contexts (default: %(default)s)")
    analyze.add_argument("--device", type=device_flag, default="auto",
                         help="cpu, cuda, or auto (default: %(default)s)")
    analyze.set_defaults(func=cmd_analyze)


def add_explore_parser(sub: Any) -> None:
    explore = sub.add_parser(
        "explore", help=COMMAND_HELP["explore"],
        description="Write a self-contained HTML explorer of an analysed run (needs the "
        "top_contexts.safetensors of `mlsae-lens analyze`): every active latent, sortable and "
        "filterable by peak layer, E[L|J], Var(L|J) and density, each with P(L|J), an activation "
        "histogram, top contexts and quantile samples per layer, logit effects through the final "
        "norm and co-appearing latents. Opens from a file:// URL with no network.")
    explore.add_argument("run_dir", metavar="RUN_DIR", help="an analysed run directory")
    explore.add_argument(*output_flags("output"), dest="output", default=None, metavar="FILE.html", type=html_file,
                         help="where to write the page; --output-dir is the same flag (default: RUN_DIR/explore.html)")
    explore.add_argument("--max-latents", type=positive_int, default=None,
                         help="cards for at most this many latents, the most frequently active "
                         "(default: every active latent)")
    explore.add_argument("--contexts-per-layer", type=positive_int, default=8,
                         help="top contexts per layer on the page (default: %(default)s)")
    explore.add_argument("--serve", action="store_true",
                         help="then serve the page on http://127.0.0.1:PORT/ until Ctrl-C")
    explore.add_argument("--port", type=port_number, default=8000, help="port of --serve, 1-65535 (default: %(default)s)")
    explore.set_defaults(func=cmd_explore)


def add_train_parser(sub: Any) -> None:
    train = sub.add_parser("train", help=COMMAND_HELP["train"],
                           description="Train an MLSAE; writes cfg.json + sae_weights.safetensors (SAELens format), "
                           "checkpoints and training_log.json into --output-dir.")
    add_config_flags(train)
    train.set_defaults(func=cmd_train)


def add_demo_parser(sub: Any) -> None:
    demo = sub.add_parser("demo", help=COMMAND_HELP["demo"],
                          description="End to end on the embedded model (offline): train, evaluate on the held-out "
                          "split against a rank-k PCA floor, and write report.html.")
    add_config_flags(demo, DEMO_DEFAULTS)
    demo.add_argument("--eval-tokens", type=positive_int, default=2048,
                      help="held-out tokens for the evaluation and the analysis (default: %(default)s)")
    demo.set_defaults(func=cmd_demo)


SUBCOMMANDS: dict[str, Callable[[Any], None]] = {
    "train": add_train_parser, "demo": add_demo_parser, "analyze": add_analyze_parser,
    "compare": add_compare_parser, "explore": add_explore_parser, "eval": add_eval_parser,
    "cache": add_cache_parser, "train-lens": add_train_lens_parser, "pretrained": add_pretrained_parser,
}


def build_parser(command: str | None = None) -> ArgumentParser:
    """The whole parser, or (``command`` given) only that subcommand's in full and the others
    as one help line each: some subcommands' defaults import torch, ``--help`` should not."""
    parser = ArgumentParser(
        prog="mlsae-lens",
        description="Train and analyse Multi-Layer SAEs on every layer of a TransformerLens model. "
        "Every output flag may be spelled --output or --output-dir.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, add_parser in SUBCOMMANDS.items():
        if command in (None, name):
            add_parser(sub)
        else:
            sub.add_parser(name, help=COMMAND_HELP[name])
    return parser


def chosen_command(argv: Sequence[str]) -> str:
    """The subcommand of ``argv`` (top-level flags take no values), or '' when none is known."""
    first = next((arg for arg in argv if not arg.startswith("-")), "")
    return first if first in SUBCOMMANDS else ""


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(chosen_command(argv)).parse_args(argv)
    except SystemExit as exc:  # --help, or argparse's one-line error: returned like every other outcome
        return int(exc.code or 0)
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
