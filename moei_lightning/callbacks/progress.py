"""Progress with the training loss next to the router's two headline numbers: a Rich bar, or plain lines.

A Rich bar redraws one line in place; written to a file (a SLURM log, ``| tee``) it shows only its
last frame. When standard output is not a terminal the bar prints a plain line every few steps
instead, which reads the same in a log file as on screen. The evaluation suites that ``test`` runs after
its loop follow the same bar (:class:`SuiteProgress`).
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme

from moei_lightning.callbacks.router_stats import RouterStatsCallback


class MoEIProgressBar(RichProgressBar):
    """``loss``, ``ei_activation`` and ``gi_leakage`` (mean inter gate on EI / GI tokens) while training.

    The router numbers come from the :class:`RouterStatsCallback` of the same Trainer and change
    every time it logs; without one the bar shows the loss only. ``refresh_rate: 0`` hides the bar
    and the lines.

    Args:
        refresh_rate: batches between redraws of the bar; 0 hides the bar and the lines.
        leave: keep each finished epoch's bar on screen.
        theme: Rich styles of the bar (Lightning's ``RichProgressBarTheme``); ``None``: Lightning's.
        console_kwargs: arguments of the Rich ``Console`` the bar draws on.
        lines: print progress lines instead of drawing the bar; ``None``: when standard output is not
            a terminal.
        lines_every_n_steps: training steps (and evaluation batches) between lines; ``None`` follows
            ``trainer.log_every_n_steps``.
    """

    def __init__(
        self,
        refresh_rate: int = 100,
        leave: bool = False,
        theme: RichProgressBarTheme | None = None,
        console_kwargs: dict[str, Any] | None = None,
        lines: bool | None = None,
        lines_every_n_steps: int | None = None,
    ) -> None:
        super().__init__(refresh_rate, leave, theme or RichProgressBarTheme(), console_kwargs)
        self.lines = (not sys.stdout.isatty()) if lines is None else lines
        self.lines_every_n_steps = lines_every_n_steps
        self._started: dict[str, float] = {}

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        for callback in trainer.callbacks:
            if isinstance(callback, RouterStatsCallback):
                items |= callback.latest
        return items

    # ---- plain lines -------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.lines:
            self.disable()  # no Rich drawing; the hooks below print instead

    def _printing(self, trainer: Trainer) -> bool:
        return self.lines and trainer.is_global_zero and self.refresh_rate > 0 and not trainer.sanity_checking

    def _every(self, trainer: Trainer) -> int:
        return max(1, self.lines_every_n_steps or trainer.log_every_n_steps)

    def _line(self, stage: str, done: int, total: int | float, extra: str = "") -> str:
        elapsed = time.monotonic() - self._started.get(stage, time.monotonic())
        known = isinstance(total, int) or (isinstance(total, float) and total != float("inf"))
        eta = f", eta {timedelta(seconds=round(elapsed / done * (total - done)))}" if known and done else ""
        of = f"/{int(total)}" if known else ""
        rate = f"{elapsed / done:.2f} s/it" if done else ""
        return f"{stage} {done}{of}{extra} | {rate}{eta}"

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._started["train"] = time.monotonic()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        done, total = batch_idx + 1, self.total_train_batches
        if self._printing(trainer) and (done % self._every(trainer) == 0 or done == total):
            metrics = " ".join(f"{k} {_number(v)}" for k, v in self.get_metrics(trainer, pl_module).items())
            epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
            where = f" (epoch {trainer.current_epoch + 1}{epochs}, step {trainer.global_step})"
            line = self._line("train", done, total, where)
            print(f"{line} | {metrics}", flush=True)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self._started["validate"] = time.monotonic()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._printing(trainer):
            loss = trainer.callback_metrics.get("val/loss")
            total = int(sum(trainer.num_val_batches))
            summary = f" | val/loss {_number(loss)}" if loss is not None else ""
            print(f"{self._line('validate', total, total)}{summary}", flush=True)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_test_start(trainer, pl_module)
        self._started["test"] = time.monotonic()

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._eval_line(trainer, "test", batch_idx, trainer.num_test_batches[dataloader_idx])

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        self._started["predict"] = time.monotonic()

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._eval_line(trainer, "predict", batch_idx, trainer.num_predict_batches[dataloader_idx])

    def _eval_line(self, trainer: Trainer, stage: str, batch_idx: int, total: int | float) -> None:
        done = batch_idx + 1
        if self._printing(trainer) and (done % self._every(trainer) == 0 or done == total):
            print(self._line(stage, done, total), flush=True)


def _number(value: Any) -> str:
    """A metric for a log line: tensors and floats with 4 significant digits."""
    value = value.item() if hasattr(value, "item") else value
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class SuiteProgress:
    """Progress over the evaluation suites, which run after the test loop (an hour on a 13B model): where the
    Trainer's bar draws a Rich bar they get a task on it; where it prints lines (``progress_bar.lines``,
    standard output not a terminal) each suite gets a line when it starts and when it ends. Without a
    progress bar, or on ranks other than 0, it stays silent. Call :meth:`start` as each suite begins and
    :meth:`close` after the last one."""

    def __init__(self, trainer: Trainer, total: int) -> None:
        bar = trainer.progress_bar_callback
        shown = bar is not None and trainer.is_global_zero and getattr(bar, "refresh_rate", 1) > 0
        self.lines = shown and bool(getattr(bar, "lines", False))
        rich = getattr(bar, "progress", None) if shown and not self.lines and bar.is_enabled else None
        self.rich: Any = rich if hasattr(rich, "add_task") else None
        self.total = total
        self.done = 0
        self.current: tuple[str, int, float] | None = None
        self.started = time.monotonic()
        self.task = self.rich.add_task("eval", total=total) if self.rich is not None else None

    def start(self, suite: str, items: int) -> None:
        """``suite`` begins with ``items`` items to ask (on this rank's share of them, summed over ranks)."""
        self._finish()
        self.current = (suite, items, time.monotonic())
        position = f"{self.done + 1}/{self.total}"
        if self.lines:
            print(f"eval {position} {suite}: {items} items", flush=True)
        if self.task is not None:
            self.rich.update(self.task, description=f"eval {suite} ({items} items)")

    def close(self) -> None:
        """The last suite has ended."""
        self._finish()
        if self.lines:
            print(f"eval: {self.done} suites in {_elapsed(self.started)}", flush=True)
        if self.task is not None:
            self.rich.update(self.task, description="eval done")

    def _finish(self) -> None:
        if self.current is None:
            return
        suite, _, started = self.current
        self.done += 1
        self.current = None
        if self.lines:
            print(f"eval {self.done}/{self.total} {suite}: done in {_elapsed(started)}", flush=True)
        if self.task is not None:
            self.rich.update(self.task, completed=self.done)


def _elapsed(since: float) -> str:
    return str(timedelta(seconds=round(time.monotonic() - since)))
