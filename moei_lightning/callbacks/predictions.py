"""``predictions.jsonl``: what ``predict`` generated, one JSON object a line, in the run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer

FIELDS = ("id", "task", "aspect", "prompt", "prediction", "target")


class PredictionWriter(Callback):
    """Collect ``predict_step``'s rows and write them to ``path`` when prediction ends.

    Rows from every rank are gathered and written once, by rank 0; an id seen twice (a rank's padding
    under data parallelism) is written once. The file is written beside its name and renamed, so it
    is never half written.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.rows = []

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        self.rows.extend({key: row.get(key) for key in FIELDS} for row in outputs or [])

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rows = self.rows
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if not trainer.is_global_zero:
            return
        seen: set[str] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.partial")
        with partial.open("w", encoding="utf-8") as f:
            for row in rows:
                if row["id"] in seen:
                    continue
                seen.add(row["id"])
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        partial.replace(self.path)
        print(f"predictions: {len(seen)} written to {self.path}")
