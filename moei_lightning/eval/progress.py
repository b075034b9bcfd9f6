"""Progress over the evaluation suites: a task on the Trainer's Rich bar, or one line per suite in a log.

The paper evaluation runs after the test loop and can take an hour on a 13B model; without this it
shows nothing. It follows the Trainer's progress bar: where that draws a Rich bar, the suites get a
task on it; where it prints lines (``progress_bar.lines``, standard output not a terminal), each
suite gets a line when it starts and when it ends. Without a progress bar, or on ranks other than 0,
it stays silent.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from lightning.pytorch import Trainer


class SuiteProgress:
    """Call :meth:`start` as each suite begins and :meth:`close` after the last one."""

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
