"""The one scorer of EiBench-style records: per-item outcomes -> rows per task, aspect and domain, in percent.

Validation metrics (:class:`~moei_lightning.callbacks.EiMetricsCallback`), the ``test`` evaluation
(:class:`~moei_lightning.callbacks.PaperEvaluation`) and the report all take their EI/GI numbers
from :func:`score_rows`, so one run shows one set of numbers wherever it is read.

- Choice records: ``acc`` (the choice with the highest summed log-likelihood) and ``acc_norm`` (per
  character), as lm-evaluation-harness computes them (:mod:`moei_lightning.eval.choices`); EI tasks
  also get ``f1``, macro-F1 of the primary metric's answers over the labels that occur among the
  task's answers and predictions (as scikit-learn's ``f1_score(average="macro")``). GI choices are
  per-question answers: accuracy only.
- Open records: BLEU-4, ROUGE-1/2/L and Distinct-1/2 (:mod:`moei_lightning.eval.text_metrics`).
- A task's score is its suite's primary accuracy (:data:`PRIMARY_METRIC`; choice) or its ROUGE-L (open).
- One averaging rule (:func:`pooled_mean`): an aspect (EI) or dimension (GI) gets every metric of its
  tasks, and its ``score``, as the mean of its tasks' values weighted by their item counts; a domain
  gets the same over its aspects, its ``avg`` from their scores. For accuracy this is the accuracy
  pooled over the items. ``n`` counts items.

Rows are ``{"domain", "aspect", "task", "metric", "value", "n"}``; ``all`` marks aggregates.
:func:`row_key` names a row for loggers: ``val/ei/perception/acc``, ``test/gi/avg``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from moei_lightning.data import EI_ASPECTS, GI_ASPECTS, EiRecord, Encoder
from moei_lightning.eval.harness import Harness
from moei_lightning.eval.report import ALL, STAGE, Report, metric_key
from moei_lightning.eval.suite import (
    CHOICE_METRICS,
    ChoiceOutcome,
    Item,
    OpenOutcome,
    Row,
    primary_metric,
    record_item,
)
from moei_lightning.eval.text_metrics import GENERATION_KEYS, score_generations
from moei_lightning.ranks import Gather, all_gather
from moei_lightning.runner import ModelRunner

_ORDER = {"ei": EI_ASPECTS, "gi": GI_ASPECTS}


def pooled_mean(parts: Iterable[tuple[float, int]]) -> float:
    """The one averaging rule: the mean of values weighted by their item counts.

    A value per task, aspect or language with the number of items behind it; an accuracy averaged
    this way is the accuracy pooled over all the items, as lm-evaluation-harness's groups average
    with ``weight_by_size: true`` (its ``mmlu``). So a task of one item weighs one item.
    """
    pairs = list(parts)
    total = sum(n for _, n in pairs)
    if total <= 0:
        raise ValueError(f"pooled_mean: no items among {pairs}")
    return sum(value * n for value, n in pairs) / total


def accuracy(outcomes: Sequence[ChoiceOutcome], metric: str) -> float:
    """Percent of outcomes whose ``metric`` answer (``acc`` or ``acc_norm``) is right."""
    return 100.0 * sum(o.correct(metric) for o in outcomes) / len(outcomes)


def macro_f1(predicted: Sequence[str], targets: Sequence[str]) -> float:
    """Macro-F1 in percent over the labels present in ``targets`` or ``predicted``."""
    labels = sorted(set(predicted) | set(targets))
    total = 0.0
    for label in labels:
        tp = sum(p == t == label for p, t in zip(predicted, targets))
        fp = sum(p == label != t for p, t in zip(predicted, targets))
        fn = sum(t == label != p for p, t in zip(predicted, targets))
        total += 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return 100.0 * total / len(labels)


def _domain(item: Item) -> str:
    """GI for the GI suites' items (EiBench-style GI records, MMLU), EI for the rest."""
    return "gi" if item.source in ("gi", "mmlu") else "ei"


