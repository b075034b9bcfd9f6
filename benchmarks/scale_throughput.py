"""Training throughput and peak memory of MoEI vs LoRA vs the frozen forward, with and without checkpointing.

    python benchmarks/scale_throughput.py                          # LLaMA-2-7B width, 4 layers, bf16, CUDA
    python benchmarks/scale_throughput.py --shape llama2-13b --seq-len 2048
    python benchmarks/scale_throughput.py --device cpu --smoke     # tiny, for CI: does the script still run?
    python benchmarks/scale_throughput.py --json result.json       # the table's numbers also as JSON

The model is a random-init LLaMA of the real width (hidden size, MLP, heads, vocabulary) with
only ``--layers`` decoder layers, so one GPU holds it; per-layer costs scale to the full depth.
The backbone is bf16 and frozen, adapters stay fp32 and the step runs under bf16 autocast, as in
training. Variants:

- ``frozen``: the backbone's forward alone, no graph (the floor any adapter method pays);
- ``lora``: one rank-``K*r`` LoRA on q_proj and v_proj (the LoRA baseline, same trainable size);
- ``moei``: K experts of rank r with intra router and inter gate, plus the inter-gate loss.

``lora`` and ``moei`` time a whole training step (forward, backward, AdamW step) with and without
non-reentrant activation checkpointing. Throughput is tokens per second (padding-free batches).
Memory is the CUDA peak during the timed steps, in total and above what stays allocated between
steps (weights, adapters, AdamW state): the activations and gradients (n/a on the CPU). Ratios are
against ``frozen``, and for memory against the same method without checkpointing. This is a
measurement: it exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from common import add_run_options, published_shapes, random_llama, require_device
from transformers import LlamaForCausalLM

from moei_lightning.module import adapter_config, inter_loss
from moei_lightning.molora import MoLoRAConfig, inject_molora, routing

SHAPES = published_shapes() | {
    "smoke": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "vocab_size": 256},
}


@dataclass
class Result:
    variant: str
    checkpointing: bool
    tokens_per_s: float
    peak_gib: float | None
    above_resident_gib: float | None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (the full models have 32 / 40)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--experts", type=int, default=8, help="K")
    parser.add_argument("--rank", type=int, default=8, help="r; LoRA gets rank K*r")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    add_run_options(parser, SHAPES, "llama2-7b", "tiny width, 2 layers, 2 steps: checks the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape, args.layers, args.batch_size, args.seq_len = "smoke", 2, 2, 32
        args.experts, args.rank, args.steps, args.warmup = 2, 4, 2, 1
    require_device(parser, args)
    return args


def build(args: argparse.Namespace, variant: str, checkpointing: bool) -> LlamaForCausalLM:
    """A random-init frozen bf16 LLaMA of the chosen width; adapters (fp32) injected for lora / moei."""
    model = random_llama(SHAPES[args.shape], args.layers, args.device, torch.bfloat16, max(4096, args.seq_len))
    if variant != "frozen":
        targets = ["q_proj", "v_proj"]
        molora = MoLoRAConfig(num_experts=args.experts, rank=args.rank, dropout=0.0, target_modules=targets)
        if variant == "lora":  # one expert of the same total rank
            molora = adapter_config("lora", dataclasses.replace(molora, rank=args.experts * args.rank))
        inject_molora(model, molora)
    if checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23 deprecates the old name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model.train(variant != "frozen")


def step_fn(model: LlamaForCausalLM, variant: str, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    device_type = batch["input_ids"].device.type
    if variant == "frozen":

        @torch.no_grad()
        def forward() -> None:
            with torch.autocast(device_type, dtype=torch.bfloat16):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)

        return forward
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def train_step() -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16), routing(model) as capture:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["input_ids"][:, 1:].flatten())
            gates = [r for r in capture.records.values() if r.gate is not None]
            if gates:
                loss = loss + inter_loss(gates, batch["domain"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step


def measure(args: argparse.Namespace, variant: str, checkpointing: bool) -> Result:
    torch.manual_seed(0)
    model = build(args, variant, checkpointing)
    shape = (args.batch_size, args.seq_len)
    batch = {
        "input_ids": torch.randint(0, SHAPES[args.shape]["vocab_size"], shape, device=args.device),
        "attention_mask": torch.ones(shape, dtype=torch.long, device=args.device),
        "domain": torch.arange(args.batch_size, device=args.device) % 2,  # half EI, half GI
    }
    step = step_fn(model, variant, batch)
    cuda = args.device == "cuda"
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    above = peak - resident / 2**30 if cuda else None
    del model, step
    if cuda:
        torch.cuda.empty_cache()
    return Result(variant, checkpointing, args.batch_size * args.seq_len * args.steps / elapsed, peak, above)


def report(args: argparse.Namespace, results: list[Result]) -> str:
    frozen = next(r for r in results if r.variant == "frozen")
    plain = {r.variant: r for r in results if not r.checkpointing}
    lines = [
        f"{args.shape} width, {args.layers} layers, batch {args.batch_size} x {args.seq_len} tokens, K={args.experts} "
        f"r={args.rank}, bf16 autocast, {args.device} ({platform.processor() or platform.machine()}"
        + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else "")
        + f"), torch {torch.__version__}",
        "",
        "| variant | act. ckpt | tokens/s | vs frozen | peak GiB | above resident GiB | vs no ckpt |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        peak = "n/a" if r.peak_gib is None else f"{r.peak_gib:.2f}"
        above = "n/a" if r.above_resident_gib is None else f"{r.above_resident_gib:.2f}"
        base = plain[r.variant].above_resident_gib
        vs_plain = "n/a" if r.above_resident_gib is None or not base else f"{r.above_resident_gib / base:.2f}x"
        ckpt = "-" if r.variant == "frozen" else ("on" if r.checkpointing else "off")
        speed = f"{r.tokens_per_s / frozen.tokens_per_s:.2f}x"
        lines.append(f"| {r.variant} | {ckpt} | {r.tokens_per_s:,.0f} | {speed} | {peak} | {above} | {vs_plain} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs = [("frozen", False)] + [(v, c) for v in ("lora", "moei") for c in (False, True)]
    results = [measure(args, variant, checkpointing) for variant, checkpointing in runs]
    print(report(args, results))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        cuda = args.device == "cuda"
        device_name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
        rows = [dataclasses.asdict(r) for r in results]
        result = {**settings, "torch": torch.__version__, "device_name": device_name, "rows": rows}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
