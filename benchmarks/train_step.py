"""Whole training steps of a LLaMA-shaped model: frozen forward, PEFT LoRA, own LoRA and MoLoRA, side by side.

    python benchmarks/train_step.py                        # hidden 1024, 4 layers, 2 x 512 tokens, fp32, CPU
    python benchmarks/train_step.py --device cuda --dtype bfloat16 --shape llama2-7b
    python benchmarks/train_step.py --profile molora_8x8_token   # where one step's time goes (torch.profiler)
    python benchmarks/train_step.py --smoke                # tiny, for CI: does the script still run?
    python benchmarks/train_step.py --json result.json     # the table's numbers also as JSON

A step is what training does: forward, loss, backward, AdamW step, gradients dropped. Variants:

- ``frozen``: the backbone's forward and LM loss without a graph, the floor any adapter pays;
- ``peft_lora_r64``: PEFT's LoRA (``get_peft_model``) of rank ``K*r`` on the same layers, LM loss;
- ``lora_r64``: ``model.adapter: lora`` of rank ``K*r``, loss from ``MoEIModule.objective``;
- ``molora_8x8_<routing>``: ``model.adapter: molora`` (K experts of rank r, intra router, inter
  gate), loss from ``MoEIModule.objective``: LM loss on EI sequences, the inter-gate loss and the
  load-balancing term, for every routing mode the library offers.

Same trainable size: a rank-``K*r`` LoRA has the expert bank's A and B shapes (MoLoRA adds the
router and gate rows). All variants start from the same random backbone, see the same batch (one
EI and one GI sequence, the second right-padded by an eighth, the first half of each sequence
prompt, the rest target), use dropout ``--dropout`` and AdamW over their trainable tensors. They
run round-robin in one process, the order rotated every repeat, so machine noise hits all alike;
the table gives medians, minima, the spread ``(max - min) / median`` and ratios against PEFT's
LoRA: of the medians, of the minima, and paired (each round's time over PEFT's time in the same
round, median and interquartile range over rounds). The paired ratio cancels the load changes that
a shared machine spreads over a run; its interquartile range says which differences the run resolves.

Memory: ``saved MiB`` is what autograd keeps for the backward (unique storages of the saved
tensors), on any device; on CUDA ``peak MiB`` is the allocator's peak during a step above what
stays allocated between steps. ``state MiB`` is trainable tensors plus AdamW state. This is a
measurement: it exits 0 whether or not ours is faster.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import torch
from common import published_shapes, random_llama
from torch import nn
from transformers import LlamaForCausalLM

from moei_lightning.backbone import BackboneConfig
from moei_lightning.data import IGNORE_INDEX
from moei_lightning.module import MoEIModule, masked_mean
from moei_lightning.molora import MoLoRAConfig
from moei_lightning.molora.config import Routing
from moei_lightning.runner import sequence_logprobs

SHAPES: dict[str, dict[str, int]] = {
    "cpu": {"hidden_size": 1024, "intermediate_size": 2752, "num_attention_heads": 16, "vocab_size": 32000},
    "llama2-7b": published_shapes()["llama2-7b"],
    "smoke": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "vocab_size": 256},
}
ALPHA = 16.0
REFERENCE = "peft_lora"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=[s for s in SHAPES if s != "smoke"], default="cpu")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per step (half EI, half GI)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--experts", type=int, default=8, help="K")
    parser.add_argument("--rank", type=int, default=8, help="r; the LoRA baselines get rank K*r")
    parser.add_argument("--targets", default="q_proj,v_proj", help="adapted linear layers, comma-separated")
    parser.add_argument("--dropout", type=float, default=0.0, help="adapter dropout of every variant")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds over all variants")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time, which other processes on a shared CPU "
        "barely change (use it with --threads 1, where no thread waits for another)",
    )
    parser.add_argument("--only", default=None, help="comma-separated variant names to run (default: all)")
    parser.add_argument("--profile", metavar="VARIANT", default=None, help="profile one step of VARIANT instead")
    parser.add_argument("--smoke", action="store_true", help="tiny width, 2 layers, 2 repeats: checks the script runs")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the settings and every row as JSON")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape, args.layers, args.seq_len, args.experts, args.rank, args.repeats = "smoke", 2, 32, 2, 4, 2
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device")
    if args.device == "cuda" and args.clock == "cpu":
        parser.error("--clock cpu measures CPU work; on CUDA use --clock wall")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def make_backbone(args: argparse.Namespace) -> LlamaForCausalLM:
    """A random-init, frozen LLaMA of the chosen width, in the chosen dtype, on the chosen device."""
    return random_llama(
        SHAPES[args.shape], args.layers, args.device, getattr(torch, args.dtype), max(4096, args.seq_len)
    )


def make_batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Half EI, half GI; odd sequences right-padded by an eighth; the first half of each sequence is prompt."""
    generator = torch.Generator().manual_seed(1)
    shape = (args.batch_size, args.seq_len)
    input_ids = torch.randint(3, SHAPES[args.shape]["vocab_size"], shape, generator=generator)
    attention_mask = torch.ones(shape, dtype=torch.long)
    attention_mask[1::2, args.seq_len - args.seq_len // 8 :] = 0
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, : args.seq_len // 2] = IGNORE_INDEX
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "domain": (torch.arange(args.batch_size) + 1) % 2,  # 1 = EI, 0 = GI
    }
    return {k: v.to(args.device) for k, v in batch.items()}


