"""Both analysis notebooks run headless against runs made here by tiny fits, with no network and no W&B."""

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from moei_lightning.callbacks.stats_files import ROUTER_FILE, append_rows, read_rows
from moei_lightning.cli import main
from moei_lightning.data import SAMPLES_DIR
from moei_lightning.eval.report import SUMMARY_COLUMNS, Report, Table
from moei_lightning.notebooks import output_dir, resolve, wilson
from tests.conftest import LLAMA_CONFIG, REPO

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
            args = ["fit", "--config", LLAMA_CONFIG, f"--model.adapter={adapter}"]
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


def execute(name: str, kernel: str, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    """Run a notebook as `jupyter lab notebooks/NAME` launched from the repo root runs it: kernel in notebooks/."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PWD", str(REPO))
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    path = str(REPO / "notebooks")
    client = NotebookClient(notebook, kernel_name=kernel, timeout=300, resources={"metadata": {"path": path}})
    client.execute()  # a failing cell raises CellExecutionError with its traceback
    return notebook


def relative(path: Path) -> str:
    """``path`` as typed from the repository root."""
    return os.path.relpath(path, REPO)


def images(notebook: nbformat.NotebookNode) -> int:
    outputs = (o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    return sum("image/png" in o.get("data", {}) for o in outputs)


@pytest.mark.slow
def test_router_analysis(runs: list[Path], kernel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEI_NOTEBOOK_RUN", relative(runs[0]))
    monkeypatch.setenv("MOEI_NOTEBOOK_FIGURES", relative(tmp_path / "figures"))
    notebook = execute("router_analysis.ipynb", kernel, monkeypatch)
    assert images(notebook) == 3
    for figure in ("gate_distributions.png", "gate_evolution.png", "expert_usage.png", "layer_separation.csv"):
        assert (tmp_path / "figures" / figure).stat().st_size > 0, figure
    assert len((tmp_path / "figures" / "layer_separation.csv").read_text().splitlines()) == 1 + 4  # 4 layers
    assert not (REPO / "notebooks" / "runs").exists()


@pytest.mark.slow
def test_router_analysis_compares_a_snapshot_that_holds_both_domains(
    runs: list[Path], kernel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    rows = read_rows(run, ROUTER_FILE)
    last = max(r["step"] for r in rows)
    # a short `test` afterwards that saw EI records only: the newest snapshot has no GI tokens
    append_rows(run, ROUTER_FILE, [dict(r, stage="test", step=last) for r in rows if r["domain"] == "ei"][:8])
    monkeypatch.setenv("MOEI_NOTEBOOK_RUN", relative(run))
    monkeypatch.setenv("MOEI_NOTEBOOK_FIGURES", relative(tmp_path / "figures"))
    notebook = execute("router_analysis.ipynb", kernel, monkeypatch)
    printed = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert f"final snapshot: stage 'val', step {last}" in printed, printed


@pytest.mark.slow
def test_router_analysis_without_stats_says_so_and_writes_nothing(
    kernel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "stats-off"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("router_stats:\n  stages: []\n")
    monkeypatch.setenv("MOEI_NOTEBOOK_RUN", relative(run))
    monkeypatch.delenv("MOEI_NOTEBOOK_FIGURES", raising=False)
    with pytest.raises(CellExecutionError, match=r"router\.jsonl does not exist, so this run has no statistics"):
        execute("router_analysis.ipynb", kernel, monkeypatch)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]  # no figures/ made


def write_report(run: Path) -> None:
    """A test report as the paper evaluation writes it: EI aspects (one open), GI, EQ-Bench."""
    rows = [
        ["EI", "perception", 50.0, 40, "size-weighted mean of 2 choice tasks (acc_norm)", "test/ei/perception/score"],
        ["EI", "expression", 21.5, 20, "size-weighted mean of 1 open task (ROUGE-L)", "test/ei/expression/score"],
        ["EI", "average", 35.75, 60, "size-weighted mean of 2 aspects", "test/ei/avg"],
        ["GI", "knowledge", 25.0, 100, "size-weighted mean of 1 task (acc_norm)", "test/gi/knowledge/score"],
        ["GI", "average", 25.0, 100, "size-weighted mean of 1 dimension", "test/gi/avg"],
        ["EQ-Bench v2", "score", None, 20, "0 of 20 parseable", "test/eq_bench_v2/score"],
    ]
    summary = Table("Summary", SUMMARY_COLUMNS, rows)
    Report(summary, config={"adapter": "molora"}).write(run)
    (run / "config.yaml").write_text("model:\n  adapter: molora\n")


@pytest.mark.slow
def test_compare_runs(runs: list[Path], kernel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tested = tmp_path / "molora-tested"
    tested.mkdir()
    write_report(tested)
    monkeypatch.setenv("MOEI_NOTEBOOK_RUNS", ":".join(relative(r) for r in [*runs, tested]))
    monkeypatch.setenv("MOEI_NOTEBOOK_FIGURES", relative(tmp_path / "figures"))
    monkeypatch.delenv("MOEI_NOTEBOOK_SOURCE", raising=False)
    notebook = execute("compare_runs.ipynb", kernel, monkeypatch)
    assert images(notebook) == 1
    assert (tmp_path / "figures" / "comparison.png").stat().st_size > 0
    table = list(csv.DictReader((tmp_path / "figures" / "comparison.csv").open()))
    assert list(table[0]) == ["suite", "measure", "run", "score", "n", "ci_low", "ci_high", "source"]
    assert {row["run"] for row in table} == {"molora", "lora", "molora-tested"}  # no "molora (molora)"
    fitted = {(r["run"], r["suite"], r["measure"]): r for r in table if r["source"] == "summary.json (val)"}
    perception = fitted[("molora", "EI", "perception")]
    n, score = int(perception["n"]), float(perception["score"])
    assert n > 0 and 0 <= float(perception["ci_low"]) <= score <= float(perception["ci_high"]) <= 100
    assert 0 < int(fitted[("lora", "GI", "knowledge")]["n"]) < int(fitted[("lora", "GI", "average")]["n"])
    reported = {r["measure"]: r for r in table if r["run"] == "molora-tested"}
    assert (float(reported["perception"]["ci_low"]), float(reported["perception"]["ci_high"])) == pytest.approx(
        (35.2, 64.8), abs=0.05
    )  # Wilson 95% of 20 / 40
    assert reported["expression"]["ci_low"] == "" and reported["score"]["score"] == ""  # ROUGE-L, failed EQ-Bench


def test_paths_resolve_from_the_launch_directory_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    launch, kernel_dir = tmp_path / "repo", tmp_path / "repo" / "notebooks"
    (launch / "runs" / "a").mkdir(parents=True)
    kernel_dir.mkdir()
    monkeypatch.chdir(kernel_dir)
    monkeypatch.setenv("PWD", str(launch))
    assert resolve("runs/a", "MOEI_NOTEBOOK_RUN") == launch / "runs" / "a"
    assert output_dir("figs") == launch / "figs" and not (launch / "figs").exists()
    monkeypatch.delenv("PWD")
    assert resolve("runs/a", "MOEI_NOTEBOOK_RUN") == launch / "runs" / "a"  # kernel in notebooks/: the repo root
    with pytest.raises(FileNotFoundError, match=r"MOEI_NOTEBOOK_RUN='runs/b': no such directory; tried .*runs/b"):
        resolve("runs/b", "MOEI_NOTEBOOK_RUN")


def test_wilson_interval_matches_the_formula() -> None:
    assert wilson(50.0, 40) == pytest.approx((35.20, 64.80), abs=0.01)
    low, high = wilson(0.0, 10)
    assert low == 0.0 and high == pytest.approx(27.75, abs=0.01)  # an empty score still has an upper bound
