"""Per-task and per-aspect EI metrics and per-dimension GI accuracy, accumulated with torchmetrics.

- Choice records (with ``choices``): accuracy, and for EI macro-F1 over the task's labels (every
  choice text seen in the task). GI choices are per-question answers, so GI gets accuracy only.
- Open records (no ``choices``): BLEU-4, ROUGE-1/2/L and Distinct-1/2 (:mod:`moei_lightning.eval.text_metrics`).
- Per aspect: accuracy and the generation scores pooled over the aspect's records; ``f1`` is the
  mean of its tasks' macro-F1 (label sets differ between tasks, so F1 is not pooled).
- ``score`` of a task is its accuracy (choice) or ROUGE-L (open); an aspect's ``score`` is the mean
  over its tasks, and a domain's ``avg`` the mean over its aspects.

Every metric is created up front from the full task list, identical on every rank, and
:meth:`AspectMetrics.compute` syncs them in the same order everywhere: counts first, then only the
metrics whose synced count is non-zero. No rank can skip a collective another one makes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric, Metric, SumMetric
from torchmetrics.classification import MulticlassF1Score

from moei_lightning.data import EiRecord
from moei_lightning.eval.text_metrics import GENERATION_KEYS, GenerationMetrics

ALL = "all"
TaskKey = tuple[str, str, str]
"""``(domain, aspect, task)``."""


@dataclass(frozen=True)
class TaskSpec:
    """What one task needs: its label vocabulary (choice records) and whether it has open records."""

    domain: str
    aspect: str
    task: str
    labels: tuple[str, ...]
    open: bool

    @property
    def key(self) -> TaskKey:
        return (self.domain, self.aspect, self.task)


def task_specs(records: Iterable[EiRecord]) -> list[TaskSpec]:
    """One spec per ``(domain, aspect, task)``, in order of first appearance."""
    labels: dict[TaskKey, dict[str, None]] = {}
    has_open: dict[TaskKey, bool] = {}
    for r in records:
        key = (r.domain, r.aspect, r.task)
        labels.setdefault(key, {}).update(dict.fromkeys(r.choices or ()))
        has_open[key] = has_open.get(key, False) or not r.choices
    return [TaskSpec(*key, tuple(labels[key]), has_open[key]) for key in labels]


class _TaskMetrics(nn.Module):
    def __init__(self, spec: TaskSpec, sync: dict[str, Any]) -> None:
        super().__init__()
        self.spec = spec
        self.n_choice, self.n_open = SumMetric(**sync), SumMetric(**sync)
        self.correct = MeanMetric(**sync)
        self.f1 = (
            MulticlassF1Score(num_classes=len(spec.labels), average="macro", **sync)
            if spec.domain == "ei" and len(spec.labels) >= 2
            else None
        )
        self.generation = GenerationMetrics(**sync) if spec.open else None


class _AspectMetrics(nn.Module):
    def __init__(self, has_open: bool, sync: dict[str, Any]) -> None:
        super().__init__()
        self.n_choice, self.n_open = SumMetric(**sync), SumMetric(**sync)
        self.correct = MeanMetric(**sync)
        self.generation = GenerationMetrics(**sync) if has_open else None


class AspectMetrics(nn.Module):
    """Every EI/GI metric of one evaluation split. ``metric_kwargs`` go to each torchmetrics metric."""

    def __init__(self, specs: list[TaskSpec], **metric_kwargs: Any) -> None:
        super().__init__()
        self.specs = {spec.key: spec for spec in specs}
        self.task_metrics = nn.ModuleList(_TaskMetrics(spec, metric_kwargs) for spec in specs)
        self._task_index = {spec.key: i for i, spec in enumerate(specs)}
        aspects = list(dict.fromkeys((s.domain, s.aspect) for s in specs))
        self.aspect_metrics = nn.ModuleList(
            _AspectMetrics(any(s.open for s in specs if (s.domain, s.aspect) == a), metric_kwargs) for a in aspects
        )
        self._aspect_index = {a: i for i, a in enumerate(aspects)}

    def _task(self, key: TaskKey) -> _TaskMetrics:
        if key not in self._task_index:
            raise KeyError(f"task {key} is not in the evaluation split these metrics were built for")
        return self.task_metrics[self._task_index[key]]

    def update_choices(self, keys: list[TaskKey], predicted: list[str], targets: list[str]) -> None:
        """Record chosen answers (choice texts) against the reference answers."""
        for key, pred, target in zip(keys, predicted, targets, strict=True):
            task, aspect = self._task(key), self.aspect_metrics[self._aspect_index[key[:2]]]
            hit = torch.tensor(float(pred == target), device=task.correct.device)
            for m in (task, aspect):
                m.n_choice.update(torch.ones((), device=hit.device))
                m.correct.update(hit)
            if task.f1 is not None:
                labels = task.spec.labels
                ids = [labels.index(pred), labels.index(target)]
                pair = torch.tensor(ids, device=hit.device)
                task.f1.update(pair[:1], pair[1:])

    def update_generations(self, keys: list[TaskKey], predictions: list[str], references: list[str]) -> None:
        """Record generated texts against the reference outputs."""
        for key, pred, ref in zip(keys, predictions, references, strict=True):
            task, aspect = self._task(key), self.aspect_metrics[self._aspect_index[key[:2]]]
            for m in (task, aspect):
                m.n_open.update(torch.ones((), device=task.n_open.device))
                m.generation.update([pred], [ref])

    def compute(self) -> list[dict[str, Any]]:
        """Rows ``{domain, aspect, task, metric, value, n}``; ``all`` marks aspect and domain aggregates."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            return self._compute()

    def _compute(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []

        def add(domain: str, aspect: str, task: str, metric: str, value: float, n: int) -> None:
            rows.append({"domain": domain, "aspect": aspect, "task": task, "metric": metric, "value": value, "n": n})

        task_scores: dict[tuple[str, str], list[float]] = {a: [] for a in self._aspect_index}
        task_f1s: dict[tuple[str, str], list[float]] = {a: [] for a in self._aspect_index}
        for spec, m in zip(self.specs.values(), self.task_metrics):
            n_choice, n_open = int(m.n_choice.compute()), int(m.n_open.compute())
            if n_choice:
                acc = float(m.correct.compute())
                add(*spec.key, "acc", acc, n_choice)
                task_scores[spec.key[:2]].append(acc)
                if m.f1 is not None:
                    f1 = float(m.f1.compute())
                    add(*spec.key, "f1", f1, n_choice)
                    task_f1s[spec.key[:2]].append(f1)
            if n_open:
                generated = m.generation.compute()
                for metric in GENERATION_KEYS:
                    add(*spec.key, metric, generated[metric], n_open)
                task_scores[spec.key[:2]].append(generated["rougeL"])
        domain_scores: dict[str, list[tuple[float, int]]] = {}
        for (domain, aspect), m in zip(self._aspect_index, self.aspect_metrics):
            n_choice, n_open = int(m.n_choice.compute()), int(m.n_open.compute())
            if n_choice:
                add(domain, aspect, ALL, "acc", float(m.correct.compute()), n_choice)
            if f1s := task_f1s[(domain, aspect)]:
                add(domain, aspect, ALL, "f1", sum(f1s) / len(f1s), n_choice)
            if n_open:
                generated = m.generation.compute()
                for metric in GENERATION_KEYS:
                    add(domain, aspect, ALL, metric, generated[metric], n_open)
            if scores := task_scores[(domain, aspect)]:
                score = sum(scores) / len(scores)
                add(domain, aspect, ALL, "score", score, n_choice + n_open)
                domain_scores.setdefault(domain, []).append((score, n_choice + n_open))
        for domain, scored in domain_scores.items():
            add(domain, ALL, ALL, "avg", sum(s for s, _ in scored) / len(scored), sum(n for _, n in scored))
        return rows

    def reset(self) -> None:
        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()


def metric_key(stage: str, row: dict[str, Any]) -> str:
    """The logger key of a row: ``val/ei/perception/acc``, ``val/ei/perception/<task>/f1``, ``val/gi/avg``."""
    parts = [stage, row["domain"], row["aspect"], row["task"], row["metric"]]
    return "/".join(p for p in parts if p != ALL)
