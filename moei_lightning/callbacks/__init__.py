"""Callbacks that make the router visible: routing statistics, per-aspect EI metrics, a progress bar.

Both statistics callbacks log through the Trainer's loggers and also append every row to JSON
lines files in the run directory (:mod:`moei_lightning.callbacks.stats_files`), which the
notebooks read. Keys and row fields: ``docs/monitoring.md``.
"""

from moei_lightning.callbacks.ei_metrics import EiMetricsCallback
from moei_lightning.callbacks.progress import MoEIProgressBar
from moei_lightning.callbacks.router_stats import RouterStatsCallback

__all__ = ["EiMetricsCallback", "MoEIProgressBar", "RouterStatsCallback"]
