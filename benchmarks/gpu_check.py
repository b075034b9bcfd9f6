"""The GPU check: the speed, memory and correctness targets at real width, in one prepared run.

    python benchmarks/gpu_check.py --out $OUT/gpu                         # one GPU (sized for an H200)
    START=$(date +%s); pip install -e ".[dev]" && python benchmarks/gpu_check.py --out $OUT/gpu --since $START
    python benchmarks/gpu_check.py --out $OUT/gpu --only generate,fsdp2   # run some steps again
    python benchmarks/gpu_check.py --out /tmp/check --smoke               # the same steps on the CPU, tiny

Steps, in this order, each a subprocess with its own time budget:

1. ``train_step``: ``benchmarks/train_step.py`` at LLaMA-2-7B width in bf16: MoLoRA (K=8, r=8,
   token and prompt routing, gate loss) and own LoRA against PEFT's LoRA r=64 and the frozen forward;
2. ``scale_7b``, ``scale_13b``: ``benchmarks/scale_throughput.py`` at LLaMA-2-7B and 13B width (4
   layers), LoRA and MoEI with and without activation checkpointing;
3. ``generate``: ``benchmarks/generate_throughput.py``, generation with the key/value cache at
   LLaMA-2-7B width and depth, MoEI (prompt routing) against PEFT's LoRA, batch 1 and 16;
4. ``tiny_bf16``: the tiny default, ``python -m moei_lightning fit --config conf/tiny.yaml`` on the
   GPU in bf16, its run directory under ``--out``;
5. ``fsdp2``: ``benchmarks/fsdp2_step.py``, ``MoEIFSDP2Strategy`` on the one GPU at LLaMA-2-7B
   width: one step, the adapter-only checkpoint saved and resumed.

Every model is random-init or shipped in the package: nothing comes from the hub. The whole run has
``--total`` seconds, counted from ``--since`` (a Unix time taken before the install) or from the
start: a step gets its own budget or what is left, whichever is less, and one that fails or runs
out of time is reported with the last lines of its output while the others still run. Each step's
output is printed as it comes and appended to ``gpu_check.log``; after every step
``gpu_check.json`` (environment, every step's status and numbers, the targets) and
``gpu_check.md`` (the same as PASS/FAIL lines and tables, see ``gpu_check_report.py``) are
rewritten, so an interrupted run still leaves what it measured. ``--smoke`` runs the same steps on
the CPU at tiny size; its targets are reported as SKIP, not judged. Exits 0 when every step ran
and no target failed, 1 otherwise, 2 without a CUDA device outside ``--smoke``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import gpu_check_report

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
SAMPLES = REPO / "moei_lightning" / "data" / "samples"
TOTAL_S = 480
MIN_STEP_S = 20  # a step is skipped rather than started with less time than this
TAIL_LINES = 30


@dataclass(frozen=True)
class Context:
    """Where a run writes: ``out`` is kept, ``scratch`` (step results, the FSDP2 backbone) is removed."""

    out: Path
    scratch: Path
    smoke: bool

    def result(self, step: str) -> Path:
        return self.scratch / f"{step}.json"

    @property
    def tiny_run_dir(self) -> Path:
        return self.out / "runs" / "tiny-bf16"


@dataclass(frozen=True)
class Step:
    """One step: its title, budget on the GPU, command, and how its numbers are read afterwards."""

    name: str
    title: str
    budget_s: int
    command: Callable[[Context], list[str]]
    read: Callable[[Context], dict[str, Any]]
    prepare: Callable[[Context], None] = lambda ctx: None


def script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(BENCHMARKS / f"{name}.py"), *args]


def read_json(step: str) -> Callable[[Context], dict[str, Any]]:
    return lambda ctx: json.loads(ctx.result(step).read_text())


def train_step_command(ctx: Context) -> list[str]:
    json_out = ["--json", str(ctx.result("train_step"))]
    if ctx.smoke:
        return script("train_step", "--smoke", "--clock", "cpu", *json_out)
    return script(
        "train_step", "--device", "cuda", "--dtype", "bfloat16", "--shape", "llama2-7b", "--repeats", "15", *json_out
    )


def scale_command(shape: str) -> Callable[[Context], list[str]]:
    name = f"scale_{shape.removeprefix('llama2-')}"

    def command(ctx: Context) -> list[str]:
        json_out = ["--json", str(ctx.result(name))]
        if ctx.smoke:
            return script("scale_throughput", "--device", "cpu", "--smoke", *json_out)
        return script("scale_throughput", "--shape", shape, *json_out)

    return command


def generate_command(ctx: Context) -> list[str]:
    json_out = ["--json", str(ctx.result("generate"))]
    if ctx.smoke:
        return script("generate_throughput", "--device", "cpu", "--smoke", "--dtype", "float32", *json_out)
    return script("generate_throughput", "--shape", "llama2-7b", "--repeats", "3", *json_out)


def tiny_command(ctx: Context) -> list[str]:
    fit = [sys.executable, "-m", "moei_lightning", "fit", f"--config={REPO / 'conf' / 'tiny.yaml'}"]
    if not ctx.smoke:
        return [*fit, "--trainer.accelerator=gpu", "--trainer.precision=bf16-mixed", f"--run_dir={ctx.tiny_run_dir}"]
    # CPUs emulate bf16 slowly: the smoke run checks the plumbing in fp32, 3 steps, on a few bundled samples.
    return [
        *fit,
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        "--trainer.max_steps=3",
        "--trainer.logger=false",
        "--data.max_train_examples=64",
        f"--data.ei_val=[{SAMPLES / 'ei' / 'val.jsonl'}]",
        f"--data.gi_val=[{SAMPLES / 'gi' / 'val.jsonl'}]",
        f"--run_dir={ctx.tiny_run_dir}",
    ]


def read_tiny(ctx: Context) -> dict[str, Any]:
    """The fit's summary.json, trimmed to the validation split's averages (primary accuracy) and gates."""
    summary = json.loads((ctx.tiny_run_dir / "summary.json").read_text())
    val, primary = summary["splits"]["val"], summary["primary_metric"]
    picked = {
        when: {
            "ei": val[when]["ei"][primary["ei"]]["avg"],
            "gi": val[when]["gi"][primary["gi"]]["avg"],
            "gate_ei": val[when]["gate_ei"],
            "gate_gi": val[when]["gate_gi"],
        }
        for when in ("before", "after", "change")
    }
    return {**picked, "trainable_parameters": summary["trainable_parameters"], "run_dir": summary["run_dir"]}


def fsdp2_command(ctx: Context) -> list[str]:
    args = ["--work", str(ctx.scratch / "fsdp2"), "--json", str(ctx.result("fsdp2"))]
    return script("fsdp2_step", *(["--device", "cpu", "--smoke"] if ctx.smoke else []), *args)


STEPS = [
    Step(
        "train_step",
        "training step at LLaMA-2-7B width (4 layers, 2 x 512 tokens), bf16: MoLoRA K=8 r=8 and own LoRA "
        "vs PEFT LoRA r=64 vs the frozen forward",
        90,
        train_step_command,
        read_json("train_step"),
    ),
    Step(
        "scale_7b",
        "training throughput and peak memory at LLaMA-2-7B width (4 layers, 4 x 1024 tokens), "
        "activation checkpointing off and on",
        60,
        scale_command("llama2-7b"),
        read_json("scale_7b"),
    ),
    Step(
        "scale_13b",
        "the same at LLaMA-2-13B width",
        60,
        scale_command("llama2-13b"),
        read_json("scale_13b"),
    ),
    Step(
        "generate",
        "generation with the key/value cache at LLaMA-2-7B width and depth, 64 new tokens: MoEI (prompt "
        "routing) vs PEFT LoRA r=64, batch 1 and 16",
        90,
        generate_command,
        read_json("generate"),
    ),
    Step(
        "tiny_bf16",
        "the tiny default (conf/tiny.yaml, 400 steps) on the GPU in bf16",
        120,
        tiny_command,
        read_tiny,
        prepare=lambda ctx: shutil.rmtree(ctx.tiny_run_dir, ignore_errors=True),  # a new run, not a continued one
    ),
    Step(
        "fsdp2",
        "FSDP2 (MoEIFSDP2Strategy) on one GPU at LLaMA-2-7B width (2 layers): one step, the adapter-only "
        "checkpoint saved and resumed",
        90,
        fsdp2_command,
        read_json("fsdp2"),
    ),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON, the Markdown, the log, runs/")
    parser.add_argument("--smoke", action="store_true", help="the same steps on the CPU at tiny size")
    parser.add_argument("--only", default=None, help=f"comma-separated steps to run, of {[s.name for s in STEPS]}")
    parser.add_argument("--total", type=float, default=TOTAL_S, help="seconds for the whole check (default: 480)")
    parser.add_argument("--since", type=float, default=None, help="Unix time the check's clock starts from")
    args = parser.parse_args(argv)
    if args.only:
        unknown = sorted(set(args.only.split(",")) - {s.name for s in STEPS})
        if unknown:
            parser.error(f"--only: unknown steps {unknown}; choose from {[s.name for s in STEPS]}")
    return args


def environment(smoke: bool) -> dict[str, Any]:
    """What the numbers were measured on: versions, the GPU, the CPU, the commit."""
    import torch

    versions = {}
    for package in ("transformers", "lightning", "peft"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **versions,
        "gpu": None
        if smoke
        else command_output(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "commit": command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
    }


def command_output(command: list[str]) -> str | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def step_environment(smoke: bool) -> dict[str, str]:
    """Unbuffered output, no hub, this checkout first on the path; one CPU thread per process in a smoke run,
    whose tiny models gain nothing from more and lose much when the cores are shared."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    if smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_command(
    name: str, command: list[str], env: dict[str, str], timeout: float, log: TextIO
) -> tuple[str, int | None, list[str]]:
    """Run ``command`` in its own process group, echoing and logging its output; ``(status, exit code, tail)``.

    On timeout the whole group is killed (Lightning and data-loader processes included).
    """
    log.write(f"\n===== {name}: {' '.join(command)}\n")
    log.flush()
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        encoding="utf-8",
        errors="replace",  # a stray byte must not stop the echo
        start_new_session=True,
    )
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def pump() -> None:
        for line in process.stdout:
            print(f"[{name}] {line}", end="", flush=True)
            log.write(line)
            tail.append(line.rstrip("\n"))
        log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=timeout)
        status = "ok" if code == 0 else "failed"
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # it may have ended in the meantime
            os.killpg(process.pid, signal.SIGKILL)
        code, status = process.wait(), "timeout"
    reader.join(timeout=10)
    return status, code, list(tail)


