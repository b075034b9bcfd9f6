"""What a fit did to EI and GI: multiple-choice accuracy and inter gates before and after training.

:class:`FitSummary` (the ``summary:`` section of every config) scores the held-out multiple-choice
records of the DataModule's splits when ``fit`` starts and again when it ends: EI accuracy per aspect,
GI accuracy per dimension (lm-evaluation-harness ``acc_norm``, in percent), the mean inter gate on EI
and on GI prompts, and the trainable parameter count. It prints the table, writes
``summary.json`` and ``summary.md`` into the run directory and sends the numbers to the loggers.
``benchmarks/both_matter.py`` reads the same file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from moei_lightning.data import EiRecord
from moei_lightning.eval.harness import Harness, Results
from moei_lightning.eval.scorer import ALL, record_items, score_rows
from moei_lightning.sharding import root_parameters_gathered

ASPECTS = {"ei": ("perception", "cognition", "expression"), "gi": ("knowledge", "reasoning", "commonsense", "reading")}


def score_records(harness: Harness, records: Sequence[EiRecord]) -> dict[str, Any]:
    """Accuracy (percent) per EI aspect and GI dimension, their means, and the mean gate per domain.

    The accuracies come from the one scorer (:func:`~moei_lightning.eval.scorer.score_rows`): an
    aspect's ``acc`` row, its accuracy pooled over its items (a proportion of ``counts_<domain>``
    items, so it has a binomial interval), the number validation logs as ``val/<domain>/<aspect>/acc``.
    ``ei`` and ``gi`` hold one entry per aspect or dimension present plus ``avg``, the mean over them
    (every aspect weighs the same); ``gate_ei`` / ``gate_gi`` average each prompt's inter gate over
    adapted layers (None without adapters); ``n_<domain>`` counts the records per domain and
    ``counts_<domain>`` per aspect or dimension.
    """
    choice = [r for r in records if r.choices]
    items = record_items(choice)
    outcomes = harness.choices(items, "summary", Results())
    rows = score_rows(outcomes, [])
    gates = harness.gates(items)
    gate_values: dict[str, list[float]] = {"ei": [], "gi": []}
    for record, gate in zip(choice, gates):
        if gate is not None:
            gate_values[record.domain].append(gate)
    summary: dict[str, Any] = {}
    for domain in ("ei", "gi"):
        pooled = [r for r in rows if (r["domain"], r["task"], r["metric"]) == (domain, ALL, "acc")]
        scores, counts = {r["aspect"]: r["value"] for r in pooled}, {r["aspect"]: r["n"] for r in pooled}
        groups = sorted(scores, key=lambda a: (ASPECTS[domain] + (a,)).index(a))
        accuracy: dict[str, float | None] = {group: scores[group] for group in groups}
        accuracy["avg"] = sum(scores.values()) / len(scores) if scores else None
        summary[domain] = accuracy
        summary[f"gate_{domain}"] = sum(gate_values[domain]) / len(gate_values[domain]) if gate_values[domain] else None
        summary[f"n_{domain}"] = sum(counts.values())
        summary[f"counts_{domain}"] = {group: counts[group] for group in groups}
    return summary


class FitSummary(Callback):
    """EI per aspect and GI per dimension before and after ``fit``, with gates, printed and saved.

    Args:
        splits: the DataModule splits to score (``val``, ``test``); their multiple-choice records
            are used, open ones skipped. ``None``: ``[val]``; ``[]`` turns the summary off.
        batch_size: sequences per forward pass.
    """

    def __init__(self, splits: list[str] | None = None, batch_size: int = 64) -> None:
        self.splits = ["val"] if splits is None else list(splits)
        unknown = sorted(set(self.splits) - {"val", "test"})
        if unknown:
            raise ValueError(f"config key summary.splits: unknown splits {unknown}; use val and/or test")
        self.batch_size = batch_size
        self.before: dict[str, dict[str, Any]] = {}
        self.summary: dict[str, Any] | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.splits:
            self.before = self._score(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.splits or trainer.interrupted:
            return
        after = self._score(trainer, pl_module)
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in pl_module.parameters())
        checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or None
        run_dir = Path(trainer.default_root_dir)
        self.summary = {
            "splits": {
                split: {
                    "before": self.before[split],
                    "after": after[split],
                    "change": _change(self.before[split], after[split]),
                }
                for split in self.splits
            },
            "started_from": "checkpoint " + str(trainer.ckpt_path) if trainer.ckpt_path else "the backbone",
            "adapter": getattr(pl_module, "adapter", None),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "run_dir": str(run_dir),
            "checkpoint": checkpoint,
        }
        notes: list[str] = []
        for callback in trainer.callbacks:  # sections that other callbacks offer, e.g. training health
            offer = getattr(callback, "summary_section", None)
            if callable(offer):
                key, section, lines = offer()
                if section:
                    self.summary[key] = section
                    notes += lines
        if not trainer.is_global_zero:
            return
        (run_dir / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        text = summary_markdown(self.summary, notes)
        (run_dir / "summary.md").write_text(text)
        print("\n" + text, flush=True)
        metrics = {
            f"summary/{split}/{domain}/{key}/{when}": value
            for split, block in self.summary["splits"].items()
            for when in ("before", "after", "change")
            for domain in ("ei", "gi")
            for key, value in block[when][domain].items()
            if value is not None
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _score(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, dict[str, Any]]:
        data = trainer.datamodule
        harness = Harness.of_module(pl_module, data, self.batch_size, trainer.global_rank, trainer.world_size)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with (
                torch.no_grad(),
                trainer.precision_plugin.test_step_context(),
                root_parameters_gathered(trainer.strategy.model),
            ):
                return {split: score_records(harness, data.records(split)) for split in self.splits}
        finally:
            pl_module.train(was_training)


def _change(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """After minus before, for every accuracy and gate both have."""
    change: dict[str, Any] = {}
    for domain in ("ei", "gi"):
        change[domain] = {
            key: None if before[domain].get(key) is None or value is None else value - before[domain][key]
            for key, value in after[domain].items()
        }
        gate = f"gate_{domain}"
        change[gate] = None if before[gate] is None or after[gate] is None else after[gate] - before[gate]
    return change


def summary_markdown(summary: dict[str, Any], notes: Sequence[str] = ()) -> str:
    """The summary as a Markdown table per split, then parameters, run directory, checkpoint and ``notes``."""
    lines = []
    for split, block in summary["splits"].items():
        before, after, change = block["before"], block["after"], block["change"]
        lines += [
            f"## Fit summary: {split} split (multiple choice, acc_norm %; before = {summary['started_from']})",
            "",
            "| | before | after | change |",
            "|---|---:|---:|---:|",
        ]
        for domain in ("ei", "gi"):
            n = after[f"n_{domain}"]
            for key in after[domain]:
                label = f"{domain.upper()} {'average' if key == 'avg' else key}" + (f" (n={n})" if key == "avg" else "")
                lines.append(
                    f"| {label} | {_fmt(before[domain].get(key))} | {_fmt(after[domain][key])} "
                    f"| {_fmt(change[domain][key], signed=True)} |"
                )
        for domain in ("ei", "gi"):
            gate = f"gate_{domain}"
            lines.append(
                f"| mean gate on {domain.upper()} prompts | {_fmt(before[gate], 3)} | {_fmt(after[gate], 3)} "
                f"| {_fmt(change[gate], 3, signed=True)} |"
            )
        lines.append("")
    share = 100.0 * summary["trainable_parameters"] / max(1, summary["total_parameters"])
    lines += [
        f"- adapter: {summary['adapter']}; trainable parameters: {summary['trainable_parameters']:,} "
        f"({share:.2f}% of {summary['total_parameters']:,})",
        f"- run directory: {summary['run_dir']}",
        f"- checkpoint: {summary['checkpoint'] or 'none saved'}",
        *notes,
        "",
    ]
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 1, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
