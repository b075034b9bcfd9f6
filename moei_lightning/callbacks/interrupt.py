"""Pre-emption without lost work: SIGTERM or SIGINT ends training with a resumable checkpoint.

A cluster pre-empts a job with SIGTERM, a person stops one with Ctrl+C (SIGINT). Either way the
current training batch finishes, a checkpoint is written at the same point of the loop where
``ModelCheckpoint(every_n_train_steps=...)`` writes its own (so resuming from it is exact), and
training stops with :class:`~moei_lightning.errors.TrainingInterrupted`, which the command line
turns into exit status ``128 + signal`` (143 for SIGTERM, 130 for SIGINT), never 0. A second
Ctrl+C stops at once, without a checkpoint.

Where the checkpoint goes: ``<checkpoint dir>/last.ckpt`` (resume with ``--ckpt_path``). Under
SLURM with Lightning's auto-requeue (its default there) it is ``hpc_ckpt_<n>.ckpt`` in the run
directory instead, which a requeued job of the same id resumes from by itself.
"""

from __future__ import annotations

import re
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from moei_lightning.errors import TrainingInterrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)
HPC_NAME = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


class InterruptCheckpoint(Callback):
    """Save a resumable checkpoint and stop when SIGTERM or SIGINT arrives during training.

    Args:
        dirpath: where ``last.ckpt`` goes; ``None`` takes the first ``ModelCheckpoint``'s directory,
            else ``<default_root_dir>/checkpoints``.
    """

    def __init__(self, dirpath: str | Path | None = None) -> None:
        self.dirpath = dirpath
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.signum = None
        self._trainer = trainer
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            launcher = self._trainer.strategy.launcher
            if signum == signal.SIGTERM and launcher is not None:
                launcher.kill(signum)  # processes this one started (DDP on one node) stop the same way
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl+C stops at once

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stop_if_signalled(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop_if_signalled(trainer)  # a signal during the last validation: the run still says so
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()

    def _stop_if_signalled(self, trainer: Trainer) -> None:
        signum = self.signum or 0
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([signum], device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank saves together, or none does
            signum = int(flag.item())
        if not signum:
            return
        path = self._checkpoint_path(trainer)
        _claim_last(trainer, path)
        trainer.save_checkpoint(path)
        name = signal.Signals(signum).name
        raise TrainingInterrupted(
            f"{name} received: stopped after step {trainer.global_step} and saved a resumable checkpoint to "
            f"{path}; resume with --ckpt_path {path}",
            signum,
        )

    def _checkpoint_path(self, trainer: Trainer) -> str:
        # A single-device strategy has no cluster environment; under SLURM Lightning gives it one that requeues.
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if environment is None and SLURMEnvironment.detect():
            environment = SLURMEnvironment()
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            return hpc_checkpoint_path(Path(trainer.default_root_dir))
        dirpath = self.dirpath
        if dirpath is None:
            checkpoints = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
            dirpath = checkpoints[0].dirpath if checkpoints else Path(trainer.default_root_dir) / "checkpoints"
        return str(Path(dirpath) / "last.ckpt")

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}


def hpc_checkpoint_path(root_dir: Path) -> str:
    """Where the next SLURM requeue checkpoint goes: Lightning resumes a requeued job from the highest
    ``hpc_ckpt_<n>.ckpt`` in the run directory, so this is ``n`` one above the highest there."""
    numbers = [int(match.group(1)) for p in root_dir.glob("hpc_ckpt_*.ckpt") if (match := HPC_NAME.fullmatch(p.name))]
    return str(root_dir / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt")


def _claim_last(trainer: Trainer, path: str) -> None:
    """Record ``path`` as the ``last.ckpt`` of every ``ModelCheckpoint`` that keeps one in its directory.

    The record goes into the checkpoint (``last_model_path``), so the resumed run's next "last" save
    overwrites this file; otherwise Lightning finds a ``last.ckpt`` it did not write and saves
    ``last-v1.ckpt`` beside it, and the newest state is no longer where resuming looks for it.
    """
    for callback in trainer.callbacks:
        if not (isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath):
            continue
        if Path(callback.format_checkpoint_name({}, callback.CHECKPOINT_NAME_LAST)) == Path(path):
            callback.last_model_path = path
