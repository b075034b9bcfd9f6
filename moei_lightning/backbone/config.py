"""BackboneConfig: which pretrained transformer to adapt and how to load it (the `model.backbone` section)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Kind = Literal["causal", "seq2seq"]
KindOption = Literal["causal", "seq2seq", "auto"]
DtypeOption = Literal["float32", "bfloat16", "float16", "auto"]


@dataclass
class BackboneConfig:
    """Which pretrained transformer to adapt and how to load it.

    Args:
        name_or_path: A Hugging Face hub id, a local directory written by `save_pretrained`, or a preset
            (`tiny-llama`, `tiny-t5`: tiny random models for tests, built offline; `tiny-llama-gi`: a tiny
            LLaMA pretrained on the synthetic GI tasks, shipped in the package).
        kind: `causal` (decoder-only LM), `seq2seq` (encoder-decoder) or `auto` to read it from the model
            config (`is_encoder_decoder`).
        dtype: Parameter dtype of the frozen backbone; `auto` keeps the checkpoint's own dtype.
        attn_implementation: Attention kernel, e.g. `eager`, `sdpa` or `flash_attention_2`; None lets
            transformers choose.
        trust_remote_code: Allow model code shipped with the checkpoint to run (needed by some hub models).
        tokenizer_name_or_path: Where the tokenizer comes from, if not from `name_or_path`.
        gradient_checkpointing: Recompute activations in the backward pass (non-reentrant) to save memory.
    """

    name_or_path: str = "tiny-llama"
    kind: KindOption = "auto"
    dtype: DtypeOption = "float32"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    tokenizer_name_or_path: str | None = None
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for field, allowed in (("kind", get_args(KindOption)), ("dtype", get_args(DtypeOption))):
            if getattr(self, field) not in allowed:
                raise ValueError(f"backbone.{field}={getattr(self, field)!r} is not one of {allowed}")
