"""Adapter files: only adapter tensors, as ``molora_config.json`` + ``molora_model.safetensors``.

The names are MoLoRA's own: PEFT's ``adapter_config.json`` holds another schema, and a directory
that PEFT or transformers would try (and fail) to read as a LoRA adapter helps nobody. A LoRA
adapter in PEFT's format comes from :func:`moei_lightning.molora.peft_format.to_peft`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moei_lightning.molora.config import MoLoRAConfig
from moei_lightning.molora.inject import inject_molora, molora_layers

CONFIG_FILE = "molora_config.json"
WEIGHTS_FILE = "molora_model.safetensors"
FORMAT = "moei_lightning.molora"  # the JSON's "format": what wrote it, for readers that find the file alone


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (experts, router, gate) by ``<layer name>.<param>``; no backbone tensor."""
    state = {}
    for layer_name, layer in molora_layers(model).items():
        for param_name, param in layer.named_parameters():
            if not param_name.startswith("base_layer."):
                state[f"{layer_name}.{param_name}"] = param
    return state


def save_adapter(model: nn.Module, directory: str | Path, metadata: dict | None = None) -> Path:
    """Write the adapters of ``model`` to ``directory``; ``metadata`` goes into the JSON's ``base_model``."""
    config = getattr(model, "molora_config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no MoLoRA adapters to save; call inject_molora first")
    base = {"model_type": getattr(getattr(model, "config", None), "model_type", None), **(metadata or {})}
    return write_adapter(directory, config, adapter_state_dict(model), base)


def write_adapter(directory: str | Path, config: MoLoRAConfig, tensors: dict[str, torch.Tensor], base: dict) -> Path:
    """The adapter directory format: ``molora_config.json`` (MoLoRA config + base model) and the tensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "molora": config.to_dict(), "base_model": base}
    (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(directory / WEIGHTS_FILE))
    return directory


def read_adapter_config(directory: str | Path) -> MoLoRAConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    return MoLoRAConfig.from_dict(json.loads(path.read_text())["molora"])


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load adapters saved by :func:`save_adapter`, injecting them first if ``model`` has none.

    Missing, extra or mis-shaped keys are an error that names them: the adapters were saved from
    another architecture or another ``target_modules``.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    if not hasattr(model, "molora_recorder"):
        inject_molora(model, config)
    elif model.molora_config != config:
        raise ValueError(f"{directory}/{CONFIG_FILE} does not match the adapters already in the model")
    saved = load_file(str(directory / WEIGHTS_FILE))
    load_adapter_state_dict(model, saved, source=str(directory / WEIGHTS_FILE))
    return model


def load_adapter_state_dict(model: nn.Module, saved: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Copy ``saved`` into the model's adapter tensors, checking keys and shapes first."""
    own = adapter_state_dict(model)
    missing = sorted(set(own) - set(saved))
    extra = sorted(set(saved) - set(own))
    shapes = sorted(
        f"{k}: saved {tuple(saved[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(saved)
        if saved[k].shape != own[k].shape
    )
    if missing or extra or shapes:
        parts = [f"missing keys {_few(missing)}" if missing else "", f"unexpected keys {_few(extra)}" if extra else ""]
        parts.append(f"shape mismatches {_few(shapes)}" if shapes else "")
        raise ValueError(
            f"adapters in {source} do not fit this {type(model).__name__}: "
            + "; ".join(p for p in parts if p)
            + ". They were saved from another architecture or target_modules."
        )
    with torch.no_grad():
        for key, param in own.items():
            param.copy_(saved[key])


def _few(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... ({len(items) - limit} more)' if len(items) > limit else ''}]"
