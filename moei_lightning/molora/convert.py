"""MoLoRA adapters in other shapes: folded into the frozen weights, or as a PEFT LoRA adapter.

Only adapters that do not route can leave MoLoRA: one expert and no inter gate (``num_experts=1``,
``inter="none"``, what ``model.adapter: lora`` trains). Their delta ``(alpha / r) B A`` is the same
for every input, so it can be added to ``W0`` or handed to PEFT's LoRA. A routed bank's delta
depends on the input through the router and the gate, so it has no fixed weight to fold.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moei_lightning.molora.config import MoLoRAConfig
from moei_lightning.molora.layer import MoLoRALinear

PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the Hugging Face model
PEFT_TASK_TYPES = {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}


def is_static(config: MoLoRAConfig) -> bool:
    """Whether the adapters add a fixed delta: one router slot (its softmax is always 1) and no gate."""
    return config.num_slots == 1 and config.inter == "none"


def _require_static(config: MoLoRAConfig, what: str) -> None:
    if not is_static(config):
        raise ValueError(
            f"cannot {what}: these adapters route (num_experts={config.num_experts}, inter={config.inter!r}), so "
            "their delta depends on the input; only one expert with inter 'none' (model.adapter: lora) has a fixed "
            "delta. Keep MoLoRA adapters in their own format (export --format moei or hf)"
        )


def merge_molora(model: nn.Module) -> nn.Module:
    """Add every adapter's ``(alpha / r) B A`` to its frozen weight and put the plain linear layer back, in place.

    The result is the backbone's own class with changed weights, for ``save_pretrained`` and for servers
    that know nothing of MoLoRA. The weight keeps its dtype; the sum is formed in fp32.
    """
    config = getattr(model, "molora_config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no MoLoRA adapters to merge")
    _require_static(config, "merge the adapters into the weights")
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, MoLoRALinear)]
    with torch.no_grad():
        for name, block in blocks:
            weight = block.base_layer.weight
            delta = block.config.scaling * (block.lora_B.float() @ block.lora_A.float())
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, block.base_layer)
    for handle in getattr(model, "molora_hooks", ()):
        handle.remove()
    for attribute in ("molora_recorder", "molora_config", "molora_hooks"):
        if hasattr(model, attribute):
            delattr(model, attribute)
    return model


def to_peft(
    config: MoLoRAConfig,
    tensors: dict[str, torch.Tensor],
    *,
    kind: str,
    base_model_name_or_path: str | None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's ``adapter_config.json`` content and ``adapter_model.safetensors`` tensors for static adapters.

    ``tensors`` are :func:`~moei_lightning.molora.adapter_state_dict`'s (``<layer>.lora_A`` ...); the
    router's single row is dropped, since a softmax over one slot is 1 whatever it holds.
    ``target_modules`` keeps the configured names or regex, which PEFT matches the same way (a name
    suffix after a dot, or ``re.fullmatch``); the family default is written out as the adapted layers'
    last name parts.
    """
    _require_static(config, "write a PEFT LoRA adapter")
    layers = sorted({key.rsplit(".", 1)[0] for key in tensors if key.endswith((".lora_A", ".lora_B"))})
    if not layers:
        raise ValueError("no lora_A / lora_B tensors to convert")
    targets = config.target_modules or sorted({layer.rsplit(".", 1)[-1] for layer in layers})
    peft_config = {
        "peft_type": "LORA",
        "task_type": PEFT_TASK_TYPES[kind],
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    peft_tensors = {
        f"{PEFT_PREFIX}{layer}.{part}.weight": tensors[f"{layer}.{part}"]
        for layer in layers
        for part in ("lora_A", "lora_B")
    }
    return peft_config, peft_tensors
