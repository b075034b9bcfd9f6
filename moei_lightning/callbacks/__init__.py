"""Callbacks that make training visible (routing statistics, per-aspect EI metrics, training health, progress)
and measure it (the fit summary before and after ``fit``, the paper's evaluation at ``test``).

The statistics callbacks log through the Trainer's loggers and also append every row to JSON
lines files in the run directory (:mod:`moei_lightning.callbacks.stats_files`), which the
notebooks read. Keys and row fields: ``docs/monitoring.md``.
"""

from moei_lightning.callbacks.ei_metrics import EiMetricsCallback
from moei_lightning.callbacks.fit_summary import FitSummary
from moei_lightning.callbacks.paper_evaluation import PaperEvaluation
from moei_lightning.callbacks.progress import MoEIProgressBar
from moei_lightning.callbacks.router_stats import RouterStatsCallback
from moei_lightning.callbacks.training_health import TrainingHealth

__all__ = [
    "EiMetricsCallback",
    "FitSummary",
    "MoEIProgressBar",
    "PaperEvaluation",
    "RouterStatsCallback",
    "TrainingHealth",
]
