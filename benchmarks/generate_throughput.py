"""Generation throughput with the key/value cache: MoEI (prompt routing) vs PEFT's LoRA vs the frozen backbone.

    python benchmarks/generate_throughput.py                        # LLaMA-2-7B width and depth, bf16, CUDA
    python benchmarks/generate_throughput.py --layers 8 --repeats 3 # quicker: per-layer costs set the ratios
    python benchmarks/generate_throughput.py --device cpu --smoke   # tiny, for CI: does the script still run?
    python benchmarks/generate_throughput.py --json result.json     # the table's numbers also as JSON

Every variant greedily continues the same prompts by exactly ``--new-tokens`` tokens (EOS is off),
with the key/value cache, through the project's generation path,
:func:`moei_lightning.runner.generate_texts` (what ``predict``, validation with
``generate_in_eval`` and ``python -m moei_lightning generate`` call). Variants, each on its own copy
of one random-init LLaMA of the chosen width:

- ``frozen``: the backbone alone, the floor any adapter pays;
- ``peft_lora_r64``: PEFT's LoRA of rank ``K*r`` (``get_peft_model``, fp32 adapters);
- ``moei_8x8_prompt``: MoLoRA (K experts of rank r, intra router, inter gate, prompt routing)
  through ``MoEIModule.generate``: each sequence is routed once from its prompt, and the cached
  decoding steps reuse that decision.

Both adapters sit on ``--targets``. With ``--dtype bfloat16`` the backbone is bf16, the adapters
fp32, and generation runs under bf16 autocast, as ``trainer.precision: bf16-mixed`` runs it.
Throughput is generated tokens per second of a whole ``generate`` call (prefill included). Batch
sizes run one after the other; within one, the variants run round-robin with the order rotated
every repeat, and each is compared with PEFT's LoRA per round (``x PEFT``: PEFT's time over the
variant's time, so above 1 is faster). This is a measurement: it exits 0 whether or not MoEI keeps up.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import WIDTH_KEYS, add_run_options, published_shapes, random_llama, require_device
from transformers import LlamaForCausalLM

from moei_lightning.backbone import BackboneConfig
from moei_lightning.module import MoEIModule
from moei_lightning.molora import MoLoRAConfig
from moei_lightning.runner import generate_texts

SHAPES = published_shapes((*WIDTH_KEYS, "num_hidden_layers"))
SHAPES["smoke"] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 1536,  # the tokenizer's 1500 ids fit
}
ALPHA = 16.0
TOKENIZER = "tiny-llama-gi"  # any LLaMA tokenizer shipped in the package: its ids fit every vocabulary here
SENTENCE = "Mira felt joy at the market because her friend had come back from a long journey. "


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's own)")
    parser.add_argument("--batch-sizes", default="1,16", help="prompts per generate call, comma-separated")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="tokens per prompt (about)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence")
    parser.add_argument("--experts", type=int, default=8, help="K")
    parser.add_argument("--rank", type=int, default=8, help="r; PEFT's LoRA gets rank K*r")
    parser.add_argument("--targets", default="q_proj,v_proj", help="adapted linear layers, comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds over all variants, per batch size")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    add_run_options(parser, SHAPES, "llama2-7b", "tiny width, 2 layers, 8 tokens: checks the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape, args.layers, args.prompt_tokens, args.new_tokens = "smoke", 2, 16, 8
        args.experts, args.rank, args.repeats = 2, 4, 2
    if args.layers is None:
        args.layers = SHAPES[args.shape]["num_hidden_layers"]
    require_device(parser, args)
    return args


def make_backbone(args: argparse.Namespace, tokenizer: Any) -> LlamaForCausalLM:
    """A random-init frozen LLaMA of the chosen width, EOS off so every call generates the same count."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id}
    model = random_llama(SHAPES[args.shape], args.layers, args.device, getattr(torch, args.dtype), **ids)
    model.generation_config.eos_token_id = None
    return model.eval()


