"""The claim, small: a short MoEI fit keeps the shipped backbone's GI while full fine-tuning moves it.

Both runs go through the command line a user types, from the embedded default (conf/tiny.yaml: the
GI-pretrained ``tiny-llama-gi`` preset and the bundled synthetic data), and read the ``summary.json``
the fit writes. ``benchmarks/both_matter.py`` is the full version (every method, several seeds).
"""

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

SHORT = ["--trainer.max_steps=150", "--trainer.logger=false", "--trainer.limit_val_batches=0"]
QUIET = ["--ei_metrics.stages=[]", "--router_stats.stages=[]", "--summary.splits=[test]"]


def fit_summary(tmp_path: Path, name: str, *overrides: str) -> dict:
    run_dir = tmp_path / name
    config = str(REPO / "conf" / "tiny.yaml")
    result = run_cli("fit", "--config", config, *SHORT, *QUIET, *overrides, f"--run_dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Fit summary: test split" in result.stdout
    assert (run_dir / "summary.md").is_file()
    return json.loads((run_dir / "summary.json").read_text())["splits"]["test"]


@pytest.mark.slow
def test_moei_keeps_gi_where_full_fine_tuning_moves_it(tmp_path: Path) -> None:
    moei = fit_summary(tmp_path, "moei")
    full = fit_summary(tmp_path, "full", "--model.adapter=full", "--model.optimizer.init_args.lr=0.001")
    assert moei["before"]["gi"]["avg"] >= 90.0  # the shipped backbone knows its GI tasks
    assert moei["before"]["gi"] == full["before"]["gi"]  # both start from the same backbone
    assert abs(moei["change"]["gi"]["avg"]) <= 1.0, moei["change"]
    assert moei["change"]["ei"]["avg"] > 5.0, moei["change"]
    assert moei["after"]["gate_gi"] < 0.1 < 0.8 < moei["after"]["gate_ei"], moei["after"]
    assert abs(full["change"]["gi"]["avg"]) > 1.0, full["change"]
