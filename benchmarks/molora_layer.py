"""Forward+backward time of one adapted linear layer: frozen alone, rank-64 LoRA (PEFT and own), naive loop, MoLoRA.

    python benchmarks/molora_layer.py                      # d 4096, 2048 tokens, K 8, r 8, fp32, CPU
    python benchmarks/molora_layer.py --device cuda --dtype bfloat16
    python benchmarks/molora_layer.py --smoke              # tiny, for CI: does the script still run?

All variants share one frozen ``nn.Linear`` (no bias, as LLaMA's and T5's projections) and run
with dropout 0, so they compute the same function up to rounding; the script checks that once
before timing. The input requires grad, as inside a network whose earlier layers train, and the
backward uses a fixed random output gradient. Variants run round-robin, the order rotated every
repeat, so machine noise hits all of them alike. This is a measurement: it exits 0 whether or
not the targets are met.

``--dtype bfloat16`` mirrors bf16 training of a frozen backbone: the backbone weight and the
activations are bf16, the adapters stay fp32 (as the library stores them, and as PEFT's
``get_peft_model`` upcasts them) and the forward runs under ``torch.autocast(bfloat16)``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moei_lightning.molora import MoLoRAConfig, MoLoRALinear, RoutingRecorder

ALPHA = 16.0
TARGET_VS_FROZEN = 1.10
TARGET_VS_PEFT = 1.00
TARGET_LOOP_SPEEDUP = 1.8


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=4096, help="d_in = d_out of the frozen linear layer")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per step (one sequence)")
    parser.add_argument("--experts", type=int, default=8, help="K")
    parser.add_argument("--rank", type=int, default=8, help="r; the LoRA baselines get rank K*r")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds over all variants")
    parser.add_argument("--iters", type=int, default=None, help="steps per timed sample (default: 1 CPU, 20 CUDA)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--smoke", action="store_true", help="d 256, 128 tokens, 2 repeats: checks the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.d, args.tokens, args.repeats = 256, 128, 2
    if args.iters is None:
        args.iters = 20 if args.device == "cuda" else 1
    return args


class NaiveLoopMoLoRA(nn.Module):
    """The per-expert loop that the stacked layout replaces, with ``block``'s weights copied.

    Every expert gets its own (A_k, B_k) and its own full (tokens, d_out) delta, weighted by
    p_k and summed: K small matmul pairs and K output-sized temporaries in both directions.
    """

    def __init__(self, block: MoLoRALinear) -> None:
        super().__init__()
        if block.gate is None:
            raise ValueError("the naive loop reproduces inter='gate' blocks only")
        self.base_layer = block.base_layer
        self.scaling = block.config.scaling

        def copy(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.detach().clone())

        r = block.config.rank
        experts = range(block.config.num_experts)
        self.lora_A = nn.ParameterList(copy(block.lora_A[k * r : (k + 1) * r]) for k in experts)
        self.lora_B = nn.ParameterList(copy(block.lora_B[:, k * r : (k + 1) * r]) for k in experts)
        self.router_weight = copy(block.router.weight)
        self.gate_weight, self.gate_bias = copy(block.gate.weight), copy(block.gate.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(F.linear(x, self.router_weight), dim=-1)
        gate = torch.sigmoid(F.linear(x, self.gate_weight, self.gate_bias))
        delta = None
        for k, (a, b) in enumerate(zip(self.lora_A, self.lora_B)):
            expert = probs[..., k : k + 1] * F.linear(F.linear(x, a), b)
            delta = expert if delta is None else delta + expert
        return self.base_layer(x) + gate * self.scaling * delta


def peft_lora(base: nn.Linear, rank: int) -> nn.Module | None:
    """PEFT's LoRA layer around ``base`` with fp32 adapters, or None when PEFT is not installed."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        return None
    holder = nn.Module()
    holder.linear = base
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["linear"]), holder)
    layer = holder.linear
    layer.lora_A.float()  # inject keeps the base dtype; get_peft_model and MoLoRA keep adapters in fp32
    layer.lora_B.float()
    return layer


def build_variants(args: argparse.Namespace, weight_dtype: torch.dtype) -> tuple[dict[str, nn.Module], list[str]]:
    """The variants by name, in table order, and notes on what was skipped or checked."""
    torch.manual_seed(0)
    stacked = args.experts * args.rank
    base = nn.Linear(args.d, args.d, bias=False, device=args.device, dtype=weight_dtype)
    # B starts at zero in every LoRA; random values make the equivalence check below mean something.
    own_lora = MoLoRALinear(base, MoLoRAConfig(num_experts=1, rank=stacked, alpha=ALPHA, dropout=0.0, inter="none"))
    molora_config = MoLoRAConfig(num_experts=args.experts, rank=args.rank, alpha=ALPHA, dropout=0.0, inter="gate")
    molora = MoLoRALinear(base, molora_config, name="bench", recorder=RoutingRecorder())  # records, as in training
    with torch.no_grad():
        own_lora.lora_B.normal_(std=0.02)
        molora.lora_B.normal_(std=0.02)
    variants: dict[str, nn.Module] = {"frozen": base}
    notes = []
    peft_layer = peft_lora(base, stacked)
    if peft_layer is None:
        notes.append(f"peft_lora_r{stacked} skipped: peft is not installed (pip install -e .[benchmark])")
    else:
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(own_lora.lora_A)
            peft_layer.lora_B["default"].weight.copy_(own_lora.lora_B)
        variants[f"peft_lora_r{stacked}"] = peft_layer
    variants[f"own_lora_r{stacked}"] = own_lora
    variants[f"naive_loop_{args.experts}"] = NaiveLoopMoLoRA(molora)
    variants[f"molora_{args.experts}x{args.rank}"] = molora
    base.requires_grad_(False)
    return variants, notes


