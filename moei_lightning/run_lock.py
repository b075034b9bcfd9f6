"""One fit at a time per run directory: two would write over each other's checkpoints and config.

The lock is ``fcntl.flock`` on ``<run_dir>/.fit.lock``, held by the fit's first process until
:func:`release_run_dirs` or its exit. The kernel drops it when the process dies, so a crash, an
out-of-memory kill or ``kill -9`` never leaves a directory locked; the file itself stays and means
nothing without the lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from moei_lightning.errors import ConfigError

LOCK_FILE = ".fit.lock"
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
"""Set by launchers (torchrun, Lightning's DDP, SLURM); any non-zero value marks a process that is not the first."""

_held: dict[Path, int] = {}


def lock_run_dir(run_dir: str | Path) -> None:
    """Hold ``run_dir``'s lock; a ConfigError if another process holds it. Other ranks of the same job skip it."""
    directory = Path(run_dir).resolve()
    if directory in _held or any(os.environ.get(name, "0") != "0" for name in RANK_VARIABLES):
        return
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(
            f"run_dir {run_dir} is in use by another fit ({owner}); wait for it to end, or choose another --run_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()}".encode())
    _held[directory] = fd


def release_run_dirs() -> None:
    """Let go of every run directory this process holds (closing the file drops its lock)."""
    for fd in _held.values():
        os.close(fd)
    _held.clear()