def earlier_steps(out: Path, smoke: bool) -> dict[str, Any]:
    """The steps of an earlier report in ``out`` (of the same kind, smoke or not), which ``--only`` completes."""
    path = out / "gpu_check.json"
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    return earlier["steps"] if earlier.get("smoke") == smoke else {}


def write_report(out: Path, report: dict[str, Any]) -> None:
    """The JSON and the Markdown, each replaced whole, so a reader never sees half a file."""
    report["targets"] = gpu_check_report.targets(report)
    for name, text in (
        ("gpu_check.json", json.dumps(report, indent=2) + "\n"),
        ("gpu_check.md", gpu_check_report.markdown(report)),
    ):
        partial = out / f".{name}.partial"
        partial.write_text(text)
        partial.replace(out / name)


def run_step(step: Step, ctx: Context, entry: dict[str, Any], deadline: float, log: TextIO) -> None:
    """Run one step within its budget and what is left before ``deadline``; record the outcome in ``entry``."""
    timeout = min(step.budget_s, deadline - time.time())
    if timeout < MIN_STEP_S:
        entry.update(status="skipped", error=f"only {max(0, timeout):.0f} s of the check's time were left")
        print(f"[{step.name}] skipped: {entry['error']}", flush=True)
        return
    step.prepare(ctx)
    command = step.command(ctx)
    entry.update(command=[Path(c).name if c == sys.executable else c for c in command], timeout_s=timeout)
    print(f"[{step.name}] {step.title}; up to {timeout:.0f} s", flush=True)
    began = time.time()
    status, code, tail = run_command(step.name, command, step_environment(ctx.smoke), timeout, log)
    entry.update(status=status, returncode=code, wall_s=time.time() - began)
    try:
        entry["result"] = step.read(ctx)
    except (OSError, ValueError, KeyError, TypeError) as err:
        if status == "ok":
            entry.update(status="failed", error=f"it exited 0 but left no readable result: {err!r}")
    if entry["status"] != "ok":
        entry.setdefault("error", "timed out" if status == "timeout" else f"exit status {code}")
        entry["tail"] = tail
    print(f"[{step.name}] {entry['status']} in {entry['wall_s']:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            print("error: the GPU check needs a CUDA device and torch sees none; on a CPU run it with --smoke")
            return 2
    start = time.time() if args.since is None else args.since
    deadline = start + args.total
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in STEPS if not args.only or s.name in args.only.split(",")]
    report: dict[str, Any] = {
        "smoke": args.smoke,
        "started": datetime.datetime.fromtimestamp(start, datetime.timezone.utc).isoformat(timespec="seconds"),
        "total_s": args.total,
        "install_included": args.since is not None,
        "only": [s.name for s in chosen] if args.only else None,
        "environment": environment(args.smoke),
        "steps": earlier_steps(args.out, args.smoke) if args.only else {},
    }
    report["steps"].update({s.name: {"title": s.title, "status": "pending", "budget_s": s.budget_s} for s in chosen})
    report["steps"] = {s.name: report["steps"][s.name] for s in STEPS if s.name in report["steps"]}
    mode = "a" if args.only else "w"  # a rerun of some steps adds to the log of the run it completes
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch, open(args.out / "gpu_check.log", mode) as log:
        ctx = Context(args.out, Path(scratch), args.smoke)
        write_report(args.out, report)
        for step in chosen:
            run_step(step, ctx, report["steps"][step.name], deadline, log)
            report["wall_s"] = time.time() - start
            write_report(args.out, report)
    report["wall_s"] = time.time() - start
    report["finished"] = True
    write_report(args.out, report)
    print(gpu_check_report.markdown(report))
    steps_ok = all(entry["status"] == "ok" for entry in report["steps"].values())
    return 0 if steps_ok and all(t["verdict"] != "FAIL" for t in report["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
