"""Reading checkpoint files without trusting them.

``torch.load`` with ``weights_only=False`` runs whatever a pickle names, so a crafted ``.ckpt`` can
execute code the moment it is read. Every checkpoint this project reads goes through
:func:`read_checkpoint_file`: ``weights_only=True`` (tensors, containers, numbers and strings only,
plus the classes in :data:`SAFE_GLOBALS`), and a file that is refused, truncated or not a
checkpoint at all is a :class:`~moei_lightning.errors.CheckpointError` that names it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from moei_lightning.errors import CheckpointError

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


def _short(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