def matmul_flops(tokens: int, d_in: int, d_out: int, stacked_rank: int, routing_rows: int) -> tuple[int, int]:
    """Forward+backward matmul FLOPs of the frozen layer and of an adapter, input gradient included.

    The frozen layer: forward and input gradient, ``2 * 2 T d_in d_out``. An adapter with
    ``stacked_rank`` expert rows and ``routing_rows`` router/gate rows: forward, input gradient
    and weight gradient of ``x -> h`` and of ``h -> delta``, ``3 * 2 T (d_in (R + S) + R d_out)``.
    Elementwise work is left out, so the ratio is a floor, not a prediction.
    """
    frozen = 4 * tokens * d_in * d_out
    adapter = 6 * tokens * (d_in * (stacked_rank + routing_rows) + stacked_rank * d_out)
    return frozen, adapter


def step_fn(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, bf16: bool) -> Callable[[], None]:
    """One training step of the layer: forward (under autocast for bf16), backward, grads dropped."""

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            y = module(x)
        y.backward(grad)
        x.grad = None
        module.zero_grad(set_to_none=True)

    return step


def timed_ms(step: Callable[[], None], iters: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / iters


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def max_difference(a: nn.Module, b: nn.Module, x: torch.Tensor, bf16: bool) -> float:
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return (a(x).float() - b(x).float()).abs().max().item()


def verdict(value: float, limit: float, at_most: bool) -> str:
    return "PASS" if (value <= limit if at_most else value >= limit) else "MISS"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    bf16 = args.dtype == "bfloat16"
    weight_dtype = torch.bfloat16 if bf16 else torch.float32
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {cpu_model()}")
    if args.device == "cuda":
        print(f"GPU {torch.cuda.get_device_name()}")
    print(
        f"d_in = d_out = {args.d}, {args.tokens} tokens, K={args.experts}, r={args.rank}, {args.dtype} on "
        f"{args.device}{' (bf16 weight and activations, fp32 adapters, autocast)' if bf16 else ''}, "
        f"{args.repeats} repeats x {args.iters} step(s), forward + backward, dropout 0"
    )

    variants, notes = build_variants(args, weight_dtype)
    for note in notes:
        print(note)
    names = list(variants)
    frozen_name, own_name, loop_name, molora_name = names[0], names[-3], names[-2], names[-1]
    peft_name = names[1] if len(names) == 5 else None
    x = torch.randn(1, args.tokens, args.d, device=args.device, dtype=weight_dtype, requires_grad=True)
    grad = torch.randn(1, args.tokens, args.d, device=args.device, dtype=weight_dtype)
    checks = [(loop_name, molora_name)] + ([(peft_name, own_name)] if peft_name else [])
    for a, b in checks:
        print(f"same function: max |y({a}) - y({b})| = {max_difference(variants[a], variants[b], x, bf16):.2e}")

    steps = {name: step_fn(module, x, grad, bf16) for name, module in variants.items()}
    for step in steps.values():  # warm-up: allocator, kernel selection, first-call overheads
        step()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(timed_ms(steps[name], args.iters, args.device))

    median = {name: statistics.median(values) for name, values in samples.items()}
    best = {name: min(values) for name, values in samples.items()}
    print()
    # spread: (max - min) / median; ratios that differ by less than it are not resolved by this run
    header = f"{'median ms':>10} {'min ms':>10} {'spread':>7} {'x frozen (median)':>18} {'x frozen (min)':>15}"
    print(f"{'variant':<16} {header}")
    for name in names:
        spread = (max(samples[name]) - best[name]) / median[name]
        print(
            f"{name:<16} {median[name]:>10.2f} {best[name]:>10.2f} {spread:>7.1%} "
            f"{median[name] / median[frozen_name]:>18.3f} {best[name] / best[frozen_name]:>15.3f}"
        )

    stacked = args.experts * args.rank
    frozen_flops, molora_flops = matmul_flops(args.tokens, args.d, args.d, stacked, args.experts + 1)
    _, lora_flops = matmul_flops(args.tokens, args.d, args.d, stacked, 0)
    print()
    print(
        f"FLOP floor (matmuls, forward + backward): {molora_name} {1 + molora_flops / frozen_flops:.4f}x frozen, "
        f"rank-{stacked} LoRA {1 + lora_flops / frozen_flops:.4f}x frozen"
    )
    vs_frozen = median[molora_name] / median[frozen_name]
    print(
        f"target {molora_name} <= {TARGET_VS_FROZEN:.2f}x {frozen_name}: {vs_frozen:.3f}x  "
        f"{verdict(vs_frozen, TARGET_VS_FROZEN, at_most=True)}"
    )
    if peft_name is None:
        print(f"target {molora_name} <= {TARGET_VS_PEFT:.2f}x PEFT rank-{stacked} LoRA: skipped (no peft)")
    else:
        vs_peft = median[molora_name] / median[peft_name]
        print(
            f"target {molora_name} <= {TARGET_VS_PEFT:.2f}x {peft_name}: {vs_peft:.3f}x  "
            f"{verdict(vs_peft, TARGET_VS_PEFT, at_most=True)}"
        )
    speedup = median[loop_name] / median[molora_name]
    print(
        f"target {loop_name} / {molora_name} >= {TARGET_LOOP_SPEEDUP:.1f}: {speedup:.3f}  "
        f"{verdict(speedup, TARGET_LOOP_SPEEDUP, at_most=False)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
