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
