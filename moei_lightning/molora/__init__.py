"""MoLoRA: stacked LoRA experts with an intra router and an inter gate, for frozen PyTorch models.

Plain PyTorch and safetensors; this package imports neither Lightning nor the data code.
"""

from moei_lightning.molora.config import MoLoRAConfig
from moei_lightning.molora.convert import is_static, merge_molora, to_peft
from moei_lightning.molora.inject import (
    DEFAULT_TARGET_MODULES,
    default_target_modules,
    find_targets,
    inject_molora,
    molora_layers,
    parameter_roles,
)
from moei_lightning.molora.io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    adapter_state_dict,
    load_adapter,
    load_adapter_state_dict,
    read_adapter_config,
    save_adapter,
    write_adapter,
)
from moei_lightning.molora.layer import MoLoRALinear, ParameterRole
from moei_lightning.molora.recorder import Capture, RoutingRecord, RoutingRecorder, routing

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_TARGET_MODULES",
    "WEIGHTS_FILE",
    "Capture",
    "MoLoRAConfig",
    "MoLoRALinear",
    "ParameterRole",
    "RoutingRecord",
    "RoutingRecorder",
    "adapter_state_dict",
    "default_target_modules",
    "find_targets",
    "inject_molora",
    "is_static",
    "load_adapter",
    "load_adapter_state_dict",
    "merge_molora",
    "molora_layers",
    "parameter_roles",
    "read_adapter_config",
    "routing",
    "save_adapter",
    "to_peft",
    "write_adapter",
]
