"""Load what ``python -m moei_lightning export`` wrote, in one call: ``moei_lightning.from_pretrained(DIR)``.

Every export directory holds ``moei_export.json``: which adapter trained it, the backbone's
settings (``model.backbone``), the model kind and the prompt settings (``data.prompt_template``,
``system_prompt``, ``use_chat_template``), so that prompts are built exactly as in training. Then:

- ``--format moei``: ``molora_config.json`` + ``molora_model.safetensors``; the backbone is loaded from
  where training found it (or from ``backbone=``) and the adapters are injected into it;
- ``--format hf`` / ``merged``: a ``save_pretrained`` directory (``config.json``, weights, tokenizer),
  plus the MoLoRA files when the adapters route (they cannot be merged);
- ``--format peft``: PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``, read with PEFT.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moei_lightning.backbone import BackboneConfig, Kind, load_backbone, load_tokenizer, resolve_kind
from moei_lightning.molora import CONFIG_FILE, load_adapter

EXPORT_FILE = "moei_export.json"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
HF_CONFIG_FILE = "config.json"


@dataclass
class Pretrained:
    """A loaded export: the model (eval mode), its tokenizer, its kind and the prompt settings of training."""

    model: nn.Module
    tokenizer: Any
    kind: Kind
    prompt: dict[str, Any] = field(default_factory=dict)


def read_export_info(directory: str | Path) -> dict[str, Any]:
    """The directory's ``moei_export.json``; an error that says what the directory is otherwise."""
    directory = Path(directory)
    path = directory / EXPORT_FILE
    if not path.is_file():
        found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else None
        raise FileNotFoundError(
            f"{directory} is not a directory written by `python -m moei_lightning export` (no {EXPORT_FILE}; "
            + (f"it holds {found[:10]})" if found is not None else "it does not exist)")
        )
    return json.loads(path.read_text())


def from_pretrained(
    directory: str | Path, *, backbone: str | None = None, device: str | torch.device | None = None
) -> Pretrained:
    """The exported model, ready to generate.

    Args:
        directory: an export directory (any ``--format``).
        backbone: where the backbone lives now, when a ``--format moei`` or ``peft`` export was trained on
            a path that does not exist here; default: the path training used.
        device: where to put the model; default: the CPU.
    """
    directory = Path(directory)
    info = read_export_info(directory)
    known = {f.name for f in fields(BackboneConfig)}
    settings = {k: v for k, v in (info.get("backbone") or {}).items() if k in known}
    if (directory / HF_CONFIG_FILE).is_file():  # a self-contained save_pretrained directory
        settings.update(name_or_path=str(directory), tokenizer_name_or_path=None)
    elif backbone is not None:
        settings["name_or_path"] = backbone
    config = BackboneConfig(**settings)
    model = load_backbone(config, device=device)
    if (directory / CONFIG_FILE).is_file():
        load_adapter(model, directory)
    elif (directory / PEFT_CONFIG_FILE).is_file():
        try:
            from peft import PeftModel
        except ImportError as err:
            raise ImportError(f"{directory} is a PEFT adapter; reading it needs `pip install peft`") from err
        model = PeftModel.from_pretrained(model, str(directory))
    model = model.to(device) if device is not None else model
    return Pretrained(model.eval(), load_tokenizer(config), resolve_kind(config), info.get("prompt") or {})
