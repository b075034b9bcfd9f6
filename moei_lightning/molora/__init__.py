"""MoLoRA: stacked LoRA experts with an intra router and an inter gate, for frozen PyTorch models.

Plain PyTorch and safetensors; this package imports neither Lightning nor the data code.
"""

from moei_lightning.molora.config import MoLoRAConfig
from moei_lightning.molora.inject import (
    DEFAULT_TARGET_MODULES,
    default_target_modules,
    find_targets,
    inject_molora,
    molora_layers,
)
from moei_lightning.molora.io import (
    adapter_state_dict,
    load_adapter,
    load_adapter_state_dict,
    read_adapter_config,
    save_adapter,
    write_adapter,
)
from moei_lightning.molora.layer import MoLoRALinear
from moei_lightning.molora.recorder import RoutingRecord, RoutingRecorder

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "MoLoRAConfig",
    "MoLoRALinear",
    "RoutingRecord",
    "RoutingRecorder",
    "adapter_state_dict",
    "default_target_modules",
    "find_targets",
    "inject_molora",
    "load_adapter",
    "load_adapter_state_dict",
    "molora_layers",
    "read_adapter_config",
    "save_adapter",
    "write_adapter",
]
