"""A run that stopped at ``trainer.max_steps`` in the middle of an epoch can be resumed with more steps.

Lightning counts the epoch that ``max_steps`` cut short as finished in the checkpoint it saves at
the end (``epoch`` 1 after 24 of 400 batches), so resuming with a larger ``max_steps`` and
``max_epochs: 1`` stops at once, and with more epochs it skips the rest of that epoch's data.
:class:`ResumableEnd` saves such an epoch as the unfinished epoch it is: the same loop state a
mid-epoch step checkpoint holds, from which a resume continues with the next batch.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class ResumableEnd(Callback):
    """Record an epoch that ``max_steps`` ended before its last batch as unfinished in every checkpoint."""

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.max_steps < 0 or trainer.global_step < trainer.max_steps:
            return
        loop = checkpoint.get("loops", {}).get("fit_loop", {})
        epochs = loop.get("epoch_progress")
        if epochs is None or loop.get("epoch_loop.batch_progress", {}).get("is_last_batch", True):
            return
        for progress in (epochs["total"], epochs["current"]):
            if progress["processed"] >= progress["started"]:  # counted as finished
                progress["processed"] = progress["completed"] = progress["started"] - 1
        checkpoint["epoch"] = epochs["current"]["completed"]
