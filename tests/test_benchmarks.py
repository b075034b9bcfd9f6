"""The speed benchmark runs (at a tiny size) and prints its side-by-side table and targets."""

import subprocess
import sys

from tests.conftest import REPO


def test_molora_layer_benchmark_smoke() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "molora_layer.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    for variant in ("frozen", "own_lora_r64", "naive_loop_8", "molora_8x8"):
        assert variant in result.stdout
    assert "target naive_loop_8 / molora_8x8 >= 1.8" in result.stdout
