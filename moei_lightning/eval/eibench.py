"""The ``eibench`` suite: EI test records (EiBench JSONL), choice tasks by log-likelihood, open tasks by
greedy generation, grouped by aspect (perception, cognition, expression).

Its numbers are the one scorer's rows (:func:`~moei_lightning.eval.scorer.score_rows`): acc and acc_norm
(primary) and macro-F1 for choice tasks, BLEU-4, ROUGE-L and Distinct-1/2 for open ones, a task's score
its acc_norm or ROUGE-L, an aspect's the size-weighted mean of its tasks', EI's average that of the aspects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moei_lightning.eval.harness import Harness
from moei_lightning.eval.report import ALL, Report, Table, plural
from moei_lightning.eval.scorer import CHOICE_NOTE, DomainRows, score_rows
from moei_lightning.eval.suite import (
    CHOICE_METRICS,
    ChoiceOutcome,
    Item,
    OpenOutcome,
    Row,
    Source,
    Suite,
    domain_records,
    limit_items,
    primary_metric,
    record_item,
)
from moei_lightning.eval.text_metrics import BLEU_SETTINGS, ROUGE_SETTINGS

_TEXT = ("bleu4", "rouge_l", "distinct1", "distinct2")


@dataclass
class EiBenchOutcomes:
    """The choice items' scores and the open items' generations."""

    choice: list[ChoiceOutcome] = field(default_factory=list)
    open: list[OpenOutcome] = field(default_factory=list)


def eibench_items(paths: Sequence[str], key: str) -> list[Item]:
    """EI records from EiBench JSONL files or folders; choice records score by likelihood, the rest generate."""
    return [record_item(record, "eibench") for record in domain_records(paths, key, "ei")]


class EiBench(Suite):
    """EiBench (EI) tasks by aspect; ``eval.eibench`` files, else ``data.ei_test``."""

    name = "eibench"

    def load(self, source: Source, loaded: Mapping[str, Any]) -> list[Item]:
        paths, key = source.paths(self.settings.eibench, "eibench", "ei_test")
        return limit_items(eibench_items(paths, key), self.settings.limit)

    def run(self, harness: Harness, items: list[Item], done: Mapping[str, Any]) -> EiBenchOutcomes:
        open_items = [item for item in items if item.answer is None]
        choice = harness.choices([item for item in items if item.answer is not None], self.name)
        texts = harness.runner.generate(harness.prompts(open_items), self.settings.max_new_tokens)
        return EiBenchOutcomes(choice, [OpenOutcome(item, text) for item, text in zip(open_items, texts)])

    def rows(self, outcomes: EiBenchOutcomes) -> list[Row]:
        return score_rows(outcomes.choice, outcomes.open)

    def report(self, outcomes: EiBenchOutcomes, rows: list[Row], report: Report) -> None:
        ei = DomainRows(rows, "ei")
        primary = primary_metric(self.name)
        task_rows: list[list] = []
        for aspect in ei.aspects():
            for task in ei.tasks(aspect):
                if ei.value(aspect, task, "acc") is not None:
                    accs = [ei.value(aspect, task, m) for m in CHOICE_METRICS]
                    f1 = ei.value(aspect, task, "f1")
                    n = ei.n(aspect, task, "acc")
                    task_rows.append([task, aspect, "choice", n, *accs, f1, None, None, None, None])
                if ei.value(aspect, task, "bleu4") is not None:
                    text = [ei.value(aspect, task, m) for m in _TEXT]
                    task_rows.append([task, aspect, "open", ei.n(aspect, task, "bleu4"), None, None, None, *text])
        report.tables["eibench"] = Table(
            "EiBench (EI) tasks",
            [
                "task",
                "aspect",
                "type",
                "n",
                *CHOICE_METRICS,
                "macro-F1",
                "BLEU-4",
                "ROUGE-L",
                "Distinct-1",
                "Distinct-2",
            ],
            task_rows,
            note=f"Choice tasks: {CHOICE_NOTE} A choice task scores {primary}; macro-F1 of its {primary} answers. "
            f"Open tasks: greedy generation; BLEU-4: {BLEU_SETTINGS}; ROUGE-L: {ROUGE_SETTINGS}; Distinct-1/2 over "
            "all predictions.",
        )
        aspect_rows = []
        for aspect in ei.aspects():
            kinds = [row[2] for row in task_rows if row[1] == aspect]
            score = ei.value(aspect, ALL, "score")
            accs = [ei.value(aspect, ALL, m) for m in CHOICE_METRICS]
            text = [ei.value(aspect, ALL, m) for m in _TEXT]
            n_choice, n_open = ei.n(aspect, ALL, "acc"), ei.n(aspect, ALL, "bleu4")
            aspect_rows.append([aspect, len(kinds), n_choice, *accs, n_open, *text, score])
            note = ", ".join(
                f"{plural(kinds.count(k), k + ' task')} ({metric})"
                for k, metric in (("choice", primary), ("open", "ROUGE-L"))
                if k in kinds
            )
            key = ei.key(aspect, ALL, "score")
            report.add("EI", aspect, score, n_choice + n_open, f"size-weighted mean of {note}", key)
        ei.add_domain_rows(report, "EI", "aspects")
        columns = ["aspect", "tasks", "n choice", *CHOICE_METRICS, "n open", "BLEU-4", "ROUGE-L", "Distinct-1"]
        report.tables["eibench_aspects"] = Table(
            "EiBench (EI) aspects",
            [*columns, "Distinct-2", "score"],
            aspect_rows,
            note="Every column is the mean of the aspect's task values weighted by their item counts (for accuracy: "
            f"pooled over the items); score from the tasks' scores ({primary} or ROUGE-L).",
        )

    def outputs(self, outcomes: EiBenchOutcomes) -> dict[str, Any]:
        generations = [
            {
                "id": o.item.record.id,
                "task": o.item.record.task,
                "aspect": o.item.record.aspect,
                "prediction": o.prediction,
                "reference": o.item.record.output,
            }
            for o in outcomes.open
        ]
        return {"choices.jsonl": [o.line(self.name) for o in outcomes.choice], "generations.jsonl": generations}
