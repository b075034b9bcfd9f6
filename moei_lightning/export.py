"""``python -m moei_lightning export CKPT OUTPUT_DIR``: a training checkpoint's adapters as an adapter directory.

The checkpoint already holds only trainable tensors, so no backbone is loaded: this works for a
13B run on a laptop. The directory is what :func:`moei_lightning.molora.load_adapter` reads.
Every strategy of this project writes a single file (sharded runs gather the adapters into it);
a sharded checkpoint directory that Lightning's own ``ModelParallelStrategy`` or
``FSDPStrategy(state_dict_type="sharded")`` writes is read too, adapter tensors only.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from moei_lightning.module import adapter_config
from moei_lightning.molora import MoLoRAConfig, write_adapter

ADAPTER_PARAMS = ("lora_A", "lora_B", "router.weight", "gate.weight", "gate.bias")
MODULE_PREFIX = "model."  # MoEIModule keeps the Hugging Face model under .model
SHARDED_METADATA = "meta.pt"  # Lightning's non-tensor checkpoint entries in a sharded checkpoint directory
SHARDED_MODEL_KEYS = ("state_dict", "model")  # ModelParallelStrategy's and FSDPStrategy's name for the weights


def export_checkpoint(checkpoint_path: str | Path, output_dir: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for the adapters in a checkpoint."""
    checkpoint = load_checkpoint(checkpoint_path)
    hparams = checkpoint.get("hyper_parameters", {})
    adapter = hparams.get("adapter", "molora")
    if adapter == "full":
        raise ValueError(f"{checkpoint_path} is a full fine-tune (model.adapter: full): it has no adapters to export")
    config = adapter_config(adapter, MoLoRAConfig.from_dict(hparams.get("molora") or {}))
    tensors = {}
    for key, tensor in checkpoint["state_dict"].items():
        if not key.startswith(MODULE_PREFIX) or not key.endswith(ADAPTER_PARAMS):
            raise ValueError(f"{checkpoint_path}: tensor {key!r} is not a MoLoRA adapter tensor")
        tensors[key.removeprefix(MODULE_PREFIX)] = tensor
    if not tensors:
        raise ValueError(f"{checkpoint_path} holds no adapter tensors")
    base = {"name_or_path": (hparams.get("backbone") or {}).get("name_or_path"), "checkpoint": str(checkpoint_path)}
    return write_adapter(output_dir, config, tensors, base)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint, loaded on the CPU: a file, or a sharded directory (its adapter tensors only)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return load_sharded_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=False)


def load_sharded_checkpoint(path: Path) -> dict[str, Any]:
    """Lightning's entries of a sharded checkpoint directory, with ``state_dict`` holding its adapter tensors.

    Only adapter tensors are read from the shards, so no backbone weight is loaded, in one process.
    """
    if not (path / SHARDED_METADATA).is_file():
        raise FileNotFoundError(
            f"{path} is a directory without {SHARDED_METADATA}: not a checkpoint written by "
            "`python -m moei_lightning fit`"
        )
    checkpoint = torch.load(path / SHARDED_METADATA, map_location="cpu", weights_only=False)
    reader = dcp.FileSystemReader(path)
    wanted = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
        and key.partition(".")[0] in SHARDED_MODEL_KEYS
        and key.endswith(ADAPTER_PARAMS)
    }
    if wanted:
        with warnings.catch_warnings():  # one process on purpose: no process group to warn about
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(wanted, storage_reader=reader, no_dist=True)
    checkpoint["state_dict"] = {key.partition(".")[2]: tensor for key, tensor in wanted.items()}
    return checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moei_lightning export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a .ckpt written by `python -m moei_lightning fit`")
    parser.add_argument("output_dir", help="directory to write adapter_config.json and adapter_model.safetensors to")
    args = parser.parse_args(argv)
    try:
        directory = export_checkpoint(args.checkpoint, args.output_dir)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"adapters written to {directory}")
