"""Test-wide settings and the helpers tests share: no network, no W&B account, the shared benchmark data,
the CLI as a subprocess, two gloo ranks, model digests and the benchmark scripts as modules."""

import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch import Callback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Preset tokenizers are trained into this cache; tests and their subprocesses share a throwaway one.
os.environ.setdefault("MOEI_CACHE", tempfile.mkdtemp(prefix="moei-cache-"))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MOEI_SHARED_DATA", REPO.parent / "shared" / "data"))
SAMPLES = REPO / "moei_lightning" / "data" / "samples"
# The tests' own configs (tests/configs/), not conf/'s: retuning the embedded demo changes no test.
TEST_CONF = REPO / "tests" / "configs"
LLAMA_CONFIG = str(TEST_CONF / "llama.yaml")
T5_CONFIG = str(TEST_CONF / "t5.yaml")
EVAL_CONFIG = str(TEST_CONF / "eval.yaml")


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m moei_lightning ARGS`` as a user runs it, importing this checkout, with W&B offline (``env``: more
    variables)."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(env or {})}
    env.pop("MOEI_RUN_DIR", None)
    for key in [k for k in env if k.startswith(("WANDB_SERVICE", "_WANDB"))]:
        env.pop(key)  # a W&B service an in-process test started would hold the child's runs (run ID in use)
    return subprocess.run(
        [sys.executable, "-m", "moei_lightning", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(autouse=True)
def no_run_directory_from_an_earlier_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CLI built in-process without ``main`` (``MoEICLI(...)``) sets MOEI_RUN_DIR for the processes
    its run would start; the next test must not inherit that run's directory."""
    from moei_lightning.cli import RUN_DIR_ENV  # here: transformers must be imported after HF_HUB_OFFLINE is set

    monkeypatch.delenv(RUN_DIR_ENV, raising=False)


@pytest.fixture
def shared_data() -> Path:
    """The third-party benchmark files (EQ-Bench, EmoBench); the test is skipped when they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared benchmark data not found at {SHARED_DATA} (set MOEI_SHARED_DATA to its folder)")
    return SHARED_DATA


def one_per_task(split: str, directory: Path) -> dict[str, list[str]]:
    """The first bundled record of every task of ``split``, written to ``directory``, as MoEIDataModule arguments
    (``ei_val``/``gi_val`` for "val"): every task, aspect and domain in a few examples (val: 9 EI, 4 GI)."""
    files = {}
    for domain in ("ei", "gi"):
        seen, lines = set(), []
        for line in (SAMPLES / domain / f"{split}.jsonl").read_text().splitlines():
            task = json.loads(line)["task"]
            if task not in seen:
                seen.add(task)
                lines.append(line)
        path = directory / f"{domain}-{split}-one-per-task.jsonl"
        path.write_text("\n".join(lines) + "\n")
        files[f"{domain}_{split}"] = [str(path)]
    return files


def run_benchmark(name: str, *args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python benchmarks/<name>.py ARGS`` as a user runs it, importing this checkout."""
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (the folder is scripts, not a package; they import its ``common``)."""
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def state_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every tensor of the state dict, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def preset_digest(model: torch.nn.Module, tokenizer) -> str:
    """Weights plus the token ids of a probe sentence, so tokenizer drift shows up too."""
    return state_digest(model) + str(tokenizer("I feel happy, naïve café!").input_ids)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, fn: Callable[[int], object], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result = fn(rank)
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def on_two_ranks(fn: Callable[[int], object], tmp_path: Path) -> list[object]:
    """``fn(rank)`` in two gloo processes; returns each rank's JSON-able result."""
    mp.spawn(_rank_main, args=(free_port(), fn, str(tmp_path)), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


class SignalAtStep(Callback):
    """For subprocess runs (a ``trainer.callbacks`` class path): at the end of training step ``step`` the
    process sends itself ``signum``, as a scheduler or a Ctrl+C would, at a reproducible moment."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class PoisonAtStep(Callback):
    """For subprocess runs: after training step ``step`` one adapter tensor turns NaN, as a diverged run's would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(p for n, p in pl_module.named_parameters() if n.endswith("lora_B")).fill_(float("nan"))


class ThreadWorld:
    """Ranks as threads: an all-gather built on a barrier, so sharded_map runs as it would across processes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list = [None] * size
        self.barrier = threading.Barrier(size, timeout=300)

    def gather_for(self, rank: int):
        def gather(obj: object, world_size: int) -> list:
            assert world_size == self.size
            self.slots[rank] = obj
            self.barrier.wait()
            gathered = list(self.slots)
            self.barrier.wait()
            return gathered

        return gather

    def run(self, fn: Callable[[int], object]) -> list:
        """``fn(rank)`` on every rank at once; results in rank order. A failing rank releases the others."""
        outputs: list = [None] * self.size
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                outputs[rank] = fn(rank)
            except BaseException as err:
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return outputs
