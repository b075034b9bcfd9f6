"""``python -m moei_lightning export CKPT OUTPUT_DIR [--format moei|peft|merged|hf]``: a checkpoint, ready to use.

- ``moei`` (default): the adapters alone, as ``molora_config.json`` + ``molora_model.safetensors``. Only
  the checkpoint is read, no backbone: this works for a 13B run on a laptop.
- ``peft``: a ``model.adapter: lora`` run as a PEFT LoRA adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``), for ``PeftModel.from_pretrained`` and for servers that load LoRA adapters.
- ``merged``: the backbone with the adapters added into its weights (``lora``) or the fine-tuned weights
  (``full``), as a ``save_pretrained`` directory with the tokenizer: any Hugging Face stack serves it.
- ``hf``: a self-contained ``save_pretrained`` directory. MoLoRA adapters route per input and cannot be
  merged, so they stay beside the backbone's files; ``lora`` and ``full`` are merged as above.

Each directory also gets ``moei_export.json`` (adapter, backbone settings, prompt settings, checkpoint),
from which :func:`moei_lightning.from_pretrained` loads any of them in one call.

Every strategy of this project writes a single checkpoint file (sharded runs gather the adapters
into it); a sharded checkpoint directory that Lightning's own ``ModelParallelStrategy`` or
``FSDPStrategy(state_dict_type="sharded")`` writes is read too, adapter tensors only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from moei_lightning.backbone import (
    BACKBONE_MODEL_TYPE_KEY,
    MOLORA_MODEL_TYPE,
    BackboneConfig,
    load_backbone,
    load_tokenizer,
    local_path,
    resolve_kind,
)
from moei_lightning.checkpoints import check_finite, read_checkpoint_file
from moei_lightning.module import adapter_config
from moei_lightning.molora import (
    MoLoRAConfig,
    inject_molora,
    is_static,
    load_adapter_state_dict,
    merge_molora,
    to_peft,
    write_adapter,
)
from moei_lightning.pretrained import EXPORT_FILE, FORMATS, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE

ADAPTER_PARAMS = ("lora_A", "lora_B", "router.weight", "gate.weight", "gate.bias")
MODULE_PREFIX = "model."  # MoEIModule keeps the Hugging Face model under .model
SHARDED_METADATA = "meta.pt"  # Lightning's non-tensor checkpoint entries in a sharded checkpoint directory
SHARDED_MODEL_KEYS = ("state_dict", "model")  # ModelParallelStrategy's and FSDPStrategy's name for the weights
PROMPT_KEYS = ("prompt_template", "system_prompt", "use_chat_template")
EXPORT_FILE_PATTERNS = (
    "molora_*",
    "adapter_config.json",
    "adapter_model.*",
    "config.json",
    "generation_config.json",
    "model*.safetensors*",
    "pytorch_model*.bin*",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "spiece.model",
)
"""Names of the files any format writes, for an export from before ``moei_export.json`` listed its files."""


def export_checkpoint(
    checkpoint_path: str | Path, output_dir: str | Path, format: str = "moei", overwrite: bool = False
) -> Path:
    """Write the checkpoint's model to ``output_dir`` in ``format`` (see the module docstring).

    An ``output_dir`` that already holds files is an error unless ``overwrite``: exporting over the
    adapters of another run would lose them without a word. With ``overwrite`` the files of the
    export that was there go, whatever its format, so none is read in place of the new ones; files
    no export wrote stay. The export is written beside ``output_dir`` first, so a failure leaves it as it was.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} exists and is not a directory; choose another output directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{output} already exists and is not empty; choose another directory or pass --overwrite to replace it"
        )
    checkpoint = load_checkpoint(checkpoint_path)
    hparams = checkpoint.get("hyper_parameters", {})
    adapter = hparams.get("adapter", "molora")
    backbone = BackboneConfig(**_as_dict(hparams.get("backbone")))
    molora_settings = MoLoRAConfig.from_dict(_as_dict(hparams.get("molora")))
    molora = None if adapter == "full" else adapter_config(adapter, molora_settings)
    tensors = _model_tensors(checkpoint, checkpoint_path, full=molora is None)
    info = {
        "format": format,
        "adapter": adapter,
        "kind": resolve_kind(backbone),
        "backbone": dataclasses.asdict(backbone),
        "prompt": {k: v for k, v in (checkpoint.get("datamodule_hyper_parameters") or {}).items() if k in PROMPT_KEYS},
        "checkpoint": str(checkpoint_path),
    }
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _write_format(format, checkpoint_path, adapter, backbone, molora, tensors, staging)
        info["files"] = sorted([*(p.name for p in staging.iterdir()), EXPORT_FILE])
        (staging / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")
        _install(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _write_format(
    format: str,
    checkpoint_path: str | Path,
    adapter: str,
    backbone: BackboneConfig,
    molora: MoLoRAConfig | None,
    tensors: dict[str, torch.Tensor],
    output_dir: Path,
) -> None:
    """The files of ``format`` (all but ``moei_export.json``) in ``output_dir``."""
    if format == "moei":
        if molora is None:
            raise ValueError(
                f"{checkpoint_path} is a full fine-tune (model.adapter: full): it has no adapters; "
                "export it with --format merged"
            )
        write_adapter(output_dir, molora, tensors, {"name_or_path": backbone.name_or_path})
    elif format == "peft":
        if molora is None or not is_static(molora):
            raise ValueError(
                f"{checkpoint_path} was trained with model.adapter: {adapter}; only a LoRA adapter "
                "(model.adapter: lora) has a PEFT format. Use --format "
                + ("merged" if molora is None else "moei (or hf, with the backbone)")
            )
        peft_config, peft_tensors = to_peft(
            molora, tensors, kind=resolve_kind(backbone), base_model_name_or_path=local_path(backbone.name_or_path)
        )
        (output_dir / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in peft_tensors.items()}, str(output_dir / PEFT_WEIGHTS_FILE))
    else:
        if format == "merged" and molora is not None and not is_static(molora):
            raise ValueError(
                f"{checkpoint_path}: MoLoRA adapters route each input (num_experts={molora.num_experts}, "
                f"inter={molora.inter!r}), so they have no fixed delta to merge into the weights; use --format hf "
                "(the backbone with the adapters beside it) or moei"
            )
        _save_pretrained(backbone, molora, tensors, output_dir)


def _install(staging: Path, output: Path) -> None:
    """Move a finished export from ``staging`` into ``output``, removing what an earlier export left there.

    ``moei_export.json`` goes first and comes back last, so a directory caught halfway is never
    mistaken for a whole export.
    """
    output.mkdir(parents=True, exist_ok=True)
    stale = _previous_export_files(output)
    (output / EXPORT_FILE).unlink(missing_ok=True)
    new = sorted(p.name for p in staging.iterdir() if p.name != EXPORT_FILE)
    for name in sorted(stale - set(new)):
        if (output / name).is_file() or (output / name).is_symlink():
            (output / name).unlink()
    for name in [*new, EXPORT_FILE]:
        os.replace(staging / name, output / name)


def _previous_export_files(output: Path) -> set[str]:
    """The files an earlier export wrote into ``output``: its own list, or (older exports) every export file name."""
    try:
        listed = json.loads((output / EXPORT_FILE).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    if isinstance(listed, list) and all(isinstance(name, str) and "/" not in name for name in listed):
        return set(listed)
    if not (output / EXPORT_FILE).is_file():
        return set()  # not an export: only the files the new one replaces are touched
    return {p.name for pattern in EXPORT_FILE_PATTERNS for p in output.glob(pattern)}


def _as_dict(saved: Any) -> dict[str, Any]:
    """A saved config section: a dict from the command line, the dataclass itself from Python, or absent."""
    if dataclasses.is_dataclass(saved) and not isinstance(saved, type):
        return dataclasses.asdict(saved)
    return dict(saved or {})


def _model_tensors(checkpoint: dict[str, Any], path: str | Path, *, full: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's model tensors by their name in the Hugging Face model."""
    tensors = {}
    for key, tensor in checkpoint["state_dict"].items():
        if not key.startswith(MODULE_PREFIX) or not (full or key.endswith(ADAPTER_PARAMS)):
            raise ValueError(f"{path}: tensor {key!r} is not a MoLoRA adapter tensor")
        tensors[key.removeprefix(MODULE_PREFIX)] = tensor
    if not tensors:
        raise ValueError(f"{path} holds no model tensors")
    return tensors


def _save_pretrained(
    backbone: BackboneConfig,
    molora: MoLoRAConfig | None,
    tensors: dict[str, torch.Tensor],
    output_dir: Path,
) -> None:
    """The backbone as a ``save_pretrained`` directory with the tokenizer; adapters merged where they can be."""
    model = load_backbone(backbone)
    if molora is None:
        _load_full(model, tensors)
    elif is_static(molora):
        inject_molora(model, molora)
        load_adapter_state_dict(model, tensors)
        merge_molora(model)
    model.save_pretrained(output_dir)
    load_tokenizer(backbone).save_pretrained(output_dir)
    if molora is not None and not is_static(molora):
        write_adapter(output_dir, molora, tensors, {"name_or_path": "."})
        # transformers alone would load the bare backbone and drop the adapters without a word: make it refuse
        config_path = output_dir / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config[BACKBONE_MODEL_TYPE_KEY] = config["model_type"]
        config["model_type"] = MOLORA_MODEL_TYPE
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _load_full(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """A full fine-tune's tensors into the backbone: every parameter must be there (tied ones once)."""
    names = {name for name, _ in model.named_parameters()}
    missing, extra = sorted(names - set(tensors)), sorted(set(tensors) - names)
    if missing or extra:
        raise ValueError(
            f"the checkpoint does not fit the backbone: missing {missing[:8]}, unexpected {extra[:8]}; "
            "was it trained with another model.backbone?"
        )
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(tensors[name])


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint, loaded on the CPU: a file, or a sharded directory (its adapter tensors only)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = load_sharded_checkpoint(path) if path.is_dir() else read_checkpoint_file(path)
    check_finite(checkpoint, path)
    return checkpoint


def load_sharded_checkpoint(path: Path) -> dict[str, Any]:
    """Lightning's entries of a sharded checkpoint directory, with ``state_dict`` holding its adapter tensors.

    Only adapter tensors are read from the shards, so no backbone weight is loaded, in one process.
    """
    if not (path / SHARDED_METADATA).is_file():
        raise FileNotFoundError(
            f"{path} is a directory without {SHARDED_METADATA}: not a checkpoint written by "
            "`python -m moei_lightning fit`"
        )
    checkpoint = read_checkpoint_file(path / SHARDED_METADATA)
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
    parser = argparse.ArgumentParser(
        prog="python -m moei_lightning export",
        description="Write a checkpoint in a format other tools read: MoLoRA adapters, a PEFT adapter or a "
        "save_pretrained model (docs/export.md).",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by `python -m moei_lightning fit`")
    parser.add_argument("output_dir", help="directory to write the export to")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="moei",
        help="moei: MoLoRA adapters only (default); peft: a LoRA run as a PEFT adapter; merged: a save_pretrained "
        "model with the adapters merged in (lora, full); hf: a self-contained save_pretrained directory",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the files in an existing output_dir")
    args = parser.parse_args(argv)
    try:
        directory = export_checkpoint(args.checkpoint, args.output_dir, args.format, overwrite=args.overwrite)
    except (OSError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"{args.format} export written to {directory}")
