"""FSDP2 for MoEI: per-parameter sharding of a frozen backbone with fp32 adapters.

Every rank builds the backbone and its adapters on the meta device, shards each decoder block and
then the root with ``fully_shard``, and allocates only its own shards. Rank 0 alone loads the
pretrained weights (and initialises the adapters, so a sharded run starts from the same adapters
as a one-process run under the same seed) and broadcasts them tensor by tensor; no other rank ever
holds a full copy. Sharding is per parameter, so bf16 frozen weights and fp32 adapters live in
the same block; only the adapters have gradients, so the reduce-scatter after backward moves
adapter-sized gradients only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, fully_shard


def block_classes(model: nn.Module, class_paths: list[str] | None = None) -> tuple[type[nn.Module], ...]:
    """The decoder-block classes to shard (and to wrap under FSDP1): ``class_paths``, else the model's own.

    Hugging Face models name their blocks in ``_no_split_modules`` (``LlamaDecoderLayer``, ``T5Block``);
    ``model`` may contain the Hugging Face model (a LightningModule does).
    """
    if class_paths:
        return tuple(import_class(path) for path in class_paths)
    names = {name for m in model.modules() for name in getattr(m, "_no_split_modules", None) or ()}
    classes = tuple({type(m) for m in model.modules() if type(m).__name__ in names})
    if not classes:
        raise ValueError(
            f"{type(model).__name__} names no decoder-block classes in _no_split_modules; list them by class path "
            "in the strategy's layer classes (e.g. transformers.models.llama.modeling_llama.LlamaDecoderLayer)"
        )
    return classes


def import_class(path: str) -> type[nn.Module]:
    """A module class from its dotted path, with an error that says which part is wrong."""
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"layer class {path!r} cannot be imported ({err}); give a full class path") from err
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"layer class {path!r} is not a torch.nn.Module subclass")
    return cls


def shard_model(
    build: Callable[[], nn.Module],
    skeleton: Callable[[], nn.Module],
    mesh: DeviceMesh,
    device: torch.device,
    layer_classes: list[str] | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """The model ``build`` returns, sharded over ``mesh`` with ``fully_shard`` on each block, then the root.

    ``skeleton`` must build the same modules on the meta device; every rank calls it, and only rank 0
    calls ``build``. Buffers that are not in the state dict (rotary frequencies) come from rank 0 too.
    ``mesh`` spans every rank: the weights come from global rank 0.
    """
    model = skeleton()
    classes = block_classes(model, layer_classes)
    for block in [m for m in model.modules() if isinstance(m, classes)]:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    model.to_empty(device=device)
    source = build() if dist.get_rank() == 0 else None
    full = source.state_dict() if source is not None else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    source_buffers = dict(source.named_buffers()) if source is not None else {}
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if source is not None:
                buffer.copy_(source_buffers[name])
            dist.broadcast(buffer, src=0)
    del source, full
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        _first_forward_through_root(model)
    return model


def _first_forward_through_root(model: nn.Module) -> None:
    """Run one 1-token forward through the root, so FSDP2 knows its root before ``generate`` calls the encoder.

    FSDP2 sets up its hooks on the first forward and requires that one to go through the root;
    ``generate`` on an encoder-decoder model calls the encoder directly first.
    """
    device = next(model.parameters()).device
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        model(input_ids=token, attention_mask=torch.ones_like(token), decoder_input_ids=token)


@contextmanager
def gathered_root(model: nn.Module) -> Iterator[None]:
    """Keep an FSDP2 root's own weights (embeddings, final norm, head) gathered inside the block; else nothing.

    Each block gathers its weights in its own forward, but the root's are gathered only by the root's
    forward, and ``generate`` on an encoder-decoder model calls the encoder without it. Every rank
    must enter the block together.
    """
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def root_parameters_gathered(model: nn.Module) -> AbstractContextManager:
    """Under FSDP1, the root unit's own parameters (embeddings, final norm, LM head) stay sharded outside
    the root's forward, and the evaluation calls the inner Hugging Face model directly; gather them for
    its duration. Inner units gather their own parameters in their forward; other strategies need nothing.
    """
    roots = FullyShardedDataParallel.fsdp_modules(model, root_only=True)
    stack = ExitStack()
    for root in roots:
        stack.enter_context(FullyShardedDataParallel.summon_full_params(root, recurse=False, writeback=False))
    return stack
