"""FSDP2 on one device at real width: one training step, then the adapter-only checkpoint saved and resumed.

    python benchmarks/fsdp2_step.py --work /tmp/fsdp2             # LLaMA-2-7B width, 2 layers, bf16, one GPU
    python benchmarks/fsdp2_step.py --shape llama2-13b --work /tmp/fsdp2
    python benchmarks/fsdp2_step.py --device cpu --smoke --work /tmp/fsdp2   # tiny width, one CPU process (gloo)

The backbone is a random-init LLaMA of the chosen width with ``--layers`` decoder layers, written
with ``save_pretrained`` into ``--work`` together with the shipped ``tiny-llama-gi`` tokenizer, so the
CLI loads it as it loads a downloaded LLaMA-2 directory and nothing comes from the hub. Two runs of
``python -m moei_lightning fit`` with ``conf/tiny.yaml``'s data and ``conf/strategy/fsdp2.yaml``
(``MoEIFSDP2Strategy``), MoEI on q_proj and v_proj as the LLaMA-2 configs train it, activation
checkpointing on:

1. ``--trainer.max_steps=1``: meta-device skeleton, ``fully_shard``, weights from rank 0, one step,
   ``last.ckpt`` written;
2. ``--ckpt_path last.ckpt --trainer.max_steps=2``: the checkpoint loaded into the shards (adapters
   and AdamW state), one more step.

Checks: both runs exit 0; the first checkpoint holds the adapter tensors and their optimizer state
and nothing of the backbone; the second run reaches step 2 with the same tensors. Exits 1 when a
check fails, after writing what it found.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import add_run_options, published_shapes, random_llama, require_device

from moei_lightning.backbone import BackboneConfig, load_tokenizer
from moei_lightning.checkpoints import read_checkpoint_file

REPO = Path(__file__).resolve().parents[1]
SHAPES = published_shapes()
SHAPES["smoke"] = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "vocab_size": 1536}
TARGETS = ("q_proj", "v_proj")
ADAPTER_TENSORS = ("lora_A", "lora_B", "router.weight", "gate.weight", "gate.bias")
TOKENIZER = "tiny-llama-gi"  # its 1500 ids fit every vocabulary here


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the backbone directory and the runs")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    add_run_options(parser, SHAPES, "llama2-7b", "tiny width: checks the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape = "smoke"
    require_device(parser, args)
    return args


def save_backbone(args: argparse.Namespace, directory: Path) -> int:
    """Write a random-init LLaMA of the chosen width and the shipped tokenizer; returns its parameter count."""
    tokenizer = load_tokenizer(BackboneConfig(TOKENIZER))
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    model = random_llama(SHAPES[args.shape], args.layers, args.device, torch.bfloat16, **ids)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def fit(args: argparse.Namespace, backbone: Path, run_dir: Path, extra: list[str]) -> tuple[int, float]:
    """One ``python -m moei_lightning fit`` run; its exit status and wall time. Its output goes to ours."""
    gpu = args.device == "cuda"
    command = [
        sys.executable,
        "-m",
        "moei_lightning",
        "fit",
        f"--config={REPO / 'conf' / 'tiny.yaml'}",
        f"--config={REPO / 'conf' / 'strategy' / 'fsdp2.yaml'}",
        f"--model.backbone.name_or_path={backbone}",
        f"--model.backbone.dtype={'bfloat16' if gpu else 'float32'}",
        "--model.backbone.gradient_checkpointing=true",
        f"--model.molora.target_modules=[{','.join(TARGETS)}]",
        f"--trainer.accelerator={'gpu' if gpu else 'cpu'}",
        "--trainer.devices=1",
        f"--trainer.precision={'bf16-mixed' if gpu else '32-true'}",
        "--trainer.logger=false",
        "--trainer.limit_val_batches=0",
        "--summary.splits=[]",
        "--ei_metrics.stages=[]",
        "--router_stats.stages=[]",
        "--progress_bar.refresh_rate=0",
        "--data.max_train_examples=64",
        f"--run_dir={run_dir}",
        *extra,
    ]
    print("$ " + " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    status = subprocess.run(command, cwd=REPO).returncode
    return status, time.perf_counter() - start


def inspect(checkpoint: dict[str, Any], layers: int) -> dict[str, Any]:
    """What the checkpoint holds: its step, tensor names and sizes, and whether they are the adapters only."""
    names = sorted(checkpoint["state_dict"])
    tensors = checkpoint["state_dict"].values()
    optimizer = checkpoint.get("optimizer_states") or [{}]
    expected = layers * len(TARGETS) * len(ADAPTER_TENSORS)
    return {
        "global_step": checkpoint.get("global_step"),
        "tensors": len(names),
        "expected_tensors": expected,
        "not_adapter": [n for n in names if not n.endswith(ADAPTER_TENSORS)][:8],
        "parameters": sum(t.numel() for t in tensors),
        "optimizer_states": len(optimizer[0].get("state", {})),
        "names": names,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    backbone, run_dir = args.work / "backbone", args.work / "run"
    found: dict[str, Any] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "json"}
    found["device_name"] = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    start = time.perf_counter()
    found["backbone_parameters"] = save_backbone(args, backbone)
    found["backbone_s"] = time.perf_counter() - start
    print(f"backbone: {found['backbone_parameters']:,} parameters in {found['backbone_s']:.1f} s at {backbone}")
    checks: dict[str, bool] = {}
    found["checks"] = checks
    checkpoint_path = run_dir / "checkpoints" / "last.ckpt"
    status, found["fit_s"] = fit(args, backbone, run_dir, ["--trainer.max_steps=1"])
    checks["one step runs"] = status == 0 and checkpoint_path.is_file()
    if checks["one step runs"]:
        first = inspect(read_checkpoint_file(checkpoint_path), args.layers)
        found["checkpoint"] = {k: v for k, v in first.items() if k != "names"}
        found["checkpoint"]["megabytes"] = checkpoint_path.stat().st_size / 1e6
        checks["the checkpoint holds the adapters only"] = (
            first["global_step"] == 1
            and first["tensors"] == first["expected_tensors"]
            and not first["not_adapter"]
            and first["optimizer_states"] == first["tensors"]
        )
        # The first epoch counts as finished when max_steps stops it, so the resumed run needs a second one.
        resume = [f"--ckpt_path={checkpoint_path}", "--trainer.max_steps=2", "--trainer.max_epochs=2"]
        status, found["resume_s"] = fit(args, backbone, run_dir, resume)
        resumed = inspect(read_checkpoint_file(checkpoint_path), args.layers) if status == 0 else None
        checks["the checkpoint loads and training resumes"] = (
            resumed is not None and resumed["global_step"] == 2 and resumed["names"] == first["names"]
        )
    for check, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {check}")
    if args.json:
        Path(args.json).write_text(json.dumps(found, indent=2) + "\n")
    return 0 if len(checks) == 3 and all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