def _aspect_order(key: tuple[str, str]) -> tuple[int, int, str]:
    domain, aspect = key
    order = _ORDER.get(domain, ())
    return (0 if domain == "ei" else 1, order.index(aspect) if aspect in order else len(order), aspect)


def _generation(outcomes: Sequence[OpenOutcome]) -> dict[str, float]:
    """Text metrics with each language's tokens; outcomes of several languages are scored per language and
    averaged weighted by their counts."""
    by_language: dict[str, list[OpenOutcome]] = defaultdict(list)
    for outcome in outcomes:
        by_language[outcome.item.language].append(outcome)
    scored = [
        (score_generations([o.prediction for o in group], [o.item.record.output for o in group], language), len(group))
        for language, group in by_language.items()
    ]
    return {key: pooled_mean((scores[key], n) for scores, n in scored) for key in GENERATION_KEYS}


def score_rows(choice: Sequence[ChoiceOutcome], open_: Sequence[OpenOutcome]) -> list[Row]:
    """Rows per task, per aspect and per domain of the outcomes given (tasks without items are absent).

    Every aggregate is :func:`pooled_mean` of the level below: an aspect's metric over its tasks, a
    domain's over its aspects (its ``score`` is the domain's ``avg``).
    """
    rows: list[Row] = []

    def add(domain: str, aspect: str, task: str, metric: str, value: float, n: int) -> None:
        rows.append({"domain": domain, "aspect": aspect, "task": task, "metric": metric, "value": value, "n": n})

    tasks: dict[tuple[str, str, str], tuple[list[ChoiceOutcome], list[OpenOutcome]]] = defaultdict(lambda: ([], []))
    for outcome in choice:
        tasks[(_domain(outcome.item), outcome.item.group, outcome.item.task)][0].append(outcome)
    for outcome in open_:
        tasks[(_domain(outcome.item), outcome.item.group, outcome.item.task)][1].append(outcome)
    aspects = sorted({key[:2] for key in tasks}, key=_aspect_order)
    domains: dict[str, dict[str, list[tuple[float, int]]]] = defaultdict(lambda: defaultdict(list))
    for domain, aspect in aspects:
        parts: dict[str, list[tuple[float, int]]] = defaultdict(list)  # metric -> (task value, items)
        for task in sorted(t for d, a, t in tasks if (d, a) == (domain, aspect)):
            chosen, generated = tasks[(domain, aspect, task)]
            values: dict[str, float] = {}
            if chosen:
                primary = primary_metric(chosen[0].item.source)
                values = {metric: accuracy(chosen, metric) for metric in CHOICE_METRICS}
                if domain == "ei":
                    values["f1"] = macro_f1(
                        [o.item.record.choices[o.predicted(primary)] for o in chosen],
                        [o.item.record.output for o in chosen],
                    )
                for metric, value in values.items():
                    add(domain, aspect, task, metric, value, len(chosen))
                    parts[metric].append((value, len(chosen)))
                parts["score"].append((values[primary], len(chosen)))
            if generated:
                metrics = _generation(generated)
                for metric in GENERATION_KEYS:
                    add(domain, aspect, task, metric, metrics[metric], len(generated))
                    parts[metric].append((metrics[metric], len(generated)))
                parts["score"].append((metrics["rouge_l"], len(generated)))
        for metric, pairs in parts.items():
            value, n = pooled_mean(pairs), sum(n for _, n in pairs)
            add(domain, aspect, ALL, metric, value, n)
            domains[domain][metric].append((value, n))
    for domain, parts in domains.items():
        for metric, pairs in sorted(parts.items(), key=lambda kv: kv[0] == "score"):
            add(domain, ALL, ALL, "avg" if metric == "score" else metric, pooled_mean(pairs), sum(n for _, n in pairs))
    return rows


def row_key(stage: str, row: Row) -> str:
    """The logger key of a row (:func:`~moei_lightning.eval.report.metric_key`): ``val/ei/perception/acc``,
    ``val/ei/perception/<task>/f1``, ``val/gi/avg``."""
    return metric_key(stage, row["domain"], row["aspect"], row["task"], row["metric"])


