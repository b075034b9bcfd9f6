"""A Rich progress bar that shows the training loss next to the router's two headline numbers."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar

from moei_lightning.callbacks.router_stats import RouterStatsCallback


class MoEIProgressBar(RichProgressBar):
    """``loss``, ``ei_activation`` and ``gi_leakage`` (mean inter gate on EI / GI tokens) while training.

    The router numbers come from the :class:`RouterStatsCallback` of the same Trainer and change
    every time it logs; without one the bar shows the loss only. ``refresh_rate: 0`` hides the bar.
    """

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        for callback in trainer.callbacks:
            if isinstance(callback, RouterStatsCallback):
                items |= callback.latest
        return items
