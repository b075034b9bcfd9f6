"""Adapter checkpoint size vs backbone size for a config, computed on the ``meta`` device (no weights needed).

    python benchmarks/checkpoint_size.py --config conf/llama2-13b.yaml

The architecture comes from the backbone's ``config.json`` when ``model.backbone.name_or_path`` is
a local directory, else from ``moei_lightning.architectures.PUBLISHED``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig

from moei_lightning.architectures import PUBLISHED
from moei_lightning.config_parser import resolve_bases
from moei_lightning.module import adapter_config
from moei_lightning.molora import MoLoRAConfig, inject_molora

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def architecture(name_or_path: str) -> PretrainedConfig:
    if Path(name_or_path).is_dir():
        return AutoConfig.from_pretrained(name_or_path)
    if name_or_path not in PUBLISHED:
        raise SystemExit(f"{name_or_path} is neither a local directory nor one of {sorted(PUBLISHED)}")
    return PUBLISHED[name_or_path]


def sizes(config_path: Path) -> dict[str, float]:
    """Parameter counts and bytes of the frozen backbone, the adapters, and a training checkpoint."""
    model_cfg = resolve_bases(config_path)["model"]  # the file with its base: files merged beneath it
    backbone_cfg = model_cfg["backbone"]
    hf_config = architecture(backbone_cfg["name_or_path"])
    auto = AutoModelForSeq2SeqLM if hf_config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(hf_config)
    backbone_params = sum(p.numel() for p in model.parameters())
    molora = adapter_config(model_cfg.get("adapter", "molora"), MoLoRAConfig.from_dict(model_cfg.get("molora") or {}))
    inject_molora(model, molora)
    adapter_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    backbone_bytes = backbone_params * BYTES[backbone_cfg.get("dtype", "float32")]
    adapter_bytes = adapter_params * 4  # adapters are stored in fp32
    return {
        "backbone_params": backbone_params,
        "backbone_bytes": backbone_bytes,
        "adapter_params": adapter_params,
        "adapter_bytes": adapter_bytes,
        "training_checkpoint_bytes": 3 * adapter_bytes,  # + AdamW's two moments per adapter tensor
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("conf/llama2-13b.yaml"))
    s = sizes(parser.parse_args().config)
    gb = 1e9
    print(f"backbone:                  {s['backbone_params']:>15,} params  {s['backbone_bytes'] / gb:8.2f} GB")
    print(f"adapters (export):         {s['adapter_params']:>15,} params  {s['adapter_bytes'] / gb:8.3f} GB")
    print(f"adapter / backbone:        {s['adapter_bytes'] / s['backbone_bytes']:.2%}")
    print(f"training checkpoint:       {s['training_checkpoint_bytes'] / gb:8.3f} GB (adapters + AdamW moments)")
    print(f"training ckpt / backbone:  {s['training_checkpoint_bytes'] / s['backbone_bytes']:.2%}")


if __name__ == "__main__":
    main()
