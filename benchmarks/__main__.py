"""``python -m benchmarks [--quick|--smoke] [--json]``: measure, print, and (full run) write
``benchmarks/results.md`` and the scaling plot."""

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from benchmarks import analysis, harvest, train
from benchmarks.timing import interleaved_medians
from mlsae_lens.atomic import atomic_write_text
from mlsae_lens.dense_ops import has_native_bf16_matmul

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("benchmarks")


@dataclass
class Sizes:
    d_in: int = 576
    k: int = 32
    vectors: int = 4096
    ratios: tuple[int, ...] = (8, 64)
    train_repeats: int = 5
    saelens_repeats: int = 3
    embedded_model: bool = True
    harvest_batch: tuple[int, int] = (4, 256)
    harvest_model_shape: tuple[int, int] = (30, 576)
    analysis_tokens: int = 256
    analysis_layers: int = 30
    memory_tokens: tuple[int, int] = (10_000, 1_000_000)
    memory_subprocess: bool = True
    scaling_ratios: tuple[int, ...] = (8, 16, 32, 64)
    scaling_ks: tuple[int, ...] = (16, 32, 64, 128)
    scaling_repeats: int = 3
    default_adam: bool = True
    """Also time the step with torch's default (unfused, for-loop) Adam, as the runner uses now."""


FULL = Sizes()
QUICK = Sizes(vectors=2048, ratios=(8,), train_repeats=3, saelens_repeats=2, embedded_model=False,
              harvest_batch=(1, 32), analysis_tokens=32, memory_tokens=(10_000, 100_000),
              scaling_ratios=(), scaling_ks=(), default_adam=False)
GPU = replace(FULL, vectors=65_536, harvest_batch=(32, 256), analysis_tokens=4096, memory_subprocess=False)
"""A GPU needs bigger batches than a CPU core to be busy; ratios are taken at these sizes."""
SMOKE = Sizes(d_in=64, k=8, vectors=256, ratios=(8,), train_repeats=2, saelens_repeats=2, embedded_model=False,
              harvest_batch=(1, 16), harvest_model_shape=(2, 64), analysis_tokens=32, analysis_layers=4,
              memory_tokens=(2_000, 20_000), memory_subprocess=False, scaling_ratios=(), scaling_ks=(),
              default_adam=False)


