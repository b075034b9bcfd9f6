"""The frozen backbone: load a Hugging Face model and tokenizer, or a tiny offline preset.

The built presets (`tiny-llama`, `tiny-t5`) mirror the real families (LLaMA-2-Chat, T5) in miniature so
that tests and demos exercise the same code paths without any download. Their tokenizers are SentencePiece
models trained on the bundled sample data and cached on disk; their weights come from a fixed seed, so
every process that builds a preset gets identical weights.

The shipped preset `tiny-llama-gi` is a tiny LLaMA pretrained on the synthetic GI world
(docs/synthetic.md), stored inside the package as a `save_pretrained` directory and loaded through the
ordinary `from_pretrained` path.

One module per job: :mod:`.config` (BackboneConfig), :mod:`.loading` (model and tokenizer, frozen),
:mod:`.skeleton` (the meta-device model), :mod:`.hub` (hub ids, offline cache, local and shipped
directories, MoLoRA exports), :mod:`.presets` (which presets exist), :mod:`.built_presets` (the tiny
random models) and :mod:`.tokenizer_training` (their SentencePiece tokenizers).
"""

from moei_lightning.backbone.built_presets import LLAMA2_CHAT_TEMPLATE
from moei_lightning.backbone.config import BackboneConfig, DtypeOption, Kind, KindOption
from moei_lightning.backbone.hub import BACKBONE_MODEL_TYPE_KEY, MOLORA_MODEL_TYPE
from moei_lightning.backbone.loading import (
    disable_activation_checkpointing,
    load_backbone,
    load_tokenizer,
    local_path,
    resolve_kind,
)
from moei_lightning.backbone.presets import PRESETS, SHIPPED_PRESETS
from moei_lightning.backbone.skeleton import backbone_skeleton
from moei_lightning.backbone.tokenizer_training import train_sentencepiece

__all__ = [
    "BACKBONE_MODEL_TYPE_KEY",
    "LLAMA2_CHAT_TEMPLATE",
    "MOLORA_MODEL_TYPE",
    "PRESETS",
    "SHIPPED_PRESETS",
    "BackboneConfig",
    "DtypeOption",
    "Kind",
    "KindOption",
    "backbone_skeleton",
    "disable_activation_checkpointing",
    "load_backbone",
    "load_tokenizer",
    "local_path",
    "resolve_kind",
    "train_sentencepiece",
]
