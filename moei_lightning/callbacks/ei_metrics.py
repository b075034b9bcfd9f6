"""EiMetricsCallback: per-task and per-aspect EI metrics and per-dimension GI accuracy on validation and test.

For every evaluation batch it answers the batch's records with the model: choice records by
log-likelihood (:func:`~moei_lightning.eval.scoring.choice_loglikelihoods`, acc_norm), open records by
greedy generation (:func:`~moei_lightning.eval.scoring.generate_texts`). At the end of the epoch the
metrics (:class:`~moei_lightning.callbacks.aspect_metrics.AspectMetrics`) are synced across ranks,
logged through the LightningModule (so checkpoints can monitor them, e.g. ``val/ei/avg``) and
appended to ``stats/metrics.jsonl`` by rank 0.

The extra forwards would overwrite the routing recorder, which holds the routing of the module's
own forward on the batch; the recorder is put back afterwards, so
:class:`~moei_lightning.callbacks.RouterStatsCallback` reads the right routing in whichever order
the two callbacks run. Under sharded strategies (FSDP, ModelParallel, DeepSpeed) every rank must
run the same forwards: ranks agree on the number of scoring and generation calls (ranks with
fewer records run filler calls whose results are dropped), and generation runs with ``synced_gpus``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_warn

from moei_lightning.callbacks.aspect_metrics import AspectMetrics, metric_key, task_specs
from moei_lightning.callbacks.stats_files import METRICS_FILE, append_rows
from moei_lightning.data import EiRecord, Encoder
from moei_lightning.eval.scoring import choice_loglikelihoods, generate_texts
from moei_lightning.molora import RoutingRecorder

Split = Literal["val", "test"]
_SPLITS_OF_STAGE = {"fit": ("val",), "validate": ("val",), "test": ("test",)}


class EiMetricsCallback(Callback):
    """Accuracy and macro-F1 on choice tasks, BLEU/ROUGE/Distinct on open tasks, per task and aspect.

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
        self._metrics: dict[str, AspectMetrics] = {}
        self._records: dict[str, dict[str, EiRecord]] = {}
        self._prompts: dict[str, dict[str, str]] = {}
        self._seen: set[str] = set()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        for split in _SPLITS_OF_STAGE.get(stage, ()):
            if split not in self.stages or split in self._metrics:
                continue
            if not hasattr(datamodule, "examples"):
                rank_zero_warn(
                    f"ei_metrics: the {type(datamodule).__name__} has no examples(split) method to list the "
                    "evaluation records; use MoEIDataModule, or set ei_metrics.stages: []"
                )
                return
            examples = datamodule.examples(split)
            self._records[split] = {e.record.id: e.record for e in examples}
            self._prompts[split] = {e.record.id: e.prompt for e in examples}
            self._metrics[split] = AspectMetrics(task_specs(self._records[split].values()))

    # Validation and test share the work; only the split differs.

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start("val", pl_module)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._score("val", trainer, pl_module, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log("val", trainer, pl_module)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start("test", pl_module)

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._score("test", trainer, pl_module, batch)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log("test", trainer, pl_module)

    def _start(self, split: str, pl_module: LightningModule) -> None:
        if split in self._metrics:
            self._metrics[split].to(pl_module.device).reset()
            self._seen = set()

    def _score(self, split: str, trainer: Trainer, pl_module: LightningModule, batch: dict[str, Any]) -> None:
        if split not in self._metrics:
            return
        records = self._records[split]
        # The eval sampler pads short ranks with repeats of examples (same id): count each id once.
        # A rank beyond the number of examples holds nothing but repeats of example 0.
        ids = (
            []
            if trainer.global_rank >= len(records)
            else [i for i in dict.fromkeys(batch["id"]) if i not in self._seen]
        )
        self._seen.update(ids)
        choice = [records[i] for i in ids if records[i].choices]
        open_ = [records[i] for i in ids if not records[i].choices]
        sharded = _shards_parameters(trainer.strategy)
        metrics = self._metrics[split]
        with _routing_kept(getattr(pl_module, "recorder", None)):
            if choice or sharded:
                predicted = self._choose(split, trainer, pl_module, choice, sharded)
                metrics.update_choices([_key(r) for r in choice], predicted, [r.output for r in choice])
            if open_ or sharded:
                texts = self._generate(split, trainer, pl_module, [self._prompts[split][r.id] for r in open_], sharded)
                metrics.update_generations([_key(r) for r in open_], texts, [r.output for r in open_])

    def _choose(
        self, split: str, trainer: Trainer, pl_module: LightningModule, records: list[EiRecord], sharded: bool
    ) -> list[str]:
        """The acc_norm answer of every record, one forward pass per chunk of at most ``choice_batch_size`` choices."""
        datamodule = trainer.datamodule
        encoder = Encoder(pl_module.tokenizer, datamodule.formatter, pl_module.kind, datamodule.max_length)
        chunks = _chunks(records, self.choice_batch_size)
        filler = next((r for r in self._records[split].values() if r.choices), None)
        calls = _agree(trainer, pl_module, len(chunks)) if sharded and filler is not None else len(chunks)
        predicted = []
        for i in range(calls):
            chunk = chunks[i] if i < len(chunks) else [filler]
            scores = choice_loglikelihoods(pl_module.model, encoder, chunk, batch_size=_num_choices(chunk))
            if i < len(chunks):
                predicted += [r.choices[s.predicted] for r, s in zip(chunk, scores)]
        return predicted

    def _generate(
        self, split: str, trainer: Trainer, pl_module: LightningModule, prompts: list[str], sharded: bool
    ) -> list[str]:
        """Greedy answers, ``generation_batch_size`` prompts per call; sharded ranks make equally many calls."""
        size = self.generation_batch_size
        chunks = [prompts[i : i + size] for i in range(0, len(prompts), size)]
        filler = next((self._prompts[split][i] for i, r in self._records[split].items() if not r.choices), None)
        calls = _agree(trainer, pl_module, len(chunks)) if sharded and filler is not None else len(chunks)
        max_new_tokens = self.max_new_tokens or pl_module.max_new_tokens
        texts = []
        for i in range(calls):
            chunk = chunks[i] if i < len(chunks) else [filler]
            out = generate_texts(
                pl_module.model, pl_module.tokenizer, pl_module.kind, chunk, max_new_tokens, len(chunk), sharded
            )
            if i < len(chunks):
                texts += out
        return texts

    def _log(self, split: str, trainer: Trainer, pl_module: LightningModule) -> None:
        if split not in self._metrics:
            return
        rows = self._metrics[split].compute()  # every rank: the sync happens in here
        pl_module.log_dict({metric_key(split, r): r["value"] for r in rows}, sync_dist=False)
        if trainer.is_global_zero:
            stamp = {"stage": split, "step": trainer.global_step, "epoch": trainer.current_epoch}
            append_rows(
                trainer.default_root_dir, METRICS_FILE, (stamp | r | {"key": metric_key(split, r)} for r in rows)
            )


def _key(record: EiRecord) -> tuple[str, str, str]:
    return (record.domain, record.aspect, record.task)


def _num_choices(records: list[EiRecord]) -> int:
    return sum(len(r.choices) for r in records)


def _chunks(records: list[EiRecord], max_choices: int) -> list[list[EiRecord]]:
    """Consecutive groups with at most ``max_choices`` choices each (a record with more is a group alone)."""
    chunks: list[list[EiRecord]] = []
    for record in records:
        if chunks and _num_choices(chunks[-1]) + len(record.choices) <= max_choices:
            chunks[-1].append(record)
        else:
            chunks.append([record])
    return chunks


def _agree(trainer: Trainer, pl_module: LightningModule, calls: int) -> int:
    """The largest number of calls any rank needs; every rank must ask."""
    return int(trainer.strategy.reduce(torch.tensor(calls, device=pl_module.device), reduce_op="max"))


def _shards_parameters(strategy: Strategy) -> bool:
    """Whether forwards are collective: then every rank must run the same forwards."""
    return isinstance(strategy, FSDPStrategy | ModelParallelStrategy | DeepSpeedStrategy)


@contextmanager
def _routing_kept(recorder: RoutingRecorder | None) -> Iterator[None]:
    """Run extra forwards without recording, and leave the recorder holding what it held before."""
    if recorder is None:
        yield
        return
    records, masks, enabled = recorder.records, dict(recorder.masks), recorder.enabled
    recorder.enabled = False
    try:
        yield
    finally:
        recorder.records, recorder.masks, recorder.enabled = records, masks, enabled