def routings() -> list[str]:
    """Every routing mode the library offers, token first."""
    return list(get_args(Routing))


def variant_names(args: argparse.Namespace) -> list[str]:
    stacked = args.experts * args.rank
    names = ["frozen", f"{REFERENCE}_r{stacked}", f"lora_r{stacked}"]
    names += [f"molora_{args.experts}x{args.rank}_{routing}" for routing in routings()]
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise SystemExit(f"--only: unknown variants {unknown}; choose from {names}")
        names = [n for n in names if n in wanted]
    return names


@dataclasses.dataclass
class Variant:
    """One way of training the backbone: its step, and its trainable and optimizer state."""

    step: Callable[[], torch.Tensor | None]
    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer | None

    def state_bytes(self) -> int:
        tensors = list(self.trainable)
        if self.optimizer is not None:
            tensors += [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)


def build(name: str, args: argparse.Namespace, backbone: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> Variant:
    """The variant ``name`` on its own copy of ``backbone``."""
    model = copy.deepcopy(backbone)
    autocast = args.dtype == "bfloat16"
    device = args.device
    targets = args.targets.split(",")
    stacked = args.experts * args.rank
    if name == "frozen":

        @torch.no_grad()
        def forward() -> torch.Tensor:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                logprobs, mask = sequence_logprobs(model, batch, "causal")
                return masked_mean(-logprobs, mask)

        return Variant(forward, [], None)
    if name.startswith(REFERENCE):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=stacked, lora_alpha=ALPHA, lora_dropout=args.dropout, target_modules=targets)
        model = get_peft_model(model, config)  # keeps the adapters in fp32 (autocast_adapter_dtype)

        def loss() -> torch.Tensor:
            logprobs, mask = sequence_logprobs(model, batch, "causal")
            return masked_mean(-logprobs, mask)

    else:
        adapter = "lora" if name.startswith("lora") else "molora"
        routing = name.rsplit("_", 1)[1] if adapter == "molora" else "token"
        molora = MoLoRAConfig(
            num_experts=args.experts,
            rank=stacked if adapter == "lora" else args.rank,
            alpha=ALPHA,
            dropout=args.dropout,
            target_modules=targets,
            routing=routing,
        )
        module = MoEIModule(backbone=BackboneConfig("tiny-llama"), adapter=adapter, molora=molora)
        module.model = module._with_adapters(model)
        module.train()

        def loss() -> torch.Tensor:
            return module.objective(batch)[1]

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def train_step() -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value.detach()

    return Variant(train_step, trainable, optimizer)


def saved_bytes(step: Callable[[], Any]) -> int:
    """Bytes autograd saves for the backward during one step (unique storages)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def timed_ms(step: Callable[[], Any], device: str, clock: str) -> float:
    now = time.process_time if clock == "cpu" else time.perf_counter
    if device == "cuda":
        torch.cuda.synchronize()
    start = now()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (now() - start) * 1e3


def paired_ratios(times: list[float], reference: list[float]) -> tuple[float, float, float]:
    """Quartiles (25 %, median, 75 %) of the per-round ratios ``times[i] / reference[i]``.

    Both were timed in the same round, a few seconds apart, so a load change between rounds
    scales both and cancels in the ratio.
    """
    ratios = [t / r for t, r in zip(times, reference, strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    low, mid, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return low, mid, high


def cuda_peak_bytes(step: Callable[[], Any]) -> int:
    """The allocator's peak during one step, above what was allocated before it."""
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - resident


