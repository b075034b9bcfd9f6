"""Load the frozen backbone and its tokenizer from a `BackboneConfig`: a preset, a local directory or a hub id."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from moei_lightning.backbone.built_presets import preset_model, preset_tokenizer
from moei_lightning.backbone.config import BackboneConfig, Kind
from moei_lightning.backbone.hub import DTYPE_KWARG, load_pretrained, location
from moei_lightning.backbone.presets import BUILT_PRESETS, PRESETS, cache_root


def resolve_kind(config: BackboneConfig | PretrainedConfig) -> Kind:
    """`causal` or `seq2seq`; `kind="auto"` reads `is_encoder_decoder` from the model's HF config."""
    if isinstance(config, BackboneConfig):
        if config.kind != "auto":
            return config.kind
        if config.name_or_path in PRESETS:
            return PRESETS[config.name_or_path]
        config = load_pretrained(
            AutoConfig.from_pretrained, config.name_or_path, "config", trust_remote_code=config.trust_remote_code
        )
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def load_tokenizer(cfg: BackboneConfig) -> PreTrainedTokenizerBase:
    """The backbone's tokenizer, with a pad token; causal tokenizers pad on the right.

    LLaMA ships without a pad token: the unknown token is used (else EOS), because a collator that masks
    labels by pad id would otherwise also hide the real EOS the model must learn to emit. Right padding
    keeps prompt+target sequences aligned for training; generation code switches to left padding itself.
    """
    source = cfg.tokenizer_name_or_path or cfg.name_or_path
    if source in BUILT_PRESETS:
        tokenizer = preset_tokenizer(source)
    else:
        tokenizer = load_pretrained(
            AutoTokenizer.from_pretrained, location(source), "tokenizer", trust_remote_code=cfg.trust_remote_code
        )
    if tokenizer.pad_token is None:
        fallback = tokenizer.unk_token or tokenizer.eos_token
        if fallback is None:
            raise ValueError(
                f"The tokenizer from '{source}' has no pad, unk or eos token to pad with; "
                "add one to its tokenizer_config.json or use backbone.tokenizer_name_or_path"
            )
        tokenizer.pad_token = fallback
    if resolve_kind(cfg) == "causal":
        tokenizer.padding_side = "right"
    return tokenizer


def load_backbone(cfg: BackboneConfig, device: str | torch.device | None = None) -> PreTrainedModel:
    """The frozen backbone (every parameter has `requires_grad=False`), in eval mode, on `device`.

    Hub and local checkpoints are read straight onto `device`, so a GPU rank never holds a CPU copy.
    """
    kind = resolve_kind(cfg)
    if cfg.name_or_path in BUILT_PRESETS:
        model = preset_model(cfg.name_or_path, cfg.attn_implementation)
        if cfg.dtype != "auto":  # a preset's own dtype is float32
            model.to(getattr(torch, cfg.dtype))
    else:
        auto_class = AutoModelForCausalLM if kind == "causal" else AutoModelForSeq2SeqLM
        model = load_pretrained(
            auto_class.from_pretrained,
            location(cfg.name_or_path),
            "model",
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
            # Always explicit: transformers 5 defaults to "auto" and 4.x to float32.
            **{DTYPE_KWARG: cfg.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)},
            **({"device_map": {"": str(device)}} if device is not None else {}),
        )
    return frozen(model, cfg, device)


def frozen(model: PreTrainedModel, cfg: BackboneConfig, device: str | torch.device | None) -> PreTrainedModel:
    """Freeze, switch to eval mode, enable activation checkpointing if asked, move to `device`."""
    model.requires_grad_(False)
    model.eval()
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing backpropagates into adapters even when no input requires grad.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23 deprecates the old name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if device is not None:
        model.to(device)
    return model


def disable_activation_checkpointing(model: PreTrainedModel) -> bool:
    """Turn the model's own activation checkpointing off; True if it was on."""
    if hasattr(model, "is_activation_checkpointing"):  # transformers >= 5.23 deprecates the old names
        enabled = model.is_activation_checkpointing
        if enabled:
            model.activation_checkpointing_disable()
        return enabled
    enabled = model.is_gradient_checkpointing
    if enabled:
        model.gradient_checkpointing_disable()
    return enabled


def local_path(name: str) -> str:
    """A name that any library's ``from_pretrained`` can read for the backbone ``name``.

    Other tools (PEFT's ``AutoPeftModel``) know no presets: a shipped preset is its package directory,
    a built preset is written once under the cache (``$MOEI_CACHE/backbones/<name>``), a local directory
    is its absolute path, and a hub id stays as it is.
    """
    if name in BUILT_PRESETS:
        directory = cache_root() / "backbones" / name
        if not (directory / "config.json").is_file():
            staging = directory.with_name(f".{name}.partial-{os.getpid()}")
            config = BackboneConfig(name_or_path=name)
            load_backbone(config).save_pretrained(staging)
            load_tokenizer(config).save_pretrained(staging)
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(staging, directory)
        return str(directory)
    if Path(name).is_dir():
        return str(Path(name).resolve())
    return location(name)
