"""Published configurations of the backbones the configs name, for full-size checks on the ``meta`` device.

Parameter counts, adapter sizes and memory arithmetic need the real shapes, not the weights: these
configs rebuild each architecture offline (``with torch.device("meta"): AutoModel.from_config(...)``).
The T5 configs tie ``lm_head`` to the shared embedding (untying it in transformers 5 also unties the
encoder and decoder embeddings), so their counts are one vocab x d_model matrix (65.8M for XL,
131.6M for XXL) below the released Flan-T5 checkpoints, whose head is separate.
"""

from __future__ import annotations

from transformers import LlamaConfig, PretrainedConfig, T5Config


def _llama(hidden: int, intermediate: int, layers: int, heads: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=32000,
    )


def _flan_t5(d_model: int, d_ff: int, heads: int) -> T5Config:
    return T5Config(
        d_model=d_model,
        d_ff=d_ff,
        d_kv=64,
        num_heads=heads,
        num_layers=24,
        num_decoder_layers=24,
        vocab_size=32128,
        feed_forward_proj="gated-gelu",
    )


PUBLISHED: dict[str, PretrainedConfig] = {
    "meta-llama/Llama-2-7b-chat-hf": _llama(4096, 11008, 32, 32),
    "meta-llama/Llama-2-13b-chat-hf": _llama(5120, 13824, 40, 40),
    "google/flan-t5-xl": _flan_t5(2048, 5120, 32),
    "google/flan-t5-xxl": _flan_t5(4096, 10240, 64),
}
