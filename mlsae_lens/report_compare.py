"""``mlsae-lens compare``: several analysed runs side by side in one report.

Eq. 11/12 bars (paper Fig. 5) and overlaid residual-norm profiles, drawn from each run's
``metrics.json`` and ``stats.safetensors``; nothing is recomputed.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlsae_lens.analysis.residual import ResidualNormResult
from mlsae_lens.analysis_state import AnalysisStats
from mlsae_lens.errors import MLSAEError
from mlsae_lens.figures import adjacent_cosine_figure, residual_norm_figure, variance_ratio_figure
from mlsae_lens.report import ReportSection, write_report
from mlsae_lens.run_dir import METRICS_FILE, STATS_FILE
from mlsae_lens.run_files import check_run_dir, read_json


def compare_runs(run_dirs: Sequence[str | Path], output: str | Path) -> Path:
    """Eq. 11/12 bars (paper Fig. 5) and overlaid norm profiles of several analysed runs."""
    if not run_dirs:
        raise MLSAEError("compare needs at least one run directory")
    paths = [Path(p) for p in run_dirs]
    seen: dict[Path, Path] = {}
    for path in paths:  # one run under two spellings (run, ./run, a symlink) is one run
        first = seen.setdefault(path.resolve(), path)
        if first is not path:
            same = f"{first} twice" if str(first) == str(path) else f"one run twice ({first} and {path})"
            raise MLSAEError(f"compare was given {same}; pass each run directory once")
    labels = _labels(paths)
    ratios: dict[str, dict[str, Any]] = {}
    norms: dict[str, ResidualNormResult] = {}
    table: dict[str, Any] = {}
    for path, label in zip(paths, labels, strict=True):
        check_run_dir(path)
        metrics_file, stats_file = path / METRICS_FILE, path / STATS_FILE
        if not metrics_file.is_file() or not stats_file.is_file():
            raise MLSAEError(
                f"{path} has no analysis ({METRICS_FILE} + {STATS_FILE}); run "
                f"`mlsae-lens analyze {path}` first"
            )
        metrics = read_json(metrics_file)
        layer = metrics["layer_distribution"]
        ratios[label] = layer
        norms[label] = AnalysisStats.load(stats_file).resid.compute()
        sae = metrics["sae"]
        table[label] = (
            f"{metrics['model']['name']}, R={sae['expansion_factor']}, k={sae['k']}: "
            f"Eq. 11 {_fmt(layer['latent_ratio'])}, Eq. 12 {_fmt(layer['token_ratio'])} over "
            f"{layer['n_tokens']} tokens ({layer['weighting']})"
        )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    sections = [
        ReportSection(
            title="Variance ratios (Eqs. 11 and 12)",
            figures=[variance_ratio_figure(ratios)],
            table=table,
        ),
        ReportSection(
            title="Residual stream",
            figures=[residual_norm_figure(norms), adjacent_cosine_figure(norms)],
        ),
    ]
    return write_report(output, f"MLSAE comparison of {len(paths)} runs", sections)


def _labels(paths: Sequence[Path]) -> list[str]:
    """Directory names, or full paths where two names collide."""
    names = [p.name or str(p) for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]


def _fmt(x: float | None) -> str:
    return "undefined" if x is None else f"{x:.4f}"


__all__ = ["compare_runs"]
