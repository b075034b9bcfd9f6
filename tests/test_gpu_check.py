"""The GPU check: its smoke run writes every step's result, targets are judged from the numbers, a step that
overruns is killed and reported."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, load_benchmark, run_benchmark

STEPS = ["train_step", "scale_7b", "scale_13b", "generate", "tiny_bf16", "fsdp2"]


@pytest.fixture
def check(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # gpu_check imports its report module by name
    return load_benchmark("gpu_check")


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_smoke_run_writes_every_step(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_benchmark("gpu_check", "--smoke", "--out", str(out), cwd=tmp_path, timeout=420)
    assert result.returncode == 0, result.stdout[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["smoke"] and report["finished"]
    assert list(report["steps"]) == STEPS
    for name, step in report["steps"].items():
        assert step["status"] == "ok", (name, step.get("tail"))
        assert step["result"], name
    assert report["steps"]["fsdp2"]["result"]["checks"] == {
        "one step runs": True,
        "the checkpoint holds the adapters only": True,
        "the checkpoint loads and training resumes": True,
    }
    assert len(report["targets"]) == 9
    assert {t["verdict"] for t in report["targets"]} == {"SKIP"}  # tiny CPU numbers judge nothing
    table = (out / "gpu_check.md").read_text()
    for name in STEPS:
        assert f"| {name} | " in table and f"## {name}\n" in table
    assert table.count("- SKIP: ") == 9
    log = (out / "gpu_check.log").read_text()
    assert all(f"===== {name}: " in log for name in STEPS)
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md", "runs"]
    assert (out / "runs" / "tiny-bf16" / "summary.json").is_file()


@pytest.mark.slow
def test_a_rerun_of_some_steps_completes_the_earlier_report(tmp_path: Path) -> None:
    def run(only: str) -> subprocess.CompletedProcess:
        return run_benchmark("gpu_check", "--smoke", "--out", str(tmp_path), "--only", only)

    assert run("scale_13b").returncode == 1  # the other steps' targets have no result yet
    assert run("scale_7b").returncode == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["steps"]) == ["scale_7b", "scale_13b"]  # in the check's order
    assert all(step["status"] == "ok" and step["result"]["rows"] for step in report["steps"].values())
    targets = {t["target"]: t for t in report["targets"]}
    assert targets[next(t for t in targets if t.startswith("the whole check"))]["verdict"] == "SKIP"
    assert "step train_step has not run" in targets[next(iter(targets))]["detail"]
    log = (tmp_path / "gpu_check.log").read_text()
    assert log.index("===== scale_13b: ") < log.index("===== scale_7b: ")


def gpu_report(**overrides) -> dict:
    """A finished GPU report with every step's result; MoEI meets every target unless ``overrides`` says not."""
    train = {
        "experts": 8,
        "rank": 8,
        "repeats": 15,
        "reference": "peft_lora_r64",
        "variants": {
            name: {"x_paired": x, "paired_iqr": [x - 0.01, x + 0.01], "tokens_per_s": 1e4 / x, "peak_mib": peak}
            | {"state_mib": 10.0}
            for name, x, peak in (
                ("peft_lora_r64", 1.0, 1000.0),
                ("lora_r64", 0.99, 1000.0),
                ("molora_8x8_prompt", overrides.get("molora_time", 0.98), overrides.get("molora_peak", 1040.0)),
            )
        },
    }
    generate = {
        "experts": 8,
        "rank": 8,
        "batches": {
            batch: {
                name: {"x_peft_paired": x, "paired_iqr": [x, x], "tokens_per_s": 100 * x}
                for name, x in (
                    ("frozen", 1.1),
                    ("peft_lora_r64", 1.0),
                    ("moei_8x8_prompt", overrides.get("moei", 0.95)),
                )
            }
            for batch in ("1", "16")
        },
    }
    tiny = {
        "before": {"ei": 19.6, "gi": 99.6, "gate_ei": 0.5, "gate_gi": 0.5},
        "after": {"ei": 53.8, "gi": 99.2, "gate_ei": 0.999, "gate_gi": overrides.get("gate_gi", 0.008)},
        "change": {"ei": 34.2, "gi": overrides.get("gi_change", -0.4), "gate_ei": 0.5, "gate_gi": -0.49},
    }
    checks = {"one step runs": True, "the checkpoint holds the adapters only": True}
    checks["the checkpoint loads and training resumes"] = True
    results = {"train_step": train, "generate": generate, "tiny_bf16": tiny, "fsdp2": {"checks": checks}}
    steps = {name: {"status": "ok", "result": result} for name, result in results.items()}
    for name, status in overrides.get("statuses", {}).items():
        steps[name] = {"status": status, "error": "exit status 1"}
    return {
        "smoke": False,
        "finished": True,
        "only": None,
        "total_s": 480,
        "install_included": True,
        "wall_s": overrides.get("wall_s", 400.0),
        "steps": steps,
    }


def verdicts(report: dict) -> list[str]:
    return [t["verdict"] for t in load_benchmark("gpu_check_report").targets(report)]


def test_targets_pass_on_numbers_that_meet_them() -> None:
    assert verdicts(gpu_report()) == ["PASS"] * 9


@pytest.mark.parametrize(
    ("overrides", "failing"),
    [
        ({"molora_time": 1.02}, 0),  # 2 % slower than PEFT's LoRA
        ({"molora_peak": 1060.0}, 1),  # (1060 + 10) / (1000 + 10) = 1.059 > 1.05
        ({"moei": 0.89}, 3),  # batch 1 (and 16)
        ({"gi_change": -1.1}, 5),
        ({"gate_gi": 0.06}, 6),
        ({"wall_s": 481.0}, 8),
    ],
)
def test_targets_fail_on_numbers_that_miss_them(overrides: dict, failing: int) -> None:
    result = verdicts(gpu_report(**overrides))
    assert result[failing] == "FAIL"
    assert result.count("PASS") >= 7


def test_a_step_without_result_fails_its_targets() -> None:
    report = gpu_report(statuses={"generate": "timeout", "fsdp2": "failed"})
    targets = load_benchmark("gpu_check_report").targets(report)
    assert [t["verdict"] for t in targets] == ["PASS"] * 3 + ["FAIL"] * 2 + ["PASS"] * 2 + ["FAIL", "PASS"]
    assert "step generate gave no result (exit status 1)" in targets[3]["detail"]


def test_a_step_that_overruns_is_killed_and_its_output_kept(check, tmp_path: Path) -> None:
    command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"]
    started = time.perf_counter()
    with open(tmp_path / "log", "w") as log:
        status, code, tail = check.run_command("sleeper", command, dict(os.environ), 5, log)
    assert time.perf_counter() - started < 60
    assert status == "timeout" and code != 0
    assert tail == ["started"]
    assert "===== sleeper: " in (tmp_path / "log").read_text()
