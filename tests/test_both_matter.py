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


def fit_summary(tmp_path: Path, name: str, *overrides: str, threads: int | None = None) -> dict:
    run_dir = tmp_path / name
    config = str(REPO / "conf" / "tiny.yaml")
    env = None if threads is None else {"OMP_NUM_THREADS": str(threads)}
    result = run_cli(
        "fit", "--config", config, *SHORT, *QUIET, *overrides, f"--run_dir={run_dir}", cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Fit summary: test split" in result.stdout
    assert (run_dir / "summary.md").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["primary_metric"] == {"ei": "acc_norm", "gi": "acc_norm"}
    test = summary["splits"]["test"]
    for when in ("before", "after", "change"):  # the primary accuracy, as the claim reads it
        for domain in ("ei", "gi"):
            test[when][domain] = test[when][domain]["acc_norm"]
    return test


@pytest.mark.slow
def test_moei_keeps_gi_at_one_and_two_threads_where_full_fine_tuning_moves_it(tmp_path: Path) -> None:
    # The thread count changes how matrix products are summed, so the two MoEI fits take different paths.
    runs = {threads: fit_summary(tmp_path, f"moei-t{threads}", threads=threads) for threads in (1, 2)}
    full = fit_summary(tmp_path, "full", "--model.adapter=full", "--model.optimizer.init_args.lr=0.001")
    assert full["before"]["gi"]["avg"] >= 90.0  # the shipped backbone knows its GI tasks
    for moei in runs.values():
        assert moei["before"]["gi"] == full["before"]["gi"]  # every run starts from the same backbone
        assert abs(moei["change"]["gi"]["avg"]) <= 1.0, moei["change"]
        assert moei["change"]["ei"]["avg"] > 5.0, moei["change"]
        assert moei["after"]["gate_gi"] < 0.1 < 0.8 < moei["after"]["gate_ei"], moei["after"]
    assert runs[1]["after"] != runs[2]["after"]  # two trajectories, not one run twice
    assert abs(full["change"]["gi"]["avg"]) > 1.0, full["change"]
