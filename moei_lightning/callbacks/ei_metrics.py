"""EiMetricsCallback: per-task and per-aspect EI metrics and per-dimension GI accuracy on validation and test.

At the end of each validation (and test) epoch it answers the split's records with the model through
the evaluation runner (:class:`~moei_lightning.eval.harness.Harness`): choice records by
log-likelihood (acc and acc_norm), open records by greedy generation. The runner deals the records out so
that every rank makes the same forward and generate calls and gets every answer back; the rows come
from the one scorer (:func:`~moei_lightning.eval.scorer.score_rows`), in percent. They are logged
through the LightningModule (so checkpoints can monitor them, e.g. ``val/ei/avg``) and appended to
``stats/metrics.jsonl`` by rank 0.

When the ``test`` evaluation (the ``eval:`` section) scores the EI/GI
suites itself, this callback leaves the test split to it, and ``test`` reports one set of numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from moei_lightning.callbacks.stats_files import METRICS_FILE, append_rows
from moei_lightning.eval.harness import Harness
from moei_lightning.eval.scorer import record_items, row_key, score_rows
from moei_lightning.eval.suite import Item, OpenOutcome, Row
from moei_lightning.ranks import Gather, all_gather
from moei_lightning.sharding import root_parameters_gathered

Split = Literal["val", "test"]
_SPLITS_OF_STAGE = {"fit": ("val",), "validate": ("val",), "test": ("test",)}


class EiMetricsCallback(Callback):
    """Accuracy and macro-F1 on choice tasks, BLEU/ROUGE/Distinct on open tasks, per task and aspect (percent).

    Args:
        stages: ``val`` and/or ``test``; an empty list turns the callback off.
        max_new_tokens: generation length for open tasks; ``None`` uses the module's ``max_new_tokens``.
        choice_batch_size: choice continuations scored per forward pass.
        generation_batch_size: prompts generated per ``generate`` call.
    """

    def __init__(
        self,
        stages: Sequence[Split] = ("val", "test"),
        max_new_tokens: int | None = None,
        choice_batch_size: int = 16,
        generation_batch_size: int = 16,
    ) -> None:
        unknown = sorted(set(stages) - {"val", "test"})
        if unknown:
            raise ValueError(f"ei_metrics.stages: unknown stages {unknown}; use val and/or test")
        for name, value in (("choice_batch_size", choice_batch_size), ("generation_batch_size", generation_batch_size)):
            if value < 1:
                raise ValueError(f"ei_metrics.{name} must be >= 1, got {value}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"ei_metrics.max_new_tokens must be >= 1 or null, got {max_new_tokens}")
        self.stages = set(stages)
        self.max_new_tokens = max_new_tokens
        self.choice_batch_size = choice_batch_size
        self.generation_batch_size = generation_batch_size
        self._items: dict[str, list[Item]] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        for split in _SPLITS_OF_STAGE.get(stage, ()):
            if split not in self.stages or split in self._items:
                continue
            if split == "test" and _evaluation_scores_ei_gi(trainer):
                rank_zero_info("ei_metrics: the eval section scores EiBench/GI in test; its rows are the test metrics")
                continue
            if not hasattr(datamodule, "examples"):
                rank_zero_warn(
                    f"ei_metrics: the {type(datamodule).__name__} has no examples(split) method to list the "
                    "evaluation records; use MoEIDataModule, or set ei_metrics.stages: []"
                )
                return
            records = list({e.record.id: e.record for e in datamodule.examples(split)}.values())
            self._items[split] = record_items(records)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log("test", trainer, pl_module)

    def score(
        self, pl_module: LightningModule, datamodule: Any, split: str, rank: int, world_size: int, gather: Gather
    ) -> list[Row]:
        """The split's rows: the ranks share the forwards (equal calls each) and all return every row."""
        harness = Harness.of_module(
            pl_module,
            datamodule,
            self.choice_batch_size,
            rank,
            world_size,
            gather=gather,
            generation_batch_size=self.generation_batch_size,
        )
        items = self._items[split]
        choice = [i for i in items if i.answer is not None]
        open_items = [i for i in items if i.answer is None]
        outcomes = harness.choices(choice, split)
        texts = harness.runner.generate(harness.prompts(open_items), self.max_new_tokens or pl_module.max_new_tokens)
        return score_rows(outcomes, [OpenOutcome(i, t) for i, t in zip(open_items, texts)])

    def _log(self, split: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if split not in self._items:
            return
        with trainer.precision_plugin.test_step_context(), root_parameters_gathered(trainer.strategy.model):
            rows = self.score(pl_module, trainer.datamodule, split, trainer.global_rank, trainer.world_size, all_gather)
        log_rows(split, rows, trainer, pl_module)


def log_rows(split: str, rows: list[Row], trainer: Trainer, pl_module: LightningModule) -> None:
    """Log scorer rows through the module (every rank holds the same numbers) and append them to the stats file."""
    pl_module.log_dict({row_key(split, r): r["value"] for r in rows}, sync_dist=False)
    if trainer.is_global_zero:
        stamp = {"stage": split, "step": trainer.global_step, "epoch": trainer.current_epoch}
        append_rows(trainer.default_root_dir, METRICS_FILE, (stamp | r | {"key": row_key(split, r)} for r in rows))


def _evaluation_scores_ei_gi(trainer: Trainer) -> bool:
    """Whether a callback (the ``eval:`` section's PaperEvaluation) reports EiBench/GI test rows itself."""
    return any(getattr(c, "scores_ei_gi", False) for c in getattr(trainer, "callbacks", []))
