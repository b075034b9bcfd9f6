"""What the speed and memory scripts share: published widths, a random-init LLaMA, the common options."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moei_lightning.architectures import PUBLISHED

LLAMA2 = {"llama2-7b": "meta-llama/Llama-2-7b-chat-hf", "llama2-13b": "meta-llama/Llama-2-13b-chat-hf"}
WIDTH_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


def published_shapes(keys: tuple[str, ...] = WIDTH_KEYS) -> dict[str, dict[str, int]]:
    """LLaMA-2-7B's and 13B's ``keys`` as their published configs give them."""
    return {name: {key: getattr(PUBLISHED[hub_id], key) for key in keys} for name, hub_id in LLAMA2.items()}


def add_run_options(parser: argparse.ArgumentParser, shapes: dict[str, Any], default_shape: str, smoke: str) -> None:
    """``--shape`` (every shape but ``smoke``), ``--device``, ``--smoke`` (help: ``smoke``) and ``--json``."""
    parser.add_argument("--shape", choices=[s for s in shapes if s != "smoke"], default=default_shape)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--smoke", action="store_true", help=smoke)
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the settings and the results as JSON")


def require_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stop with a usage error when CUDA is asked for and absent."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu (with --smoke on a laptop)")


def random_llama(
    dims: dict[str, int], layers: int, device: str, dtype: torch.dtype, max_positions: int = 4096, **ids: int
) -> LlamaForCausalLM:
    """A frozen random-init LLaMA (seed 0) of width ``dims`` with ``layers`` blocks, built on ``device``
    (a GPU initialises billions of weights in a moment); ``ids``: special token ids for its config."""
    config = LlamaConfig(
        **{k: v for k, v in dims.items() if k != "num_hidden_layers"},
        num_hidden_layers=layers,
        num_key_value_heads=dims["num_attention_heads"],
        max_position_embeddings=max_positions,
        **ids,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.requires_grad_(False)
