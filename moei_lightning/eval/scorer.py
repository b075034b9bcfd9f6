"""The one scorer of EiBench-style records: per-item outcomes -> rows per task, aspect and domain, in percent.

Validation metrics (:class:`~moei_lightning.callbacks.EiMetricsCallback`), the ``test`` evaluation
(:class:`~moei_lightning.eval.callback.PaperEvaluation`) and the report all take their EI/GI numbers
from :func:`score_rows`, so one run shows one set of numbers wherever it is read.

- Choice records: ``acc`` (the acc_norm answer, :mod:`moei_lightning.eval.choices`); EI tasks also get
  ``f1``, macro-F1 over the labels that occur among the task's answers and predictions (as
  scikit-learn's ``f1_score(average="macro")``). GI choices are per-question answers: accuracy only.
- Open records: BLEU-4, ROUGE-1/2/L and Distinct-1/2 (:mod:`moei_lightning.eval.text_metrics`),
  per task and pooled per aspect.
- A task's ``score`` is its accuracy (choice) or ROUGE-L (open). An aspect (EI) or dimension (GI)
  gets ``acc`` and text metrics pooled over its items, ``f1`` as the mean of its tasks' F1, and
  ``score`` as the mean of its tasks' scores, so one large task does not drown the others. A
  domain's ``avg`` is the mean of its aspects' scores. ``n`` counts items.

Rows are ``{"domain", "aspect", "task", "metric", "value", "n"}``; ``all`` marks aggregates.
:func:`metric_key` names a row for loggers: ``val/ei/perception/acc``, ``test/gi/avg``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from moei_lightning.data import EI_ASPECTS, GI_ASPECTS, EiRecord, Encoder
from moei_lightning.eval.harness import ChoiceOutcome, Harness, OpenOutcome, Results
from moei_lightning.eval.suites import Item, record_language
from moei_lightning.eval.text_metrics import GENERATION_KEYS, score_generations
from moei_lightning.ranks import Gather, all_gather
from moei_lightning.runner import ModelRunner

ALL = "all"
Row = dict[str, Any]
_ORDER = {"ei": EI_ASPECTS, "gi": GI_ASPECTS}


def accuracy(outcomes: Sequence[ChoiceOutcome]) -> float:
    """Percent of outcomes whose acc_norm answer is right."""
    return 100.0 * sum(o.correct for o in outcomes) / len(outcomes)


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
    total = dict.fromkeys(GENERATION_KEYS, 0.0)
    for language, group in by_language.items():
        scores = score_generations([o.prediction for o in group], [o.item.record.output for o in group], language)
        weight = len(group) / len(outcomes)  # 1.0 for one language: its scores exactly
        for key in GENERATION_KEYS:
            total[key] += scores[key] * weight
    return total


def score_rows(choice: Sequence[ChoiceOutcome], open_: Sequence[OpenOutcome]) -> list[Row]:
    """Rows per task, per aspect and per domain of the outcomes given (tasks without items are absent)."""
    rows: list[Row] = []

    def add(domain: str, aspect: str, task: str, metric: str, value: float, n: int) -> None:
        rows.append({"domain": domain, "aspect": aspect, "task": task, "metric": metric, "value": value, "n": n})

    tasks: dict[tuple[str, str, str], tuple[list[ChoiceOutcome], list[OpenOutcome]]] = defaultdict(lambda: ([], []))
    for outcome in choice:
        tasks[(_domain(outcome.item), outcome.item.group, outcome.item.task)][0].append(outcome)
    for outcome in open_:
        tasks[(_domain(outcome.item), outcome.item.group, outcome.item.task)][1].append(outcome)
    aspects = sorted({key[:2] for key in tasks}, key=_aspect_order)
    domain_scores: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for domain, aspect in aspects:
        scores, f1s, pooled_choice, pooled_open = [], [], [], []
        for task in sorted(t for d, a, t in tasks if (d, a) == (domain, aspect)):
            chosen, generated = tasks[(domain, aspect, task)]
            if chosen:
                acc = accuracy(chosen)
                add(domain, aspect, task, "acc", acc, len(chosen))
                scores.append(acc)
                if domain == "ei":
                    f1 = macro_f1(
                        [o.item.record.choices[o.scores.predicted] for o in chosen],
                        [o.item.record.output for o in chosen],
                    )
                    add(domain, aspect, task, "f1", f1, len(chosen))
                    f1s.append(f1)
            if generated:
                metrics = _generation(generated)
                for metric in GENERATION_KEYS:
                    add(domain, aspect, task, metric, metrics[metric], len(generated))
                scores.append(metrics["rouge_l"])
            pooled_choice += chosen
            pooled_open += generated
        n = len(pooled_choice) + len(pooled_open)
        if pooled_choice:
            add(domain, aspect, ALL, "acc", accuracy(pooled_choice), len(pooled_choice))
        if f1s:
            add(domain, aspect, ALL, "f1", sum(f1s) / len(f1s), len(pooled_choice))
        if pooled_open:
            metrics = _generation(pooled_open)
            for metric in GENERATION_KEYS:
                add(domain, aspect, ALL, metric, metrics[metric], len(pooled_open))
        score = sum(scores) / len(scores)
        add(domain, aspect, ALL, "score", score, n)
        domain_scores[domain].append((score, n))
    for domain, scored in domain_scores.items():
        add(domain, ALL, ALL, "avg", sum(s for s, _ in scored) / len(scored), sum(n for _, n in scored))
    return rows


def metric_key(stage: str, row: Row) -> str:
    """The logger key of a row: ``val/ei/perception/acc``, ``val/ei/perception/<task>/f1``, ``val/gi/avg``."""
    parts = [stage, row["domain"], row["aspect"], row["task"], row["metric"]]
    return "/".join(p for p in parts if p != ALL)


def record_items(records: Sequence[EiRecord]) -> list[Item]:
    """EiBench-style records as items of the ``eibench`` (EI) or ``gi`` suite; choice records carry their answer."""
    return [
        Item(
            "eibench" if r.domain == "ei" else "gi",
            r.task,
            r.aspect,
            record_language(r),
            r,
            r.choices.index(r.output) if r.choices else None,
        )
        for r in records
    ]


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
    Rows with ``metric == "acc"`` give accuracy per task and per EI aspect or GI dimension; ``score``
    and ``avg`` rows give the aspect and domain scores. Records without choices are an error. Under
    DDP/FSDP every rank must call it with the same records (``rank``, ``world_size`` from the
    trainer): the ranks share the forwards and all return every row.
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
        outcomes = harness.choices(record_items(records), "choices", Results())
    finally:
        module.model.train(training)
    return score_rows(outcomes, [])
