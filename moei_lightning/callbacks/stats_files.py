"""The local copy of what the callbacks log: JSON lines under ``<run dir>/stats/``, readable without W&B.

- ``stats/router.jsonl``: one row per logged step (or evaluation epoch), layer, domain and aspect;
  written by :class:`~moei_lightning.callbacks.RouterStatsCallback`.
- ``stats/train.jsonl``: one row per logged training step: the loss terms and, per optimizer group,
  the learning rate, gradient norm and update size; written by
  :class:`~moei_lightning.callbacks.TrainingHealth`.
- ``stats/metrics.jsonl``: one row per evaluation epoch and logged metric key; written by
  :class:`~moei_lightning.callbacks.EiMetricsCallback`.

Rows are appended and flushed as they are logged, so a crashed or running job can be read too.
The row fields are documented in ``docs/monitoring.md``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

STATS_DIR = "stats"
ROUTER_FILE = "router.jsonl"
METRICS_FILE = "metrics.jsonl"
TRAIN_FILE = "train.jsonl"


def append_rows(run_dir: str | Path, file_name: str, rows: Iterable[dict[str, Any]]) -> Path:
    """Append ``rows`` to ``<run_dir>/stats/<file_name>``, one JSON object per line."""
    path = Path(run_dir) / STATS_DIR / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def read_rows(run_dir: str | Path, file_name: str) -> list[dict[str, Any]]:
    """Every row of ``<run_dir>/stats/<file_name>``; a missing file is an error that says what writes it."""
    path = Path(run_dir) / STATS_DIR / file_name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: it is written during fit/validate/test by the "
            f"{'router_stats' if file_name == ROUTER_FILE else 'ei_metrics'} callback"
        )
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def find_runs(root: str | Path = "runs", file_name: str = ROUTER_FILE) -> list[Path]:
    """Run directories under ``root`` that hold ``stats/<file_name>``, oldest first (by that file's time)."""
    files = Path(root).glob(f"*/{STATS_DIR}/{file_name}")
    return [f.parent.parent for f in sorted(files, key=lambda f: f.stat().st_mtime)]


def latest_run(root: str | Path = "runs", file_name: str = ROUTER_FILE) -> Path:
    """The run directory under ``root`` whose ``stats/<file_name>`` changed last."""
    runs = find_runs(root, file_name)
    if not runs:
        raise FileNotFoundError(
            f"no run under {Path(root).resolve()} has {STATS_DIR}/{file_name}; train one first "
            "(python -m moei_lightning fit --config conf/tiny.yaml) or point the notebook at a run directory"
        )
    return runs[-1]
