"""Scores for open generation (EI expression): BLEU-4, ROUGE-1/2/L and Distinct-1/2, all in [0, 1].

- BLEU-4 is corpus BLEU (torchmetrics ``BLEUScore``: clipped n-gram counts summed over the corpus,
  whitespace tokens, no smoothing).
- ROUGE-1/2/L is the F-measure of each prediction against its reference (torchmetrics' ROUGE:
  lowercased alphanumeric tokens, no stemming), averaged over predictions. ``rougeLsum`` is left
  out: it needs nltk's sentence splitter, which is a download.
- Distinct-n (Li et al., 2016) is corpus-level: distinct n-grams over all n-grams of all
  predictions (lowercased whitespace tokens); 0 when there is no n-gram at all.

:class:`GenerationMetrics` accumulates the same numbers across batches and DDP ranks. Every state
is a tensor summed or concatenated across ranks, so every rank makes the same collective calls
whatever it saw; torchmetrics' ``ROUGEScore`` keeps per-sample lists, which deadlock when ranks hold
different numbers of samples, so ROUGE is averaged with ``MeanMetric`` instead.
:func:`score_generations` is the same computation as a plain function, for the evaluation harness.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.functional.text import rouge_score
from torchmetrics.text import BLEUScore
from torchmetrics.utilities import dim_zero_cat

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
GENERATION_KEYS = ("bleu4", *ROUGE_KEYS, "distinct1", "distinct2")


def _tokens(text: str) -> list[str]:
    return text.lower().split()


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Corpus Distinct-n: distinct n-grams / all n-grams over ``texts`` (0.0 when there is none)."""
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1, got {n}")
    grams = [g for text in texts for g in _ngrams(_tokens(text), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _ngram_id(gram: tuple[str, ...]) -> int:
    """A 52-bit id, the same in every process (Python's ``hash`` of a str is salted per process).

    52 bits fit a float64 exactly; a collision among a million distinct n-grams has odds near 1e-4.
    """
    digest = hashlib.blake2b("\x1f".join(gram).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 12


class DistinctN(Metric):
    """Corpus Distinct-n across batches and ranks: n-gram ids are concatenated, then counted once.

    The ids are a list state, which torchmetrics concatenates into one tensor per rank before a
    single gather (uneven lengths are padded), and replaces by an empty tensor of the metric's dtype
    on a rank without data. So the ids travel as float64, the dtype of the whole metric.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, n: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if n < 1:
            raise ValueError(f"DistinctN needs n >= 1, got {n}")
        self.n = n
        self.add_state("ids", [], dist_reduce_fx="cat")
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.set_dtype(torch.float64)

    def update(self, texts: Sequence[str]) -> None:
        grams = [g for text in texts for g in _ngrams(_tokens(text), self.n)]
        # Ids unique within this update only: the union across batches and ranks is taken in compute.
        self.ids.append(torch.tensor(sorted({_ngram_id(g) for g in grams}), dtype=torch.float64, device=self.device))
        self.total += len(grams)

    def compute(self) -> Tensor:
        if self.total == 0:
            return torch.tensor(0.0, device=self.total.device)
        return torch.unique(dim_zero_cat(self.ids)).numel() / self.total


def rouge_f(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measure of one prediction against one reference."""
    scores = rouge_score(prediction, reference, rouge_keys=ROUGE_KEYS)
    return {key: float(scores[f"{key}_fmeasure"]) for key in ROUGE_KEYS}


class GenerationMetrics(nn.Module):
    """BLEU-4, ROUGE-1/2/L and Distinct-1/2 over every prediction given to :meth:`update`.

    ``metric_kwargs`` go to every torchmetrics metric inside (e.g. ``sync_on_compute=False``).
    :meth:`compute` makes the same collective calls in the same order on every rank.
    """

    def __init__(self, **metric_kwargs: object) -> None:
        super().__init__()
        self.bleu4 = BLEUScore(n_gram=4, **metric_kwargs)
        self.rouge = nn.ModuleDict({key: MeanMetric(**metric_kwargs) for key in ROUGE_KEYS})
        self.distinct = nn.ModuleDict({str(n): DistinctN(n, **metric_kwargs) for n in (1, 2)})

    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        if not predictions:
            return
        self.bleu4.update(list(predictions), [[r] for r in references])
        per_sample = [rouge_f(p, r) for p, r in zip(predictions, references)]
        for key, metric in self.rouge.items():
            metric.update(torch.tensor([s[key] for s in per_sample], dtype=torch.float32, device=metric.device))
        for metric in self.distinct.values():
            metric.update(predictions)

    def compute(self) -> dict[str, float]:
        values = {"bleu4": self.bleu4.compute()}
        values |= {key: metric.compute() for key, metric in self.rouge.items()}
        values |= {f"distinct{n}": metric.compute() for n, metric in self.distinct.items()}
        return {key: float(value) for key, value in values.items()}

    def reset(self) -> None:
        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()


def score_generations(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus scores of ``predictions`` against ``references`` (one each), keys :data:`GENERATION_KEYS`.

    Computed in this process only (no DDP sync), so it is safe to call on one rank of a job.
    """
    if not predictions:
        raise ValueError("score_generations needs at least one prediction")
    metrics = GenerationMetrics(sync_on_compute=False)
    metrics.update(predictions, references)
    return metrics.compute()
