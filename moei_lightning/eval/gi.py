"""The ``gi`` suite: GI multiple choice by log-likelihood, grouped by dimension (knowledge, reasoning,
commonsense, reading): EiBench-format JSONL records with ``choices``, then MMLU CSV files by dimension,
asked as lm-evaluation-harness's ``mmlu`` asks them (:mod:`moei_lightning.eval.mmlu`).

A JSONL task scores its acc_norm, an MMLU subject its acc (as lm-eval's ``mmlu`` does); a dimension
scores the size-weighted mean of its tasks, GI's average that of the dimensions; the MMLU subjects
asked also get lm-eval's ``mmlu`` group score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from moei_lightning.data import GI_ASPECTS, DataError
from moei_lightning.eval import mmlu
from moei_lightning.eval.harness import Harness
from moei_lightning.eval.report import ALL, Report, Table, plural
from moei_lightning.eval.scorer import CHOICE_NOTE, DomainRows, score_rows
from moei_lightning.eval.suite import (
    CHOICE_METRICS,
    ChoiceOutcome,
    Item,
    Row,
    Source,
    Suite,
    domain_records,
    from_choice_item,
    limit_items,
    primary_metric,
    record_item,
    require_file,
)

_SOURCES = {"gi": "GI JSONL", "mmlu": "MMLU CSV"}


def gi_items(
    paths: Sequence[str], key: str, mmlu_csv: Mapping[str, Sequence[str]], mmlu_num_fewshot: int = 0
) -> list[Item]:
    """GI multiple choice: EiBench-format JSONL records with ``choices``, then MMLU-style CSV files by dimension,
    prompted as lm-eval's ``mmlu`` with ``mmlu_num_fewshot`` dev examples (:mod:`moei_lightning.eval.mmlu`)."""
    items = []
    for record in domain_records(paths, key, "gi"):
        if not record.choices:
            raise DataError(
                f"{record.source}: field 'choices': the gi suite scores multiple choice only, and this "
                f"record (from {key}) has none; add choices or leave the record out of {key}"
            )
        items.append(record_item(record, "gi"))
    for dimension, files in mmlu_csv.items():
        if dimension not in GI_ASPECTS:
            raise DataError(
                f"config key eval.gi_mmlu_csv: {dimension!r} is not a GI dimension; use one of {list(GI_ASPECTS)}"
            )
        for path in [files] if isinstance(files, str) else files:
            require_file(path, "eval.gi_mmlu_csv")
            try:
                loaded = mmlu.load_mmlu_csv(path, dimension, mmlu_num_fewshot)
            except ValueError as err:
                shots = f"; eval.mmlu_num_fewshot: {mmlu_num_fewshot}" if mmlu_num_fewshot else ""
                raise DataError(f"{err} (file from config key eval.gi_mmlu_csv{shots})") from err
            items += [from_choice_item(item, "gi") for item in loaded]
    return items


class Gi(Suite):
    """GI tasks by dimension; ``eval.gi`` files (else ``data.gi_test``) and ``eval.gi_mmlu_csv``."""

    name = "gi"

    def load(self, source: Source, loaded: Mapping[str, Any]) -> list[Item]:
        paths, key = source.paths(self.settings.gi, "gi", "gi_test")
        items = gi_items(paths, key, self.settings.gi_mmlu_csv, self.settings.mmlu_num_fewshot)
        return limit_items(items, self.settings.limit)

    def run(self, harness: Harness, items: list[Item], done: Mapping[str, Any]) -> list[ChoiceOutcome]:
        return harness.choices(items, self.name)

    def rows(self, outcomes: list[ChoiceOutcome]) -> list[Row]:
        return score_rows(outcomes, [])

    def report(self, outcomes: list[ChoiceOutcome], rows: list[Row], report: Report) -> None:
        gi = DomainRows(rows, "gi")
        sources = {(o.item.group, o.item.task): o.item.source for o in outcomes}
        table = [
            [
                task,
                dimension,
                _SOURCES[sources[(dimension, task)]],
                gi.n(dimension, task, "acc"),
                *[gi.value(dimension, task, m) for m in CHOICE_METRICS],
                primary_metric(sources[(dimension, task)]),
            ]
            for dimension in gi.aspects()
            for task in gi.tasks(dimension)
        ]
        report.tables["gi"] = Table(
            "GI tasks",
            ["task", "dimension", "source", "n", *CHOICE_METRICS, "score"],
            table,
            note=f"{CHOICE_NOTE} score: the accuracy the task scores with, as lm-evaluation-harness reads its kind "
            "of task; MMLU subjects: lm-eval's acc, the same answer as acc_norm with one-letter choices.",
        )
        for dimension in gi.aspects():
            tasks = gi.tasks(dimension)
            metrics = "/".join(dict.fromkeys(primary_metric(sources[(dimension, t)]) for t in tasks))
            score, n = gi.value(dimension, ALL, "score"), gi.n(dimension, ALL, "score")
            note = f"size-weighted mean of {plural(len(tasks), 'task')} ({metrics})"
            report.add("GI", dimension, score, n, note, gi.key(dimension, ALL, "score"))
        gi.add_domain_rows(report, "GI", "dimensions")
        subjects = mmlu.subject_accuracies(outcomes)
        if subjects:
            n, count = sum(n for _, n in subjects.values()), len(subjects)
            note = f"lm-eval's mmlu group: acc of {plural(count, 'subject')}, mean weighted by size"
            report.add("GI", "MMLU", 100 * mmlu.group_accuracy(subjects), n, note)

    def outputs(self, outcomes: list[ChoiceOutcome]) -> dict[str, Any]:
        return {"choices.jsonl": [o.line(self.name) for o in outcomes]}
