"""The demo, end to end: train → evaluate → analyse → report (``mlsae-lens demo``).

The top of the package below the CLI: the one flow that runs every step in turn, each through
its own command module, on the embedded model and corpus.
"""

import logging
from pathlib import Path

from mlsae_lens.analysis_options import AnalysisOptions
from mlsae_lens.analyze import analyze_run
from mlsae_lens.baselines import PCA
from mlsae_lens.config import MultiLayerRunnerConfig
from mlsae_lens.eval_run import EvalOptions, evaluate_run
from mlsae_lens.run_report import build_run_report
from mlsae_lens.run_training import TrainingRun

logger = logging.getLogger(__name__)

DEMO_DOWNSTREAM_TOKENS = 256
"""Test tokens of the demo's spliced CE/KL metrics (every layer spliced in turn)."""


def run_demo(cfg: MultiLayerRunnerConfig, eval_tokens: int = 4096) -> Path:
    """Train on the embedded model and corpus, evaluate, analyse, and write ``report.html``.

    The analysis reads ``eval_tokens`` test tokens too; the report is drawn from the files the
    steps saved (``build_run_report``), so ``mlsae-lens analyze`` can redraw it later.
    """
    runner = TrainingRun(cfg)
    sae = runner.run()
    # Downstream metrics splice every layer: 30 partial forwards per batch and method on the
    # embedded model, so they read at most DEMO_DOWNSTREAM_TOKENS tokens to stay CPU-sized.
    metrics = evaluate_run(
        runner.out,
        EvalOptions(
            tokens=eval_tokens,
            downstream_tokens=min(eval_tokens, DEMO_DOWNSTREAM_TOKENS),
            baselines=(PCA,),
            batch_size=cfg.model_batch_size,
        ),
        model=runner.model,
        splits=runner.splits,
        device=runner.device,
        report=False,
    )
    logger.info(
        "test FVU (mean over %d layers): MLSAE %.4f vs PCA rank-%d %.4f",
        sae.cfg.n_layers, metrics["mean_fvu"], sae.cfg.k, metrics.get("pca_mean_fvu", float("nan")),
    )
    analyze_run(
        runner.out,
        AnalysisOptions(tokens=eval_tokens, batch_size=cfg.model_batch_size, overwrite=True),
        model=runner.model,
        splits=runner.splits,
        device=runner.device,
        report=False,
    )
    return build_run_report(runner.out)
