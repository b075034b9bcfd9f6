"""Load what ``python -m moei_lightning export`` wrote, in one call: ``moei_lightning.from_pretrained(DIR)``.

Every export directory holds ``moei_export.json``: which adapter trained it, the backbone's
settings (``model.backbone``), the model kind and the prompt settings (``data.prompt_template``,
``system_prompt``, ``use_chat_template``), so that prompts are built exactly as in training. Then:

- ``--format moei``: ``molora_config.json`` + ``molora_model.safetensors``; the backbone is loaded from
  where training found it (or from ``backbone=``) and the adapters are injected into it;
- ``--format hf`` / ``merged``: a ``save_pretrained`` directory (``config.json``, weights, tokenizer),
  plus the MoLoRA files when the adapters route (they cannot be merged);
- ``--format peft``: PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``, read with PEFT.

The directory is data, never code: ``trust_remote_code`` comes from the caller only, whatever
``moei_export.json`` says, an attention kernel it names on the hub is refused, and weights load from
safetensors files only (a pickled ``pytorch_model.bin`` can run code when read). Which files are
read follows the format ``moei_export.json`` records, so files left over from an earlier export of
another format are never picked up.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moei_lightning.backbone import BackboneConfig, Kind, load_backbone, load_tokenizer, resolve_kind
from moei_lightning.errors import CheckpointError
from moei_lightning.molora import CONFIG_FILE, load_adapter

EXPORT_FILE = "moei_export.json"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
FORMATS = ("moei", "peft", "merged", "hf")
SELF_CONTAINED = ("hf", "merged")  # formats that hold the model itself, as a save_pretrained directory
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


@dataclass
class Pretrained:
    """A loaded export: the model (eval mode), its tokenizer, its kind and the prompt settings of training."""

    model: nn.Module
    tokenizer: Any
    kind: Kind
    prompt: dict[str, Any] = field(default_factory=dict)


def export_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A command-line parser for a tool that loads an export: ``--adapter DIR`` and ``--backbone``, as every such tool
    names them."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
    parser.add_argument("--adapter", required=True, help="a directory written by `python -m moei_lightning export`")
    parser.add_argument("--backbone", default=None, help="where the backbone is now, if not where training found it")
    return parser


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
    try:
        info = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); export the checkpoint again") from err
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object, as `python -m moei_lightning export` writes")
    return info


def from_pretrained(
    directory: str | Path,
    *,
    backbone: str | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    adapters: bool = True,
) -> Pretrained:
    """The exported model, ready to generate.

    Args:
        directory: an export directory (any ``--format``).
        backbone: where the backbone lives now, when a ``--format moei`` or ``peft`` export was trained on
            a path that does not exist here; default: the path training used.
        device: where to put the model; default: the CPU.
        trust_remote_code: let the model's own Python files run (some hub models need it). Only this
            argument decides it: a setting in the directory's files never does.
        adapters: False loads the backbone alone, to compare a model with the backbone it was trained on;
            a ``merged`` (or ``hf`` lora/full) export has no backbone apart from its adapters and is refused.
    """
    directory = Path(directory)
    info = read_export_info(directory)
    settings = _backbone_settings(info, directory / EXPORT_FILE)
    settings["trust_remote_code"] = trust_remote_code
    export_format = info.get("format")
    if export_format not in FORMATS:
        raise ValueError(
            f"{directory / EXPORT_FILE}: format {export_format!r} is not one of {', '.join(FORMATS)}; "
            "export the checkpoint again"
        )
    if not adapters and export_format in SELF_CONTAINED and info.get("adapter") != "molora":
        raise ValueError(
            f"{directory}: this {export_format} export has its {info.get('adapter')} adapters merged into the weights, "
            "so it holds no backbone alone; load the backbone from a moei or peft export of the run, or directly"
        )
    if export_format in SELF_CONTAINED:
        _refuse_pickled_weights(directory)
        settings.update(name_or_path=str(directory), tokenizer_name_or_path=None)
    elif backbone is not None:
        settings["name_or_path"] = backbone
    config = BackboneConfig(**settings)
    model = load_backbone(config, device=device)
    files = info.get("files")  # what the export wrote; older exports did not list it
    if adapters and (directory / CONFIG_FILE).is_file() and (files is None or CONFIG_FILE in files):
        load_adapter(model, directory)
    elif adapters and export_format == "peft":
        try:
            from peft import PeftModel
        except ImportError as err:
            raise ImportError(f"{directory} is a PEFT adapter; reading it needs `pip install peft`") from err
        model = PeftModel.from_pretrained(model, str(directory))
    model = model.to(device) if device is not None else model
    return Pretrained(model.eval(), load_tokenizer(config), resolve_kind(config), info.get("prompt") or {})


def _backbone_settings(info: dict[str, Any], path: Path) -> dict[str, Any]:
    """The backbone settings ``moei_export.json`` records, less any that would run code."""
    known = {f.name for f in fields(BackboneConfig)} - {"trust_remote_code"}
    settings = {k: v for k, v in (info.get("backbone") or {}).items() if k in known}
    kernel = settings.get("attn_implementation")
    if isinstance(kernel, str) and "/" in kernel:
        raise ValueError(
            f"{path}: backbone.attn_implementation {kernel!r} names a kernel on the hub, which runs downloaded "
            "code; set it to null, eager or sdpa in that file"
        )
    return settings


def _refuse_pickled_weights(directory: Path) -> None:
    """An export's weights are safetensors; a pickled weights file in their place is refused unread."""
    if any(directory.glob("*.safetensors")):
        return
    pickled = sorted(p for pattern in PICKLED_WEIGHTS for p in directory.glob(pattern))
    if pickled:
        raise CheckpointError(
            f"{pickled[0]}: refused to load: exports hold their weights as .safetensors, and a pickled weights "
            "file can run code when it is read; export the checkpoint again with `python -m moei_lightning export`"
        )
