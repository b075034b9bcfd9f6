"""Put MoLoRA blocks into a model in place: match target layers, wrap them, freeze the rest."""

from __future__ import annotations

import re
import types
from typing import Any

import torch
from torch import nn

from moei_lightning.molora.config import MoLoRAConfig
from moei_lightning.molora.errors import MoLoRAError
from moei_lightning.molora.layer import MoLoRALinear, ParameterRole
from moei_lightning.molora.recorder import RoutingRecorder, Stream

DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "gemma2"), ("q_proj", "v_proj")
    ),
    **dict.fromkeys(("t5", "mt5", "umt5"), ("q", "v")),
}

# Cross-attention projections of the decoder that read the encoder's tokens.
_CROSS_ATTENTION_INPUTS = re.compile(r"(EncDecAttention\.(k|v)|encoder_attn\.(k_proj|v_proj))$")


def default_target_modules(model: nn.Module) -> list[str]:
    """The family default: LLaMA-like ``q_proj, v_proj``, T5 ``q, v``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise MoLoRAError(
            f"no default target_modules for model_type {model_type!r}; set molora.target_modules to "
            f"names from: {', '.join(linear_layer_patterns(model))}"
        )
    return list(DEFAULT_TARGET_MODULES[model_type])


def linear_layer_patterns(model: nn.Module) -> list[str]:
    """Names of the model's linear layers with layer numbers folded to ``*``, for error messages."""
    names = (name for name, module in model.named_modules() if isinstance(module, nn.Linear))
    return sorted({re.sub(r"\.\d+\.", ".*.", name) for name in names})


def find_targets(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Names of the linear layers that ``target_modules`` selects; an entry matching none is an error."""
    linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        selected = [name for name in linear_names if pattern.fullmatch(name)]
        unmatched = [] if selected else [target_modules]
    else:
        selected = [n for n in linear_names if any(n == t or n.endswith("." + t) for t in target_modules)]
        unmatched = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in linear_names)]
    if unmatched:
        raise MoLoRAError(
            f"molora.target_modules entries {unmatched} match no linear layer of this "
            f"{type(model).__name__}; its linear layers are: {', '.join(linear_layer_patterns(model))}"
        )
    return selected


def _stream_of(model: nn.Module, name: str) -> Stream:
    """Which tokens a layer sees: an encoder-decoder's encoder and cross-attention k/v see the source."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "decoder"
    if name.startswith("encoder.") or ".encoder." in name or _CROSS_ATTENTION_INPUTS.search(name):
        return "encoder"
    return "decoder"


def inject_molora(model: nn.Module, config: MoLoRAConfig) -> nn.Module:
    """Wrap every target linear layer of ``model`` in a :class:`MoLoRALinear`, in place.

    Everything but the adapters is frozen. The model gets a ``molora_recorder`` attribute (the
    shared :class:`RoutingRecorder`), a ``molora_config`` attribute and ``molora_hooks`` (the
    recorder's forward pre-hooks).
    """
    if hasattr(model, "molora_recorder"):
        raise ValueError(f"{type(model).__name__} already has MoLoRA adapters; inject into a fresh model")
    targets = find_targets(model, config.target_modules or default_target_modules(model))
    recorder = RoutingRecorder()
    model.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        block = MoLoRALinear(getattr(parent, child), config, name, _stream_of(model, name), recorder)
        setattr(parent, child, block.train(parent.training))  # an eval model must not get live dropout
    is_encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    encoder = model.get_encoder() if is_encoder_decoder and hasattr(model, "get_encoder") else None
    model.molora_hooks = recorder.attach(model, encoder)  # merge_molora removes them with the adapters
    model.molora_recorder = recorder
    model.molora_config = config
    if config.routing == "prompt" and hasattr(model, "generate"):
        model.generate = types.MethodType(_generate_from_prompt, model)
    return model


def _generate_from_prompt(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``generate`` with the prompt fixed: uncached steps re-read the growing sequence, never pooling past it."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    mask = kwargs.get("attention_mask")
    if mask is None and isinstance(ids, torch.Tensor):
        mask = torch.ones_like(ids)
    with self.molora_recorder.call(mask):
        return type(self).generate(self, *args, **kwargs)


def molora_layers(model: nn.Module) -> dict[str, MoLoRALinear]:
    """The model's MoLoRA blocks by name (wrapper prefixes such as FSDP's or compile's removed)."""
    return {_clean(name): m for name, m in model.named_modules() if isinstance(m, MoLoRALinear)}


def parameter_roles(model: nn.Module) -> dict[str, ParameterRole]:
    """Every MoLoRA parameter of ``model`` by its full name (as ``named_parameters`` gives it), with its role."""
    return {
        f"{name}.{local}": role
        for name, module in model.named_modules()
        if isinstance(module, MoLoRALinear)
        for local, role in module.parameter_roles().items()
    }


def _clean(name: str) -> str:
    for prefix in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name