def bench_train(s: Sizes, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Each comparison is its own interleaved group (a step against the floor, the variants against
    the floor, sparsify against the MLSAE, SAELens against the floor), so that only the steps being
    compared hold memory while they are timed (at R = 64 each MLSAE step holds ~1.3 GB)."""
    out = {}
    for r in s.ratios:
        d_sae = r * s.d_in
        args = (s.d_in, d_sae, s.k, s.vectors)

        def group(steps: dict, repeats: int = s.train_repeats) -> dict[str, float]:
            return interleaved_medians({name: make() for name, make in steps.items()}, repeats=repeats)

        floor = lambda: train.floor_step(*args, device=device)  # noqa: E731
        times = group({"mlsae": lambda: train.mlsae_step(*args, device=device), "floor": floor})
        variants = group({
            "floor": floor,
            "no_dead": lambda: train.mlsae_step(*args, dead_fraction=0.0, device=device),
            "1pct_dead": lambda: train.mlsae_step(*args, dead_fraction=0.01, device=device),
            "float32_auxk": lambda: train.mlsae_step(*args, device=device, auxk_dtype="float32"),
        })
        peer = None
        if train.sparsify_module() is not None:  # else skipped (see train.SPARSIFY_INSTALL)
            peer = group({"mlsae": lambda: train.mlsae_step(*args, device=device),
                          "sparsify": lambda: train.sparsify_step(*args, device=device)})
        times |= {f"{k}_saelens_group": v for k, v in group(
            {"saelens": lambda: train.saelens_step(*args, device=device), "floor": floor}, s.saelens_repeats).items()}
        default_adam = {"mlsae": float("nan"), "floor": 1.0}
        if s.default_adam:
            default_adam = group({"mlsae": lambda: train.mlsae_step(*args, fused_adam=False, device=device),
                                  "floor": floor}, max(2, s.train_repeats // 2))
        out[f"R{r}"] = {
            "d_sae": d_sae,
            "mlsae_s": times["mlsae"],
            "saelens_s": times["saelens_saelens_group"],
            "floor_s": times["floor"],
            "mlsae_vectors_per_s": s.vectors / times["mlsae"],
            "saelens_vectors_per_s": s.vectors / times["saelens_saelens_group"],
            "train_vs_saelens": times["saelens_saelens_group"] / times["mlsae"],
            "train_vs_floor": times["mlsae"] / times["floor"],
            "saelens_vs_floor": times["saelens_saelens_group"] / times["floor_saelens_group"],
            "train_vs_floor_default_adam": default_adam["mlsae"] / default_adam["floor"],
            "train_vs_floor_no_dead": variants["no_dead"] / variants["floor"],
            "train_vs_floor_1pct_dead": variants["1pct_dead"] / variants["floor"],
            "train_vs_floor_float32_auxk": variants["float32_auxk"] / variants["floor"],
            # None: sparsify is not installed (see train.SPARSIFY_INSTALL).
            "sparsify_s": peer["sparsify"] if peer else None,
            "train_vs_sparsify": peer["sparsify"] / peer["mlsae"] if peer else None,
        }
        logger.info("train R=%d: %s", r, out[f"R{r}"])
    return out


def bench_harvest(s: Sizes, device: str = "cpu") -> dict[str, object]:
    """Harvest / forward per backend (the default backend's numbers also at the top level)."""
    from mlsae_lens.models import DEFAULT_BACKEND

    models, which = harvest.load_benchmark_models(s.embedded_model, s.harvest_model_shape, device)
    tokens = s.harvest_batch[0] * s.harvest_batch[1]
    # Both backends in one interleaved measurement, so that load from other processes hits both.
    fns = {f"{backend}/{name}": fn for backend, model in models.items()
           for name, fn in harvest.harvest_pair(model, *s.harvest_batch).items()}
    all_times = interleaved_medians(fns, repeats=s.train_repeats)
    by_backend = {}
    for backend in models:
        times = {name.split("/")[1]: t for name, t in all_times.items() if name.startswith(f"{backend}/")}
        by_backend[backend] = {
            "harvest_s": times["harvest"],
            "forward_blocks_s": times["forward_blocks"],
            "forward_logits_s": times["forward_logits"],
            "harvest_vs_forward": times["harvest"] / times["forward_blocks"],
            "harvest_vs_forward_with_logits": times["harvest"] / times["forward_logits"],
        }
        logger.info("harvest %s: %s", backend, by_backend[backend])
    return {"model": which, "tokens": tokens, "backend": DEFAULT_BACKEND,
            **by_backend[DEFAULT_BACKEND], "by_backend": by_backend}


def bench_analysis(s: Sizes, device: str = "cpu") -> dict[str, object]:
    d_sae = 8 * s.d_in
    times = interleaved_medians(
        analysis.analysis_pair(s.d_in, d_sae, s.k, s.analysis_layers, s.analysis_tokens, device=device),
        repeats=s.train_repeats,
    )
    small, large = s.memory_tokens
    mem_args = dict(n_layers=4, d_sae=d_sae, k=8, batch=min(4096, small))
    on_cuda = device.startswith("cuda")
    if on_cuda:
        grow_small = analysis.accumulate_synthetic_cuda(small, **mem_args)["peak_growth_bytes"]
        grow_large = analysis.accumulate_synthetic_cuda(large, **mem_args)["peak_growth_bytes"]
    elif s.memory_subprocess:
        grow_small = analysis.memory_growth(small, **mem_args)
        grow_large = analysis.memory_growth(large, **mem_args)
    else:
        grow_small = analysis.accumulate_synthetic(small, use_maxrss=False, **mem_args)["peak_growth_bytes"]
        grow_large = analysis.accumulate_synthetic(large, use_maxrss=False, **mem_args)["peak_growth_bytes"]
    return {
        "tokens": s.analysis_tokens,
        "vectors": s.analysis_tokens * s.analysis_layers,
        "encode_s": times["encode"],
        "encode_and_update_s": times["encode_and_update"],
        "analysis_vs_encode": times["encode_and_update"] / times["encode"],
        "memory_tokens": [small, large],
        "memory_growth_bytes": [grow_small, grow_large],
        "analysis_memory_ratio": max(grow_large, 1) / max(grow_small, 1),
        "memory_setup": {**mem_args, "mode": "CUDA max_memory_allocated growth" if on_cuda else
                         "fresh process, kernel high-water mark" if s.memory_subprocess else "in-process RSS sampled per batch"},
    }


def bench_scaling(s: Sizes, device: str = "cpu") -> dict[str, list[dict[str, float]]]:
    rows: dict[str, list[dict[str, float]]] = {"d_sae": [], "k": []}
    for r in s.scaling_ratios:
        args = (s.d_in, r * s.d_in, s.k, s.vectors)
        t = interleaved_medians({"mlsae": train.mlsae_step(*args, device=device), "floor": train.floor_step(*args, device=device)},
                                repeats=s.scaling_repeats)
        rows["d_sae"].append({"R": r, "d_sae": r * s.d_in, "k": s.k, "step_s": t["mlsae"], "floor_s": t["floor"]})
        logger.info("scaling %s", rows["d_sae"][-1])
    for k in s.scaling_ks:
        args = (s.d_in, 8 * s.d_in, k, s.vectors)
        t = interleaved_medians({"mlsae": train.mlsae_step(*args, device=device), "floor": train.floor_step(*args, device=device)},
                                repeats=s.scaling_repeats)
        rows["k"].append({"R": 8, "d_sae": 8 * s.d_in, "k": k, "step_s": t["mlsae"], "floor_s": t["floor"]})
        logger.info("scaling %s", rows["k"][-1])
    return rows


def write_plot(rows: dict[str, list[dict[str, float]]], stem: Path) -> list[str]:
    """Step time and floor against d_sae and k: HTML always, PNG only if kaleido is installed."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("step time vs d_sae (k=32)", "step time vs k (R=8)"))
    for col, (key, x_name) in enumerate((("d_sae", "d_sae"), ("k", "k")), start=1):
        xs = [row[x_name] for row in rows[key]]
        fig.add_scatter(x=xs, y=[row["step_s"] for row in rows[key]], name="MLSAE train step", mode="lines+markers",
                        row=1, col=col, legendgroup="step", showlegend=col == 1, line_color="#1f77b4")
        fig.add_scatter(x=xs, y=[row["floor_s"] for row in rows[key]], name="floor: encoder matmul + top-k",
                        mode="lines+markers", row=1, col=col, legendgroup="floor", showlegend=col == 1,
                        line=dict(color="#7f7f7f", dash="dash"))
        fig.update_xaxes(title_text=x_name, type="log", row=1, col=col)
        fig.update_yaxes(title_text="seconds per step", type="log", row=1, col=col)
    fig.update_layout(title="MLSAE training step against its dense-encoder floor", width=1000, height=450)
    written = []
    html = stem.with_suffix(".html")
    atomic_write_text(html, fig.to_html(include_plotlyjs="cdn"))
    written.append(html.name)
    try:
        import kaleido  # noqa: F401

        fig.write_image(stem.with_suffix(".png"))
        written.append(stem.with_suffix(".png").name)
    except ImportError:
        logger.info("kaleido is not installed: no PNG")
    return written


def machine() -> dict[str, str]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), "?")
    except (OSError, subprocess.CalledProcessError):
        model = platform.processor() or "?"
    from importlib.metadata import version

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": model,
        "gpu": gpu,
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "native bf16 GEMMs (AVX512-BF16/AMX or CUDA)": "yes" if has_native_bf16_matmul(torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")) else "no",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sae_lens": version("sae-lens"),
        "transformer_lens": version("transformer-lens"),
    }


def summary(results: dict) -> dict[str, float]:
    first = results["train"][next(iter(results["train"]))]
    return {
        "train_vs_saelens": first["train_vs_saelens"],
        "train_vs_floor": first["train_vs_floor"],
        "train_vs_sparsify": first.get("train_vs_sparsify"),
        "harvest_vs_forward": results["harvest"]["harvest_vs_forward"],
        "analysis_vs_encode": results["analysis"]["analysis_vs_encode"],
        "analysis_memory_ratio": results["analysis"]["analysis_memory_ratio"],
    }


def refresh_train_rows(sizes: Sizes, device: str, output: Path, command: str) -> dict:
    """Measure the training step only (its rows and the scaling plot) and put it into the last
    full run's results (harvest and analysis are kept as they were measured then, which the
    results file says)."""
    from benchmarks.report import write_results

    previous = output.with_suffix(".json")
    if not previous.exists():
        raise SystemExit(f"--train-only: {previous} does not exist; run the full `python -m benchmarks` once first")
    results = json.loads(previous.read_text())
    results.pop("ratios", None)
    results["train"] = bench_train(sizes, device)
    stem = "scaling-cuda" if device.startswith("cuda") else "scaling"
    plots = []
    if sizes.scaling_ratios or sizes.scaling_ks:
        results["scaling"] = bench_scaling(sizes, device)
        plots = write_plot(results["scaling"], output.parent / stem)
    ratios = summary(results)
    command += f"` (training step and scaling, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; harvest and analysis from the previous full run: `python -m benchmarks"
    write_results(output, results, ratios, machine(), plots, command)
    atomic_write_text(previous, json.dumps({"ratios": ratios, **results}, indent=1, default=str))
    return {"ratios": ratios, **results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, under a minute on 2 cores; writes nothing")
    size.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite; writes nothing")
    parser.add_argument("--json", action="store_true", help="print one JSON object (the ratios) on stdout")
    parser.add_argument("--harvest-only", action="store_true", help="only the harvest benchmark (both model "
                        "backends, the embedded model unless --smoke); prints JSON, writes nothing")
    parser.add_argument("--train-only", action="store_true", help="only the training-step benchmarks; a full-size "
                        "run replaces the training and scaling rows of the results file and keeps its other sections")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: bigger batches, bf16 encoder matmul "
                        "as the runner uses there; default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None,
                        help="results file of the full run (default: benchmarks/results.md, or results-cuda.md on cuda)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO, format="%(message)s", stream=sys.stderr)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    sizes = SMOKE if args.smoke else QUICK if args.quick else GPU if device.startswith("cuda") else FULL
    output = args.output or HERE / ("results-cuda.md" if device.startswith("cuda") else "results.md")
    torch.manual_seed(0)
    if args.harvest_only:
        print(json.dumps(bench_harvest(replace(sizes, embedded_model=not args.smoke), device), indent=2))
        return 0
    if args.train_only:
        if args.quick or args.smoke:
            print(json.dumps(bench_train(sizes, device), indent=1))
        else:
            out = refresh_train_rows(sizes, device, output, " ".join(["python -m benchmarks", *(argv or sys.argv[1:])]))
            print(json.dumps(out["ratios"] if args.json else out, indent=1, default=str))
        return 0
    results = {
        "device": device,
        "train": bench_train(sizes, device),
        "harvest": bench_harvest(sizes, device),
        "analysis": bench_analysis(sizes, device),
        "sizes": asdict(sizes),
    }
    if sizes.scaling_ratios or sizes.scaling_ks:
        results["scaling"] = bench_scaling(sizes, device)
    ratios = summary(results)
    if not (args.quick or args.smoke):
        from benchmarks.report import write_results

        stem = "scaling-cuda" if device.startswith("cuda") else "scaling"
        plots = write_plot(results["scaling"], output.parent / stem) if "scaling" in results else []
        write_results(output, results, ratios, machine(), plots, " ".join(["python -m benchmarks", *(argv or sys.argv[1:])]))
        atomic_write_text(output.with_suffix(".json"), json.dumps({"ratios": ratios, **results}, indent=1, default=str))
    if args.json:
        print(json.dumps(ratios))
    else:
        print(json.dumps({"ratios": ratios, **results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