def record_items(records: Sequence[EiRecord]) -> list[Item]:
    """EiBench-style records as items of the ``eibench`` (EI) or ``gi`` suite; choice records carry their answer."""
    return [record_item(r, "eibench" if r.domain == "ei" else "gi") for r in records]


def choice_accuracy_rows(
    module: Any,
    encoder: Encoder,
    records: Sequence[EiRecord],
    batch_size: int = 16,
    rank: int = 0,
    world_size: int = 1,
    gather: Gather = all_gather,
) -> list[Row]:
    """Score multiple-choice records with a module's model and return the :func:`score_rows` rows (percent).

    ``module`` is anything with ``model``, ``tokenizer`` and ``kind`` (a
    :class:`~moei_lightning.module.MoEIModule`); ``encoder`` formats and tokenises the records as in
    training (``Encoder(module.tokenizer, datamodule.formatter, module.kind, datamodule.max_length)``).
    Rows with ``metric`` ``acc`` and ``acc_norm`` give both accuracies per task, per EI aspect or GI
    dimension and per domain; ``score`` and ``avg`` rows give the aspect and domain scores. Records
    without choices are an error. Under DDP/FSDP every rank must call it with the same records
    (``rank``, ``world_size`` from the trainer): the ranks share the forwards and all return every row.
    """
    plain = [r for r in records if not r.choices]
    if plain:
        raise ValueError(f"choice_accuracy_rows scores multiple choice only; {plain[0].source or plain[0].id} has none")
    harness = Harness(
        ModelRunner(module.model, module.tokenizer, module.kind, batch_size, rank, world_size, gather), encoder
    )
    training = module.model.training
    module.model.eval()  # no adapter dropout while scoring, whatever the caller was doing
    try:
        outcomes = harness.choices(record_items(records), "choices")
    finally:
        module.model.train(training)
    return score_rows(outcomes, [])


CHOICE_NOTE = (
    "acc: the choice with the highest summed log-likelihood; acc_norm: the highest log-likelihood per character "
    "(lm-evaluation-harness's two accuracies)."
)


class DomainRows:
    """The scorer's rows of one domain, looked up by (aspect, task, metric), for the report's tables."""

    def __init__(self, rows: list[Row], domain: str) -> None:
        self.domain = domain
        self.rows = [r for r in rows if r["domain"] == domain]
        self._index = {(r["aspect"], r["task"], r["metric"]): r for r in self.rows}

    def value(self, aspect: str, task: str, metric: str) -> float | None:
        row = self._index.get((aspect, task, metric))
        return None if row is None else row["value"]

    def n(self, aspect: str, task: str, metric: str) -> int:
        row = self._index.get((aspect, task, metric))
        return 0 if row is None else row["n"]

    def key(self, aspect: str, task: str, metric: str) -> str:
        """The key the row is logged under at ``test``."""
        return metric_key(STAGE, self.domain, aspect, task, metric)

    def aspects(self) -> list[str]:
        return list(dict.fromkeys(r["aspect"] for r in self.rows if r["aspect"] != ALL))

    def tasks(self, aspect: str) -> list[str]:
        return list(dict.fromkeys(r["task"] for r in self.rows if r["aspect"] == aspect and r["task"] != ALL))

    def add_domain_rows(self, report: Report, label: str, groups: str) -> None:
        """The domain's summary rows: its average score, then both accuracies over its choice items."""
        report.add(
            label,
            "average",
            self.value(ALL, ALL, "avg"),
            self.n(ALL, ALL, "avg"),
            f"size-weighted mean of {len(self.aspects())} {groups}",
            self.key(ALL, ALL, "avg"),
        )
        for metric, how in (("acc", "highest summed log-likelihood"), ("acc_norm", "per character")):
            value = self.value(ALL, ALL, metric)
            if value is not None:
                n = self.n(ALL, ALL, metric)
                report.add(label, metric, value, n, f"{n} choice items, {how}", self.key(ALL, ALL, metric))
