"""Both analysis notebooks run headless against runs made here by tiny fits, with no network and no W&B."""

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from moei_lightning.cli import main
from moei_lightning.data import SAMPLES_DIR
from tests.conftest import REPO

KERNEL = "moei-notebook-test"


def few_per_task(source: Path, target: Path, keep: int = 2) -> Path:
    """The first ``keep`` records of every task: every aspect is evaluated, in a fraction of the time."""
    seen: dict[str, int] = {}
    lines = []
    for line in source.read_text().splitlines():
        task = json.loads(line)["task"]
        seen[task] = seen.get(task, 0) + 1
        if seen[task] <= keep:
            lines.append(line)
    target.write_text("\n".join(lines) + "\n")
    return target


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A MoEI run and a LoRA run of a few steps each, with router statistics and metrics."""
    root = tmp_path_factory.mktemp("runs")
    val = {
        domain: few_per_task(SAMPLES_DIR / domain / "val.jsonl", root / f"{domain}-val.jsonl")
        for domain in ("ei", "gi")
    }
    made = []
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MOEI_RUN_DIR", raising=False)
        env.setattr(sys, "argv", ["moei_lightning"])  # the CLI reads its arguments from args, not pytest's
        for adapter in ("molora", "lora"):
            args = ["fit", "--config", str(REPO / "conf" / "tiny.yaml"), f"--model.adapter={adapter}"]
            args += ["--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.log_every_n_steps=2"]
            args += ["--trainer.logger=false", "--model.max_new_tokens=4", f"--run_dir={root / adapter}"]
            args += [f"--data.ei_val={val['ei']}", f"--data.gi_val={val['gi']}"]
            main(args)
            env.delenv("MOEI_RUN_DIR", raising=False)  # each run picks its own directory
            made.append(root / adapter)
    return made


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernel spec that runs this interpreter, so a fresh virtualenv needs no installed kernel."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


def execute(name: str, kernel: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    client = NotebookClient(notebook, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(REPO)}})
    client.execute()  # a failing cell raises CellExecutionError with its traceback
    return notebook


def images(notebook: nbformat.NotebookNode) -> int:
    outputs = (o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    return sum("image/png" in o.get("data", {}) for o in outputs)


@pytest.mark.slow
def test_router_analysis(runs: list[Path], kernel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEI_NOTEBOOK_RUN", str(runs[0]))
    monkeypatch.setenv("MOEI_NOTEBOOK_FIGURES", str(tmp_path / "figures"))
    notebook = execute("router_analysis.ipynb", kernel)
    assert images(notebook) == 3
    for figure in ("gate_distributions.png", "gate_evolution.png", "expert_usage.png", "layer_separation.csv"):
        assert (tmp_path / "figures" / figure).stat().st_size > 0, figure
    assert len((tmp_path / "figures" / "layer_separation.csv").read_text().splitlines()) == 1 + 4  # 4 layers


@pytest.mark.slow
def test_compare_runs(runs: list[Path], kernel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEI_NOTEBOOK_RUNS", ":".join(str(r) for r in runs))
    monkeypatch.setenv("MOEI_NOTEBOOK_FIGURES", str(tmp_path / "figures"))
    monkeypatch.delenv("MOEI_NOTEBOOK_WANDB", raising=False)
    notebook = execute("compare_runs.ipynb", kernel)
    assert images(notebook) == 1
    assert (tmp_path / "figures" / "comparison.png").stat().st_size > 0
    table = (tmp_path / "figures" / "comparison.csv").read_text().splitlines()
    assert table[0] == "domain,aspect,metric,molora (molora),lora (lora)"
    assert any(line.startswith("ei,perception,acc,") for line in table)
    assert any(line.startswith("gi,knowledge,acc,") for line in table)
