"""Where `from_pretrained` reads a backbone: a local directory, the Hugging Face hub or its offline cache,
a shipped preset's package directory, or a MoLoRA export; load failures become errors that say what to do.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import transformers
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.utils import LocalEntryNotFoundError, validate_repo_id
from packaging.version import Version
from transformers import AutoConfig, PretrainedConfig

from moei_lightning.backbone.presets import PRESETS, SHIPPED_PRESETS
from moei_lightning.errors import CheckpointError

_T = TypeVar("_T")

# transformers 4.56 renamed `torch_dtype` to `dtype` and warns on the old name.
DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
"""The keyword under which `from_pretrained` and `from_config` take the parameter dtype."""

MOLORA_MODEL_TYPE = "moei_molora"
"""``model_type`` of a ``--format hf`` export that needs its MoLoRA adapters: transformers refuses it by itself."""
BACKBONE_MODEL_TYPE_KEY = "moei_backbone_model_type"
"""The ``config.json`` field of such an export that keeps the backbone's own ``model_type``."""


def location(name: str) -> str:
    """Where `from_pretrained` reads `name`: a shipped preset's package directory, else `name` itself."""
    if name not in SHIPPED_PRESETS:
        return name
    directory = SHIPPED_PRESETS[name]
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"The preset '{name}' should be shipped in the package at {directory}, but its files are missing; "
            f"reinstall moei_lightning, or rebuild them with `python -m moei_lightning.presets.build_tiny_gi`"
        )
    return str(directory)


def load_pretrained(loader: Callable[..., _T], name: str, what: str, **kwargs: object) -> _T:
    """Call a `from_pretrained` on a local directory or hub id, turning load failures into clear errors."""
    source = Path(name).expanduser()
    if not source.is_dir():
        offline = _hub_offline()
        hint = (
            f"Backbone {what} '{name}' is not a preset ({', '.join(PRESETS)}), not an existing local directory, "
            f"and not available from the Hugging Face hub{' cache (offline mode)' if offline else ''}. Download "
            f"it with `hf download {name} --local-dir <dir>` (`huggingface-cli download` in older huggingface_hub) "
            "and set backbone.name_or_path to <dir>, or choose a preset."
        )
        try:
            validate_repo_id(name)
        except ValueError as err:  # path-like, so not a hub id: asking the hub would only fail slowly
            raise FileNotFoundError(f"{hint} ('{name}' is not a valid hub id either: {err})") from err
        if not offline:
            try:
                return loader(name, **kwargs)
            except OSError as err:
                raise FileNotFoundError(f"{hint} Cause: {err}") from err
        # transformers 5 still asks the hub for a PEFT adapter when given `local_files_only=True`, so offline
        # loads resolve the cached snapshot here and read it as a local directory.
        try:
            source = Path(snapshot_download(name, local_files_only=True))
        except LocalEntryNotFoundError as err:
            raise FileNotFoundError(hint) from err
    hidden = _molora_export_config(source)
    if hidden is not None and what == "config":
        return hidden  # type: ignore[return-value]
    if hidden is not None:
        kwargs["config"] = hidden
    try:
        return loader(str(source), **kwargs)
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) met something that is not a tensor
        raise CheckpointError(
            f"Could not load the backbone {what} from '{source}': refused to load a pickled weights file that holds "
            "Python objects beyond tensors (loading it could run code); use a .safetensors copy of the model"
        ) from err
    except OSError as err:
        raise FileNotFoundError(
            f"Could not load the backbone {what} from the directory '{source}': {err}. It should hold a "
            "checkpoint written by `save_pretrained` or `hf download` (config.json, weights, tokenizer files)."
        ) from err


def _hub_offline() -> bool:
    """Offline mode, also when HF_HUB_OFFLINE was set after huggingface_hub read it at import time."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return hub_constants.HF_HUB_OFFLINE or flag.upper() in {"1", "ON", "YES", "TRUE"}


def _molora_export_config(directory: Path) -> PretrainedConfig | None:
    """The backbone's config of a MoLoRA ``--format hf`` export, whose ``config.json`` hides it from transformers."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None  # transformers reports the broken file itself
    if not isinstance(data, dict) or data.get("model_type") != MOLORA_MODEL_TYPE:
        return None
    data.pop("model_type")
    return AutoConfig.for_model(data.pop(BACKBONE_MODEL_TYPE_KEY), **data)
