"""Errors that are the user's to fix, and how a run ends when it cannot go on.

The command line prints these as one ``error: ...`` line and exits with :data:`USER_ERROR_EXIT`
(``--debug`` or ``MOEI_DEBUG=1`` shows the traceback instead). Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

USER_ERROR_EXIT = 2
"""Exit status of a run stopped by bad input: config, data, checkpoint or adapter files."""

DIVERGED_EXIT = 3
"""Exit status of a training run stopped because a loss or a gradient stopped being finite."""


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and what to do."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or is not trusted; the message names the file."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, read-only); the previous one is left whole."""


class TrainingDiverged(RuntimeError):
    """A loss term, gate or gradient stopped being finite; the message names the step and the term.

    Nothing is saved after it: the last checkpoint written before it is the one to resume from.
    """


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped training after a resumable checkpoint was written.

    ``exit_code`` is ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT), what a shell reports
    for a process that a signal ended, so a scheduler never mistakes it for success.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
