"""The built presets `tiny-llama` and `tiny-t5`: the real families (LLaMA-2-Chat, T5) in miniature.

Tests and demos exercise the same code paths as with the real models, without any download. Their
tokenizers come from :mod:`.tokenizer_training`; their weights from a fixed seed, so every process
that builds a preset gets identical weights.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    LlamaConfig,
    LlamaTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
    T5Tokenizer,
)

from moei_lightning.backbone.config import Kind
from moei_lightning.backbone.hub import DTYPE_KWARG
from moei_lightning.backbone.tokenizer_training import trained_spm_dir

_PRESET_SEED = 0

# The LLaMA-2-Chat prompt format: `<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s>`.
# The rendered text already starts with BOS, so tokenize it with `add_special_tokens=False`.
LLAMA2_CHAT_TEMPLATE = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system_message = messages[0]['content'] -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set system_message = none -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('LLaMA-2-Chat turns must alternate user/assistant, starting with user') -}}
    {%- endif -%}
    {%- if message['role'] == 'user' -%}
        {%- if loop.first and system_message is not none -%}
            {%- set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] -%}
        {%- else -%}
            {%- set content = message['content'] -%}
        {%- endif -%}
        {{- bos_token + '[INST] ' + content | trim + ' [/INST]' -}}
    {%- else -%}
        {{- ' ' + message['content'] | trim + ' ' + eos_token -}}
    {%- endif -%}
{%- endfor -%}
"""


def preset_tokenizer(preset: str) -> PreTrainedTokenizerBase:
    """The preset's tokenizer as the real family ships it (LLaMA: BOS added, chat template, no pad)."""
    directory = trained_spm_dir(preset)
    if preset == "tiny-llama":
        tokenizer = LlamaTokenizer.from_pretrained(directory, add_bos_token=True, add_eos_token=False)
        tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
        return tokenizer
    return T5Tokenizer.from_pretrained(directory)


def tiny_config(
    kind: Kind, vocab_size: int, pad: int, eos: int, bos: int | None = None, **sizes: Any
) -> PretrainedConfig:
    """The tiny presets' architecture: a 2-layer, 64-wide LLaMA (``causal``) or T5 (``seq2seq``); ``sizes``
    overrides any config field (the GI-pretrained preset is wider and deeper)."""
    if kind == "causal":
        fields = {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 512,
            "initializer_range": 0.2,  # wide enough logits that adapters on a frozen random model visibly learn
        }
        return LlamaConfig(
            **fields | sizes, vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad
        )
    fields = {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4, "d_kv": 16}
    fields["dropout_rate"] = 0.0  # like LLaMA: train-mode forwards stay deterministic across processes
    ids = {"pad_token_id": pad, "eos_token_id": eos, "decoder_start_token_id": pad}
    return T5Config(**fields | sizes, vocab_size=vocab_size, **ids)


def preset_model(preset: str, attn_implementation: str | None) -> PreTrainedModel:
    """A tiny random-init model; a fixed seed on a forked RNG gives identical weights in every process."""
    tokenizer = preset_tokenizer(preset)
    if preset == "tiny-llama":  # pad: the one load_tokenizer chooses
        config = tiny_config(
            "causal", len(tokenizer), tokenizer.unk_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id
        )
        auto_class = AutoModelForCausalLM
    else:
        config = tiny_config("seq2seq", len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        auto_class = AutoModelForSeq2SeqLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_PRESET_SEED)
        return auto_class.from_config(config, attn_implementation=attn_implementation, **{DTYPE_KWARG: torch.float32})
