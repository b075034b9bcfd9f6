"""Checkpoint files on disk: read without trusting them, written so that a failure never costs the last one.

``torch.load`` with ``weights_only=False`` runs whatever a pickle names, so a crafted ``.ckpt`` can
execute code the moment it is read. Every checkpoint this project reads goes through
:func:`read_checkpoint_file`: ``weights_only=True`` (tensors, containers, numbers and strings only,
plus the classes in :data:`SAFE_GLOBALS`), and a file that is refused, truncated or not a
checkpoint at all is a :class:`~moei_lightning.errors.CheckpointError` that names it.

Lightning writes a checkpoint to a temporary file under ``/tmp`` and moves it into place, which
is a copy when ``/tmp`` is another filesystem: a crash or a full disk during that copy leaves half a
file under the final name. :class:`AtomicCheckpointIO` writes beside the target and renames.
"""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Trainer

from moei_lightning.errors import CheckpointError, CheckpointWriteError

SAFE_GLOBALS: list[Any] = []
"""Classes a checkpoint may hold beyond what ``weights_only=True`` allows by itself.

Empty: the checkpoints this project writes hold tensors, the RNG states (tuples of ints), loop and
callback states and the hyperparameters as plain dicts. Add a class here only if a checkpoint
really needs it; each entry is code that loading may run.
"""


def read_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """A checkpoint file on the CPU, loaded with ``weights_only=True``; any failure names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line for line in str(err).splitlines() if "unsupported" in line.lower()]
        reason = lines[0] if lines else str(err)
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects beyond tensors and plain values ({_short(reason)}). "
            "Checkpoints written by moei_lightning never do; a file that does may run code when loaded"
        ) from err
    except Exception as err:  # the unpickler fails in many ways on a damaged file; each one is the same problem
        raise CheckpointError(
            f"{path}: not a readable checkpoint, truncated or corrupt ({type(err).__name__}: {_short(str(err))}); "
            "use an earlier checkpoint of the run"
        ) from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


def check_finite(checkpoint: dict[str, Any], path: str | Path) -> None:
    """A checkpoint whose model tensors hold NaN or infinite values is an error naming the file and the tensors.

    Such a file comes from a run that diverged before this project refused to save them, or from
    elsewhere; exporting or evaluating it would only give NaN scores or a misleading divergence error.
    """
    state = checkpoint.get("state_dict") or {}
    bad = sorted(
        key
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(value.isfinite().all())
    )
    if bad:
        raise CheckpointError(
            f"{path}: this checkpoint holds non-finite values (NaN or infinite in {len(bad)} tensors, e.g. "
            f"{bad[:3]}); use an earlier checkpoint of the run"
        )


def _short(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a hidden file in the target's directory, then renames it over the target.

    The rename is atomic on one filesystem, so the file under the final name is always a whole
    checkpoint: the new one, or (after a crash, a kill or a full disk) the previous one.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own upload
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, target)
        except OSError as err:
            partial.unlink(missing_ok=True)
            full = err.errno in (errno.ENOSPC, errno.EDQUOT)
            reason = "disk full" if full else "the write failed"
            fix = f"free space in {target.parent}" if full else f"check that {target.parent} is writable"
            if target.is_file():
                then = f"{fix} and resume with --ckpt_path {target}; the previous {target.name} is unchanged"
            else:
                then = f"{fix} and run again; no {target.name} was written"
            raise CheckpointWriteError(
                f"could not save the checkpoint {target}: {reason} ({err.strerror or err}); {then}"
            ) from err


def use_atomic_checkpoints(trainer: Trainer) -> None:
    """Give the trainer's strategy :class:`AtomicCheckpointIO`, unless the config chose its own CheckpointIO."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()

