"""Sharded Lightning strategies for MoEI, with adapter-only checkpoints.

- :class:`MoEIFSDP2Strategy`: Lightning's ``ModelParallelStrategy`` used for FSDP2 alone (all ranks
  shard, no tensor parallelism). :meth:`MoEIModule.configure_model` builds the sharded model
  (:mod:`moei_lightning.sharding`). Runs on GPUs (NCCL) and on CPUs (gloo).
- :class:`MoEIFSDPStrategy`: Lightning's ``FSDPStrategy`` (FSDP1, flat parameters). Decoder blocks
  are wrapped by class path; every MoLoRA block and its frozen base layer become units of their
  own, because FSDP1 flattens each unit into one tensor of one dtype and the adapters stay fp32
  while the backbone is bf16. Autocast does the bf16 compute, as under DDP and FSDP2.

Both save the same checkpoint as a one-process run: one file whose ``state_dict`` holds the full
adapter tensors (gathered from their shards; frozen tensors are never gathered) and whose
``optimizer_states`` are in PyTorch's own format, parameters numbered in optimizer order. So a
checkpoint resumes under any strategy and world size, and ``python -m moei_lightning export``
reads it without a backbone.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch import Trainer
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim import Optimizer
from transformers import PreTrainedModel

from moei_lightning.backbone import disable_activation_checkpointing
from moei_lightning.checkpoints import read_checkpoint_file
from moei_lightning.molora import MoLoRALinear
from moei_lightning.sharding import block_classes

_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_FSDP1_UNIT = "_fsdp_wrapped_module."


def clean_name(name: str) -> str:
    """A parameter's name without the wrapper modules FSDP1, activation checkpointing or compile insert."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def gather_trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor of ``module``, whole and on the CPU, by clean name; a collective on all ranks.

    FSDP2 shards are all-gathered one adapter at a time; FSDP1 units that own adapters are unsharded
    one at a time with ``recurse=False``, so frozen weights are never gathered.
    """
    if FullyShardedDataParallel.fsdp_modules(module):
        state = {}
        for unit, names in _fsdp1_owners(module).items():
            with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False):
                for name in names:
                    state[clean_name(name)] = module.get_parameter(name).detach().clone().cpu()
        return state
    return {
        clean_name(name): (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
        for name, p in module.named_parameters()
        if p.requires_grad
    }


def scatter_trainable(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy whole tensors into ``module``'s (possibly sharded) trainable parameters; every rank holds ``state``.

    Names that are not trainable parameters here are left alone: the module's ``on_load_checkpoint``
    reports them. A shape mismatch is an error that names the tensor.
    """
    if FullyShardedDataParallel.fsdp_modules(module):
        # The root must initialise before any inner unit is unsharded (a resume comes before the first forward);
        # this gathers the root unit's own weights (embeddings, head) once.
        with FullyShardedDataParallel.summon_full_params(module, recurse=False, writeback=False):
            pass
        for unit, names in _fsdp1_owners(module).items():
            with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=True), torch.no_grad():
                for name in names:
                    if clean_name(name) in state:
                        param = module.get_parameter(name)
                        param.copy_(_checked(state, clean_name(name), param.shape))
        return
    with torch.no_grad():
        for name, param in module.named_parameters():
            key = clean_name(name)
            if not param.requires_grad or key not in state:
                continue
            full = _checked(state, key, param.shape).to(device=param.device, dtype=param.dtype)
            if isinstance(param, DTensor):
                local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
                param.to_local().copy_(local.to_local())
            else:
                param.copy_(full)


