"""What a fit did to EI and GI: multiple-choice accuracy and inter gates before and after training.

:class:`FitSummary` (the ``summary:`` section of every config) scores the held-out multiple-choice
records of the DataModule's splits when ``fit`` starts and again when it ends: EI accuracy per aspect,
GI accuracy per dimension (lm-evaluation-harness's ``acc`` and ``acc_norm``, in percent), the mean
inter gate on EI and on GI prompts, and the trainable parameter count. It prints the table, writes
``summary.json`` and ``summary.md`` into the run directory and sends the numbers to the loggers under
``summary/<split>/<before|after|change>/<domain>[/<aspect>]/<acc|acc_norm>``.
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
from moei_lightning.eval.harness import Harness
from moei_lightning.eval.report import ALL, metric_key
from moei_lightning.eval.scorer import record_items, score_rows
from moei_lightning.eval.suite import CHOICE_METRICS, primary_metric
from moei_lightning.sharding import root_parameters_gathered

AVG = "avg"
"""The key of a domain's accuracy over all its aspects."""
PRIMARY = {"ei": primary_metric("eibench"), "gi": primary_metric("gi")}
"""The accuracy each domain's records score with: the ``eibench`` and ``gi`` suites'."""


def score_records(harness: Harness, records: Sequence[EiRecord]) -> dict[str, Any]:
    """Accuracy (percent) per EI aspect and GI dimension, their averages, and the mean gate per domain.

    The accuracies are the one scorer's rows (:func:`~moei_lightning.eval.scorer.score_rows`), the
    numbers validation logs as ``val/<domain>/<aspect>/<acc|acc_norm>``: ``ei`` and ``gi`` hold, for
    ``acc`` and ``acc_norm``, one entry per aspect or dimension present plus ``avg``, the size-weighted
    mean over them, which is the accuracy over all the domain's items. Each is a proportion of
    ``counts_<domain>`` items, so it has a binomial interval. ``gate_ei`` / ``gate_gi`` average each
    prompt's inter gate over adapted layers (None without adapters); ``n_<domain>`` counts the records
    per domain and ``counts_<domain>`` per aspect or dimension.
    """
    choice = [r for r in records if r.choices]
    items = record_items(choice)
    outcomes = harness.choices(items, "summary")
    rows = score_rows(outcomes, [])
    gates = harness.gates(items)
    gate_values: dict[str, list[float]] = {"ei": [], "gi": []}
    for record, gate in zip(choice, gates):
        if gate is not None:
            gate_values[record.domain].append(gate)
    summary: dict[str, Any] = {}
    for domain in ("ei", "gi"):
        mine = [r for r in rows if r["domain"] == domain and r["task"] == ALL]
        summary[domain] = {
            metric: {AVG if r["aspect"] == ALL else r["aspect"]: r["value"] for r in mine if r["metric"] == metric}
            for metric in CHOICE_METRICS
        }
        counts = {r["aspect"]: r["n"] for r in mine if r["metric"] == "acc" and r["aspect"] != ALL}
        summary[f"gate_{domain}"] = sum(gate_values[domain]) / len(gate_values[domain]) if gate_values[domain] else None
        summary[f"n_{domain}"] = sum(counts.values())
        summary[f"counts_{domain}"] = counts
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
            "primary_metric": dict(PRIMARY),
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
            metric_key(f"summary/{split}/{when}", domain, ALL if group == AVG else group, metric): value
            for split, block in self.summary["splits"].items()
            for when in ("before", "after", "change")
            for domain in ("ei", "gi")
            for metric, values in block[when][domain].items()
            for group, value in values.items()
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
            metric: {
                group: _difference(value, before[domain].get(metric, {}).get(group)) for group, value in values.items()
            }
            for metric, values in after[domain].items()
        }
        gate = f"gate_{domain}"
        change[gate] = _difference(after[gate], before[gate])
    return change


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def summary_markdown(summary: dict[str, Any], notes: Sequence[str] = ()) -> str:
    """The summary as a Markdown table per split (primary accuracy, then the other), then parameters, run
    directory, checkpoint and ``notes``."""
    lines = []
    primary = summary["primary_metric"]
    for split, block in summary["splits"].items():
        before, after, change = block["before"], block["after"], block["change"]
        order = sorted(CHOICE_METRICS, key=lambda m: m != primary["ei"])  # EI's primary accuracy first
        lines += [
            f"## Fit summary: {split} split (multiple choice, %; before = {summary['started_from']})",
            "",
            f"| | {order[0]} before | after | change | {order[1]} before | after | change |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for domain in ("ei", "gi"):
            n = after[f"n_{domain}"]
            for group in after[domain][primary[domain]]:
                label = f"{domain.upper()} {'average' if group == AVG else group}" + (
                    f" (n={n})" if group == AVG else ""
                )
                cells = [
                    f"{_fmt(before[domain].get(m, {}).get(group))} | {_fmt(after[domain][m].get(group))} "
                    f"| {_fmt(change[domain][m].get(group), signed=True)}"
                    for m in order
                ]
                lines.append(f"| {label} | {' | '.join(cells)} |")
        for domain in ("ei", "gi"):
            gate = f"gate_{domain}"
            lines.append(
                f"| mean gate on {domain.upper()} prompts | {_fmt(before[gate], 3)} | {_fmt(after[gate], 3)} "
                f"| {_fmt(change[gate], 3, signed=True)} | | | |"
            )
        lines.append("")
    share = 100.0 * summary["trainable_parameters"] / max(1, summary["total_parameters"])
    lines += [
        f"- adapter: {summary['adapter']}; trainable parameters: {summary['trainable_parameters']:,} "
        f"({share:.2f}% of {summary['total_parameters']:,})",
        "- acc: the choice with the highest summed log-likelihood; acc_norm: the highest log-likelihood per "
        "character (lm-evaluation-harness's two accuracies); "
        + ", ".join(f"{domain.upper()} scores with {metric}" for domain, metric in primary.items()),
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
