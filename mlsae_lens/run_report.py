"""``report.html`` of a run, drawn from the files the run directory holds.

One report for the demo, ``eval`` and ``analyze``: a section per step whose files are present
(the run's configuration, its training log, ``eval.json``, ``metrics.json`` +
``stats.safetensors``), so any step can redraw it and none needs the model.
"""

from pathlib import Path
from typing import Any

from mlsae_lens.analysis_state import AnalysisStats
from mlsae_lens.figures import training_curve_figure
from mlsae_lens.report import ReportSection, table_html, write_report
from mlsae_lens.report_analysis import analysis_sections
from mlsae_lens.report_eval import evaluation_section, reconstruction_section_from_eval
from mlsae_lens.run_dir import (
    CFG_FILE,
    EVAL_FILE,
    METRICS_FILE,
    REPORT_FILE,
    RUN_FILE,
    SPLITS_FILE,
    STATS_FILE,
    TRAINING_LOG_FILE,
)
from mlsae_lens.run_files import check_run_dir, read_json


def build_run_report(run_dir: str | Path) -> Path:
    """Draw ``report.html`` from what ``run_dir`` holds: run config, training log,
    evaluation (``eval.json``) and analysis (``metrics.json`` + ``stats.safetensors``).

    Sections whose files are absent are left out, so the demo and ``analyze`` share one report.
    """
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    cfg = read_json(run_dir / RUN_FILE)
    sections = [_run_section(run_dir, cfg)]
    log_file = run_dir / TRAINING_LOG_FILE
    if log_file.is_file() and (log := read_json(log_file)):
        sections.append(ReportSection(title="Training", figures=[training_curve_figure(log)]))
    if (run_dir / EVAL_FILE).is_file():
        k = cfg.get("k", "k")  # names the PCA floor's rank
        eval_data = read_json(run_dir / EVAL_FILE)
        sections.append(reconstruction_section_from_eval(eval_data, k))
        if eval_data.get("methods"):
            sections.append(evaluation_section(eval_data))
    if (run_dir / METRICS_FILE).is_file():
        metrics = read_json(run_dir / METRICS_FILE)
        stats_path = run_dir / STATS_FILE
        stats = AnalysisStats.load(stats_path) if stats_path.is_file() else None
        sections += analysis_sections(metrics, stats)
    title = f"MLSAE report — {cfg.get('model_name', run_dir.name)}"
    return write_report(run_dir / REPORT_FILE, title, sections)


def _run_section(run_dir: Path, cfg: dict[str, Any]) -> ReportSection:
    table: dict[str, Any] = {"run directory": str(run_dir), "model": cfg.get("model_name")}
    if (run_dir / CFG_FILE).is_file():
        sae_cfg = read_json(run_dir / CFG_FILE)
        table.update(
            layers=sae_cfg.get("n_layers"),
            d_in=sae_cfg.get("d_in"),
            d_sae=sae_cfg.get("d_sae"),
            k=sae_cfg.get("k"),
            normalization=sae_cfg.get("normalization"),
        )
    log_file = run_dir / TRAINING_LOG_FILE
    if log_file.is_file() and (log := read_json(log_file)):
        table["training tokens"] = log[-1].get("tokens")
    parts = [table_html(table)]
    if (run_dir / SPLITS_FILE).is_file():
        corpus = read_json(run_dir / SPLITS_FILE).get("train")
        if corpus:
            parts.append("<h3>Corpus (training split)</h3>" + table_html(corpus))
    parts.append("<h3>Configuration (run.json)</h3>" + table_html(cfg))
    return ReportSection(title="Run", html="".join(parts))


__all__ = ["build_run_report"]