def gather_optimizer_state(module: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """The optimizer's full state in PyTorch's own format, on the CPU; a collective.

    Parameters are numbered in the optimizer's own order, whatever order FSDP reports them in. The
    states are gathered on the device and copied here: FSDP1's own CPU offload returns views of one
    reused buffer when the device is the CPU.
    """
    by_name = get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True))
    native = optimizer.state_dict()  # hyperparameters and numbering; its state holds local shards only
    index = {name: i for i, name in enumerate(_optimizer_names(module, optimizer))}
    state = {
        index[name]: {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for name, s in by_name["state"].items()
    }
    return {"state": state, "param_groups": native["param_groups"]}


def scatter_optimizer_state(module: nn.Module, optimizer: Optimizer, saved: Mapping[str, Any]) -> None:
    """Load an optimizer state in PyTorch's own format into the optimizer of a sharded ``module``.

    Saved parameters are matched to the optimizer's by position, as ``Optimizer.load_state_dict`` does.
    """
    current = _optimizer_names(module, optimizer)
    saved_ids = [i for group in saved["param_groups"] for i in group["params"]]
    if len(saved_ids) != len(current):
        raise ValueError(
            f"the checkpoint's optimizer state covers {len(saved_ids)} parameters, this optimizer has "
            f"{len(current)}; it was saved with another model.adapter, model.molora or backbone"
        )
    name_of = dict(zip(saved_ids, current))
    by_name = {
        "state": {name_of[i]: value for i, value in saved["state"].items()},
        "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in saved["param_groups"]],
    }
    set_optimizer_state_dict(module, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _optimizer_names(module: nn.Module, optimizer: Optimizer) -> list[str]:
    """The clean names of the optimizer's parameters, in its own order."""
    names = {p: clean_name(n) for n, p in module.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A single-file checkpoint on the CPU; a directory (a sharded checkpoint) is an error that says why."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{path} is a sharded (distributed) checkpoint directory; the MoEI strategies resume from the "
            "single-file adapter checkpoints they write. Export its adapters with `python -m moei_lightning "
            "export` instead"
        )
    return read_checkpoint_file(path)


class _AdapterCheckpoints:
    """Strategy overrides: save and load adapter tensors and optimizer state only, as one file on rank 0."""

    model: nn.Module | None
    optimizers: list[Optimizer]

    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert self.model is not None
        return gather_trainable(self.model)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        assert self.model is not None
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        return gather_optimizer_state(self.model, optimizer)

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        assert self.model is not None
        checkpoint = read_checkpoint(self.broadcast(checkpoint_path))  # type: ignore[attr-defined]
        scatter_trainable(self.model, checkpoint["state_dict"])
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            if isinstance(optimizer, LightningOptimizer):
                optimizer = optimizer.optimizer
            scatter_optimizer_state(self.model, optimizer, state)
        return checkpoint

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Nothing to do: :meth:`load_checkpoint` already loaded the adapters into their shards."""

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Nothing to do: :meth:`load_checkpoint` already loaded the optimizer state into its shards."""


class MoEIFSDP2Strategy(_AdapterCheckpoints, ModelParallelStrategy):
    """FSDP2 over every rank (no tensor parallelism), saving adapter-only single-file checkpoints.

    Args:
        layer_classes: class paths of the decoder blocks that each get ``fully_shard``; ``None`` takes
            the model's own (``_no_split_modules``: ``LlamaDecoderLayer``, ``T5Block``).
        reshard_after_forward: free each block's gathered weights after its forward and gather them
            again in backward (ZeRO-3); ``False`` keeps them until backward ends (ZeRO-2: faster,
            holds a block's full weights per block in flight).
        process_group_backend: ``nccl`` on GPUs and ``gloo`` on CPUs unless set.
        timeout: collective timeout.
    """

    def __init__(
        self,
        layer_classes: list[str] | None = None,
        reshard_after_forward: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            save_distributed_checkpoint=False, process_group_backend=process_group_backend, timeout=timeout
        )
        self.layer_classes = layer_classes
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # Every rank is one data-parallel shard; MoEI has no tensor-parallel plan.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


class MoEIFSDPStrategy(_AdapterCheckpoints, FSDPStrategy):
    """Lightning's FSDP (FSDP1) with adapters in units of their own and adapter-only checkpoints. GPUs only.

    Args:
        auto_wrap_policy: class paths of the decoder blocks to wrap as FSDP units; ``None`` takes the
            model's own (``_no_split_modules``). Each MoLoRA block and its base layer are always units.
        activation_checkpointing_policy: class paths of the blocks to recompute in backward
            (non-reentrant ``checkpoint_wrapper``). When set, it replaces the backbone's own
            ``model.backbone.gradient_checkpointing``, so no block is recomputed twice.
        sharding_strategy: ``FULL_SHARD`` (ZeRO-3), ``SHARD_GRAD_OP`` (ZeRO-2), ``HYBRID_SHARD``
            (shard within a node, replicate across nodes) or ``NO_SHARD``.
        cpu_offload: keep shards and their gradients in CPU memory.
        limit_all_gathers: gather at most two units ahead, which bounds peak memory.
        forward_prefetch: gather the next unit during the current unit's forward (faster, more memory).
        process_group_backend: ``nccl`` unless set.
        timeout: collective timeout.

    Mixed precision is autocast only (``trainer.precision: bf16-mixed``): FSDP keeps every unit in
    its own dtype, so adapters, their gradients and the gradient reduction stay fp32.
    """

    def __init__(
        self,
        auto_wrap_policy: list[str] | None = None,
        activation_checkpointing_policy: list[str] | None = None,
        sharding_strategy: str = "FULL_SHARD",
        cpu_offload: bool = False,
        limit_all_gathers: bool = True,
        forward_prefetch: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            sharding_strategy=sharding_strategy,
            cpu_offload=cpu_offload,
            process_group_backend=process_group_backend,
            timeout=timeout,
            state_dict_type="full",
            limit_all_gathers=limit_all_gathers,
            forward_prefetch=forward_prefetch,
        )
        self.layer_class_paths = auto_wrap_policy
        self.checkpoint_class_paths = activation_checkpointing_policy

    @property
    def mixed_precision_config(self) -> None:
        return None

    def setup(self, trainer: Trainer) -> None:
        """Wrap the model before Lightning's setup, which keeps a model it finds wrapped: units from the
        adapter-aware policy, and ``device_id`` the device itself, so CPU ranks (gloo) work too."""
        assert self.model is not None
        if not any(isinstance(m, FullyShardedDataParallel) for m in self.model.modules()):
            self.model = self.wrap(self.precision_plugin.convert_module(self.model))
        super().setup(trainer)

    def wrap(self, model: nn.Module) -> FullyShardedDataParallel:
        """``model`` in FSDP1 units, with activation checkpointing on the blocks the strategy names."""
        wrapped = FullyShardedDataParallel(
            module=model,
            auto_wrap_policy=adapter_wrap_policy(model, self.layer_class_paths),
            cpu_offload=self.cpu_offload,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,
            **self.kwargs,
        )
        if self.checkpoint_class_paths:
            classes = block_classes(model, self.checkpoint_class_paths)
            if any(disable_activation_checkpointing(m) for m in model.modules() if isinstance(m, PreTrainedModel)):
                rank_zero_info(
                    "activation checkpointing: the strategy's checkpoint_wrapper on "
                    f"{', '.join(c.__name__ for c in classes)} replaces model.backbone.gradient_checkpointing"
                )
            apply_activation_checkpointing(
                wrapped, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: isinstance(m, classes)
            )
        return wrapped


def adapter_wrap_policy(model: nn.Module, class_paths: list[str] | None) -> Any:
    """FSDP1 auto-wrap: decoder blocks, each MoLoRA block and, inside it, its frozen base layer.

    Each unit then holds one dtype: the base layer bf16 (frozen), the MoLoRA unit fp32 adapters
    (trainable), the block the rest of the frozen layer.
    """
    from torch.distributed.fsdp.wrap import CustomPolicy

    blocks = block_classes(model, class_paths)
    base_layers = {m.base_layer for m in model.modules() if isinstance(m, MoLoRALinear)}
    return CustomPolicy(lambda m: isinstance(m, (*blocks, MoLoRALinear)) or m in base_layers)


def _fsdp1_owners(module: nn.Module) -> dict[nn.Module, list[str]]:
    """Trainable parameter names grouped by the FSDP1 unit that owns them, in a fixed order."""
    owners: dict[nn.Module, list[str]] = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            unit_path = name.rpartition(_FSDP1_UNIT)[0].removesuffix(".")
            owners.setdefault(module.get_submodule(unit_path) if unit_path else module, []).append(name)
    return owners


def _checked(state: Mapping[str, torch.Tensor], key: str, shape: torch.Size) -> torch.Tensor:
    tensor = state[key]
    if tensor.shape != shape:
        raise ValueError(
            f"checkpoint tensor {key} has shape {tuple(tensor.shape)}, the model's has {tuple(shape)}; "
            "it was saved with another model.molora or backbone"
        )
    return tensor