def make_prompts(tokenizer: Any, count: int, tokens: int) -> list[str]:
    """``count`` different prompts of about ``tokens`` tokens each."""
    ids = tokenizer(SENTENCE * (tokens // 8 + 1), add_special_tokens=False)["input_ids"][:tokens]
    text = tokenizer.decode(ids)
    return [f"{i}. {text}" for i in range(count)]


def build(args: argparse.Namespace, backbone: LlamaForCausalLM, module: MoEIModule) -> dict[str, Callable[..., Any]]:
    """The variants by name: each takes prompts and returns their continuations."""
    from peft import LoraConfig, get_peft_model

    targets = args.targets.split(",")
    stacked = args.experts * args.rank
    tokenizer, new_tokens = module.tokenizer, args.new_tokens
    frozen = copy.deepcopy(backbone)
    lora = LoraConfig(r=stacked, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets)
    peft_model = get_peft_model(copy.deepcopy(backbone), lora).eval()  # keeps the adapters in fp32
    module.model = module._with_adapters(backbone)
    module.eval()

    def plain(model: torch.nn.Module) -> Callable[[list[str]], list[str]]:
        return lambda prompts: generate_texts(model, tokenizer, "causal", prompts, new_tokens, len(prompts))

    return {
        "frozen": plain(frozen),
        f"peft_lora_r{stacked}": plain(peft_model),
        f"moei_{args.experts}x{args.rank}_prompt": lambda prompts: module.generate(prompts, new_tokens),
    }


def timed_s(call: Callable[[], Any], device: str, autocast: bool) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        call()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(
    variants: dict[str, Callable[[list[str]], list[str]]], prompts: list[str], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """One batch size: every variant's times over the rounds, tokens/s and speed against PEFT's LoRA."""
    names = list(variants)
    autocast = args.dtype == "bfloat16"
    for name in names:  # warm-up: kernels, allocator, the cache's first allocation
        timed_s(lambda name=name: variants[name](prompts), args.device, autocast)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed_s(lambda name=name: variants[name](prompts), args.device, autocast))
    reference = times[next(n for n in names if n.startswith("peft"))]
    tokens = len(prompts) * args.new_tokens
    rows = {}
    for name in names:
        speed = [r / t for r, t in zip(reference, times[name], strict=True)]
        quartiles = statistics.quantiles(speed, n=4, method="inclusive") if len(speed) > 1 else speed * 3
        rows[name] = {
            "median_s": statistics.median(times[name]),
            "tokens_per_s": tokens / statistics.median(times[name]),
            "x_peft_paired": quartiles[1],
            "paired_iqr": [quartiles[0], quartiles[2]],
        }
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import peft
    except ImportError:
        print("peft is not installed (pip install -e .[benchmark]); it is the baseline here", file=sys.stderr)
        return 2
    molora = MoLoRAConfig(
        num_experts=args.experts,
        rank=args.rank,
        alpha=ALPHA,
        dropout=0.0,
        target_modules=args.targets.split(","),
        routing="prompt",
    )
    module = MoEIModule(backbone=BackboneConfig(TOKENIZER), adapter="molora", molora=molora)
    backbone = make_backbone(args, module.tokenizer)
    variants = build(args, backbone, module)
    del backbone
    shape = SHAPES[args.shape]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"torch {torch.__version__}, peft {peft.__version__}, {device_name}; LLaMA {args.shape} width "
        f"(hidden {shape['hidden_size']}), {args.layers} layers; {args.dtype} on {args.device}; K={args.experts}, "
        f"r={args.rank}, targets {args.targets}; greedy, key/value cache, {args.new_tokens} new tokens after "
        f"about {args.prompt_tokens} prompt tokens; {args.repeats} repeats"
    )
    results = {}
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompts = make_prompts(module.tokenizer, batch, args.prompt_tokens)
        results[str(batch)] = measure(variants, prompts, args)
    print("\n| batch | variant | median s | tokens/s | x PEFT (paired) | paired IQR |")
    print("|---:|---|---:|---:|---:|---:|")
    for batch, rows in results.items():
        for name, row in rows.items():
            low, high = row["paired_iqr"]
            print(
                f"| {batch} | {name} | {row['median_s']:.3f} | {row['tokens_per_s']:,.0f} | "
                f"{row['x_peft_paired']:.3f} | {low:.3f}-{high:.3f} |"
            )
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        result = {**settings, "torch": torch.__version__, "peft": peft.__version__, "device_name": device_name}
        Path(args.json).write_text(json.dumps({**result, "batches": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