def profile(variant: Variant, device: str, rows: int = 25) -> None:
    """One step of ``variant`` under torch.profiler, operators sorted by their own time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    variant.step()
    with torch_profile(activities=activities) as prof:
        variant.step()
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=rows))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = variant_names(args)
    try:
        import peft
    except ImportError:
        peft = None
        print("peft is not installed (pip install -e .[benchmark]): PEFT's LoRA is skipped, ratios vs own lora")
        names = [n for n in names if not n.startswith(REFERENCE)]
    shape = SHAPES[args.shape]
    print(
        f"torch {torch.__version__}, peft {getattr(peft, '__version__', '-')}, "
        f"CPU {cpu_model()}" + (f", GPU {torch.cuda.get_device_name()}" if args.device == "cuda" else "")
    )
    print(
        f"LLaMA {args.shape}: hidden {shape['hidden_size']}, {args.layers} layers, vocab {shape['vocab_size']}; "
        f"batch {args.batch_size} x {args.seq_len} tokens; {args.dtype} on {args.device}"
        f"{' (bf16 backbone, fp32 adapters, autocast)' if args.dtype == 'bfloat16' else ''}; K={args.experts}, "
        f"r={args.rank}, targets {args.targets}, dropout {args.dropout}; forward + backward + AdamW; "
        f"{torch.get_num_threads()} threads"
    )
    backbone = make_backbone(args)
    batch = make_batch(args)
    variants = {name: build(name, args, backbone, batch) for name in names}
    del backbone
    if args.profile:
        if args.profile not in variants:
            raise SystemExit(f"--profile: unknown variant {args.profile!r}; choose from {names}")
        profile(variants[args.profile], args.device)
        return 0

    for _ in range(args.warmup):
        for variant in variants.values():
            variant.step()
    saved = {name: saved_bytes(v.step) for name, v in variants.items()}
    peak = {name: cuda_peak_bytes(v.step) for name, v in variants.items()} if args.device == "cuda" else {}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(timed_ms(variants[name].step, args.device, args.clock))

    reference = next((n for n in names if n.startswith(REFERENCE)), None) or next(
        (n for n in names if n.startswith("lora")), names[0]
    )
    tokens = int(batch["attention_mask"].sum())
    rows = {
        name: table_row(samples[name], samples[reference], tokens, saved[name], peak.get(name), variants[name])
        for name in names
    }
    print(f"\n{args.repeats} repeats, {args.clock} clock, ratios against {reference}")
    header = (
        f"| variant | median ms | min ms | spread | x {reference} (median) | x (min) | x (paired) | paired IQR | "
        f"saved MiB | {'peak MiB | ' if peak else ''}state MiB |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, row in rows.items():
        peak_cell = f"{row['peak_mib']:.0f} | " if peak else ""
        low, high = row["paired_iqr"]
        print(
            f"| {name} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | {row['spread']:.1%} | "
            f"{row['x_median']:.3f} | {row['x_min']:.3f} | {row['x_paired']:.3f} | {low:.3f}-{high:.3f} | "
            f"{row['saved_mib']:.0f} | {peak_cell}{row['state_mib']:.1f} |"
        )
    print("\ntokens/s (real tokens, median): " + ", ".join(f"{n} {r['tokens_per_s']:,.0f}" for n, r in rows.items()))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "profile")}
        device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_model()
        versions = {"torch": torch.__version__, "peft": getattr(peft, "__version__", None)}
        result = {**settings, **versions, "device_name": device_name, "reference": reference, "tokens": tokens}
        Path(args.json).write_text(json.dumps({**result, "variants": rows}, indent=2) + "\n")
    return 0


def table_row(
    times: list[float],
    reference: list[float],
    tokens: int,
    saved: int,
    peak: int | None,
    variant: Variant,
) -> dict[str, Any]:
    """One variant's row: its times, its ratios against the reference's (in ms, per round), memory in MiB."""
    median, best = statistics.median(times), min(times)
    low, paired, high = paired_ratios(times, reference)
    return {
        "median_ms": median,
        "min_ms": best,
        "spread": (max(times) - best) / median,
        "x_median": median / statistics.median(reference),
        "x_min": best / min(reference),
        "x_paired": paired,
        "paired_iqr": [low, high],
        "tokens_per_s": tokens / median * 1e3,
        "saved_mib": saved / 2**20,
        "peak_mib": None if peak is None else peak / 2**20,
        "state_mib": variant.state_bytes() / 2**20,
    }


if __name__ == "__main__":
    sys.exit(main())
