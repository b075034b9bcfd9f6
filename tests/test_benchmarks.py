"""The speed benchmarks run (at a tiny size) and print their side-by-side tables and targets."""

import pytest

from tests.conftest import load_benchmark


def test_molora_layer_benchmark_smoke(capsys: pytest.CaptureFixture) -> None:
    assert load_benchmark("molora_layer").main(["--smoke"]) == 0
    out = capsys.readouterr().out
    for variant in ("frozen", "own_lora_r64", "naive_loop_8", "molora_8x8"):
        assert variant in out
    assert "target naive_loop_8 / molora_8x8 >= 1.8" in out


def test_train_step_benchmark_smoke(capsys: pytest.CaptureFixture) -> None:
    benchmark = load_benchmark("train_step")
    assert benchmark.main(["--smoke", "--clock", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|")[2:] for line in out.splitlines() if line.startswith("| ")}
    routings = benchmark.routings()
    expected = ["frozen", "peft_lora_r8", "lora_r8", *(f"molora_2x4_{r}" for r in routings)]
    assert [name for name in rows if name != "variant"] == expected
    assert "token" in routings and len(routings) >= 2
    assert float(rows["peft_lora_r8"][3]) == 1.0  # ratios are against PEFT's LoRA
    assert float(rows["peft_lora_r8"][5]) == 1.0  # paired: each round against PEFT's time in that round
    assert rows["peft_lora_r8"][6].strip() == "1.000-1.000"
    assert benchmark.paired_ratios([2.0, 3.0, 8.0], [1.0, 2.0, 4.0]) == (1.75, 2.0, 2.0)
    assert all(float(cells[0]) > 0 for name, cells in rows.items() if name != "variant")


def _run(ei: float, gi: float, reading: float, gate_gi: float, ratio: float) -> dict:
    return {
        "ei": ei,
        "gi": gi,
        "gi_dims": {"knowledge": 100.0, "reading": reading},
        "gate_ei": 0.99,
        "gate_gi": gate_gi,
        "health": {"worst_loss_ratio": ratio, "gate_gi_worst_after_shut": gate_gi, "trajectory": [[25, 0.9, gate_gi]]},
    }


def _results(moei: list[dict], lora: list[dict]) -> dict:
    def method(runs: list[dict]) -> dict:
        return {
            "lr": 3e-3,
            "runs": [{"seed": i % 2, "threads": 1 + i // 2} for i in range(len(runs))],
            "ei": [r["ei"] for r in runs],
            "gi": [r["gi"] for r in runs],
            "gate_ei": [r["gate_ei"] for r in runs],
            "gate_gi": [r["gate_gi"] for r in runs],
            "ei_aspects": [{"perception": r["ei"]} for r in runs],
            "gi_dimensions": [r["gi_dims"] for r in runs],
            "health": [r["health"] for r in runs],
            "wall_s": [1.0 for _ in runs],
        }

    base = {
        "ei": 25.0,
        "gi": 100.0,
        "ei_aspects": {"perception": 25.0},
        "gi_dimensions": {"knowledge": 100.0, "reading": 100.0},
    }
    return {"base": base, "threads": [1, 2], "methods": {"moei": method(moei), "lora": method(lora)}}


def test_both_matter_checks_every_run_and_the_paired_difference() -> None:
    bench = load_benchmark("both_matter")
    good = [_run(60.0 + i, 99.8, 100.0, 0.01, 1.2) for i in range(4)]
    lora = [_run(58.0 + 2 * i, 90.0, 80.0, 1.0, 1.1) for i in range(4)]
    checks = dict((text.split(" (")[0], ok) for text, ok in bench.targets(_results(good, lora)))
    assert all(checks.values()), checks
    texts = [text for text, _ in bench.targets(_results(good, lora))]
    # differences 2, 1 (seeds 0, 1 at one thread), 0, -1 (at two): seed means 1.0, 0.0, sd 0.71, t(1) 12.71 -> 6.35
    assert "mean difference +0.5 points, 95 % interval [-5.9, +6.9] over 2 seeds, each its runs' mean" in texts[-1]

    # one run of four losing a reading item too many, one spiking, one leaking: each rule fails on its own
    for bad, rule in (
        (_run(61.0, 99.0, 97.0, 0.01, 1.2), "MoEI every GI dimension within 2 points in every run"),
        (_run(61.0, 99.8, 100.0, 0.01, 2.5), "No loss spike in any MoEI run"),
        (_run(61.0, 99.8, 100.0, 0.2, 1.2), "MoEI gate on GI <= 0.05 in every run"),
        (_run(61.0, 98.5, 100.0, 0.01, 1.2), "MoEI GI change >= -1.0 in every run"),
    ):
        checks = dict((text.split(" (")[0], ok) for text, ok in bench.targets(_results([*good[:3], bad], lora)))
        assert [name for name, ok in checks.items() if not ok] == [rule]

    table = bench.run_table(_results(good, lora), "moei")
    assert table.splitlines()[2] == "| 0 | 1 | +35.0 | -0.2 | knowledge +0.0 | 0.990 | 0.010 | 1.20 | 0.010 |"


def test_both_matter_checks_the_claim_in_every_accuracy() -> None:
    """The accuracy targets run again on each metric besides the primary one, and the run table shows both."""
    bench = load_benchmark("both_matter")
    good = [_run(60.0 + i, 99.8, 100.0, 0.01, 1.2) for i in range(4)]
    lora = [_run(58.0 + 2 * i, 90.0, 80.0, 1.0, 1.1) for i in range(4)]
    results = _results(good, lora)
    acc = _results([_run(50.0, 98.0, 100.0, 0.01, 1.2) for _ in range(4)], [_run(70.0, 90.0, 80.0, 1.0, 1.1)] * 4)
    keys = ("ei", "gi", "ei_aspects", "gi_dimensions")
    results["primary_metric"] = "acc_norm"
    results["base"]["by_metric"] = {"acc_norm": {k: results["base"][k] for k in keys}, "acc": acc["base"]}
    for name, method in results["methods"].items():
        method["by_metric"] = {
            "acc_norm": {k: method[k] for k in keys},
            "acc": {k: acc["methods"][name][k] for k in keys},
        }
    failed = [text.split(" (")[0] for text, ok in bench.targets(results) if not ok]
    assert failed == ["acc: MoEI GI change >= -1.0 in every run", "acc: MoEI EI gain >= LoRA EI gain"]
    row = bench.run_table(results, "moei").splitlines()[2]
    assert row.startswith("| 0 | 1 | +35.0 / +25.0 | -0.2 / -2.0 |")  # acc_norm, then acc


def test_both_matter_tables_both_accuracies_of_the_summaries() -> None:
    bench = load_benchmark("both_matter")

    def block(acc: float, acc_norm: float) -> dict:
        """A summary.json block: EI and GI, each accuracy per group with its average."""
        return {
            "ei": {"acc": {"perception": acc, "avg": acc}, "acc_norm": {"perception": acc_norm, "avg": acc_norm}},
            "gi": {"acc": {"knowledge": 99.0, "avg": 99.0}, "acc_norm": {"knowledge": 100.0, "avg": 100.0}},
        }

    runs = bench.by_metric([block(50.0, 25.0), block(60.0, 35.0)])
    assert runs["acc"]["ei"] == [50.0, 60.0] and runs["acc_norm"]["gi"] == [100.0, 100.0]
    assert runs["acc_norm"]["ei_aspects"] == [{"perception": 25.0}, {"perception": 35.0}]
    base = {metric: bench.accuracies(block(30.0, 25.0), metric) for metric in ("acc", "acc_norm")}
    moei = {"lr": 3e-3, **runs["acc_norm"], "by_metric": runs, "gate_ei": [0.99] * 2, "gate_gi": [0.01] * 2}
    results = {
        "primary_metric": "acc_norm",
        "base": {**base["acc_norm"], "by_metric": base},
        "methods": {"moei": {**moei, "wall_s": [1.0, 1.0]}},
    }
    assert "| 55.0±7.1 | 55.0±7.1 | +25.0 |" in bench.table(results, "acc")  # EI 50 and 60 against 30
    assert "| 30.0±7.1 | 30.0±7.1 | +5.0 |" in bench.table(results, "acc_norm")
    assert "| 99.0 | 99.0 |" in bench.table(results, "acc")  # the base's GI by summed log-likelihood
