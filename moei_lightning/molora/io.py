"""Adapter files: only adapter tensors, as ``molora_config.json`` + ``molora_model.safetensors``.

The names are MoLoRA's own: PEFT's ``adapter_config.json`` holds another schema, and a directory
that PEFT or transformers would try (and fail) to read as a LoRA adapter helps nobody. A LoRA
adapter in PEFT's format comes from :func:`moei_lightning.molora.peft_format.to_peft`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from moei_lightning.molora.config import MoLoRAConfig
from moei_lightning.molora.errors import MoLoRAError
from moei_lightning.molora.inject import default_target_modules, find_targets, inject_molora, molora_layers
from moei_lightning.molora.layer import MoLoRALinear

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
    # Each file is written beside its final name and renamed: an interrupted write never leaves half a file.
    weights = directory / f".{WEIGHTS_FILE}.partial"
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(weights))
    weights.replace(directory / WEIGHTS_FILE)
    config_file = directory / f".{CONFIG_FILE}.partial"
    config_file.write_text(json.dumps(payload, indent=2) + "\n")
    config_file.replace(directory / CONFIG_FILE)
    return directory


def read_adapter_config(directory: str | Path) -> MoLoRAConfig:
    """The MoLoRA settings of an adapter directory; a missing or malformed file is an error naming it."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        payload = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoLoRAError(f"{path}: not valid JSON ({err}); re-export the adapters") from err
    if not isinstance(payload, dict) or not isinstance(payload.get("molora"), dict):
        raise MoLoRAError(f"{path}: expected an object with a 'molora' section, as save_adapter writes")
    try:
        return MoLoRAConfig.from_dict(payload["molora"])
    except (MoLoRAError, TypeError) as err:
        raise MoLoRAError(f"{path}: {err}") from err


def read_adapter_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``molora_model.safetensors``; unreadable files and non-finite values are refused.

    safetensors holds raw tensors only, so reading it runs no code, whatever the file's origin.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise MoLoRAError(f"{path}: not a readable safetensors file, truncated or corrupt ({err})") from err
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise MoLoRAError(f"{path}: tensors {_few(bad)} hold NaN or infinite values; these adapters diverged")
    return tensors


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load adapters saved by :func:`save_adapter`, injecting them first if ``model`` has none.

    Every check (the config, the tensor file, finite values, keys and shapes against the layers the
    config selects) runs before the model is touched, so a failed load leaves ``model`` exactly as it
    was and a retry with the right directory works. Missing, extra or mis-shaped keys are an error
    that names them: the adapters were saved from another architecture or another ``target_modules``.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    source = str(directory / WEIGHTS_FILE)
    saved = read_adapter_tensors(directory / WEIGHTS_FILE)
    if hasattr(model, "molora_recorder"):
        if model.molora_config != config:
            raise MoLoRAError(f"{directory}/{CONFIG_FILE} does not match the adapters already in the model")
        load_adapter_state_dict(model, saved, source=source)
        return model
    _check_fit(model, planned_adapter_shapes(model, config), saved, source)
    inject_molora(model, config)
    load_adapter_state_dict(model, saved, source=source)
    return model


def planned_adapter_shapes(model: nn.Module, config: MoLoRAConfig) -> dict[str, tuple[int, ...]]:
    """The adapter tensors :func:`inject_molora` would add to ``model``, by name, without changing it."""
    shapes = {}
    for name in find_targets(model, config.target_modules or default_target_modules(model)):
        base = model.get_submodule(name)
        probe = MoLoRALinear(nn.Linear(base.in_features, base.out_features, bias=False, device="meta"), config)
        for param_name, param in probe.named_parameters():
            if not param_name.startswith("base_layer."):
                shapes[f"{name}.{param_name}"] = tuple(param.shape)
    return shapes


def load_adapter_state_dict(model: nn.Module, saved: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Copy ``saved`` into the model's adapter tensors, checking keys and shapes first."""
    own = adapter_state_dict(model)
    _check_fit(model, {k: tuple(v.shape) for k, v in own.items()}, saved, source)
    with torch.no_grad():
        for key, param in own.items():
            param.copy_(saved[key])


def _check_fit(model: nn.Module, own: dict[str, tuple[int, ...]], saved: dict[str, torch.Tensor], source: str) -> None:
    missing = sorted(set(own) - set(saved))
    extra = sorted(set(saved) - set(own))
    shapes = sorted(
        f"{k}: saved {tuple(saved[k].shape)} vs model {own[k]}"
        for k in set(own) & set(saved)
        if tuple(saved[k].shape) != own[k]
    )
    if missing or extra or shapes:
        parts = [f"missing keys {_few(missing)}" if missing else "", f"unexpected keys {_few(extra)}" if extra else ""]
        parts.append(f"shape mismatches {_few(shapes)}" if shapes else "")
        raise MoLoRAError(
            f"adapters in {source} do not fit this {type(model).__name__}: "
            + "; ".join(p for p in parts if p)
            + ". They were saved from another architecture or target_modules."
        )


def _few(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... ({len(items) - limit} more)' if len(items) > limit else ''}]"
