"""The backbone on the meta device: modules and shapes as `load_backbone` builds them, no weights read."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig, PreTrainedModel

from moei_lightning.backbone.built_presets import preset_model
from moei_lightning.backbone.config import BackboneConfig
from moei_lightning.backbone.hub import DTYPE_KWARG, load_pretrained, location
from moei_lightning.backbone.loading import frozen, resolve_kind
from moei_lightning.backbone.presets import BUILT_PRESETS


def backbone_skeleton(cfg: BackboneConfig) -> PreTrainedModel:
    """The backbone as `load_backbone` returns it, but on the meta device: modules and shapes, no weights read.

    Sharded strategies build this on every rank and fill it from rank 0's `load_backbone`, so no other
    rank ever holds the pretrained weights in full.
    """
    with torch.device("meta"):
        if cfg.name_or_path in BUILT_PRESETS:
            model = preset_model(cfg.name_or_path, cfg.attn_implementation)
            dtype = torch.float32 if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        else:
            config = load_pretrained(
                AutoConfig.from_pretrained,
                location(cfg.name_or_path),
                "config",
                trust_remote_code=cfg.trust_remote_code,
            )
            dtype = _checkpoint_dtype(config) if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
            auto_class = AutoModelForCausalLM if resolve_kind(config) == "causal" else AutoModelForSeq2SeqLM
            model = auto_class.from_config(
                config,
                attn_implementation=cfg.attn_implementation,
                trust_remote_code=cfg.trust_remote_code,
                **{DTYPE_KWARG: dtype},
            )
        model.to(dtype)
    return frozen(model, cfg, None)


def _checkpoint_dtype(config: PretrainedConfig) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in, as `dtype="auto"` would load them."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype
