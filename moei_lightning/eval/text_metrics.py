"""Scores for open generation (EI expression), in percent, through the libraries that define them.

- **BLEU-4**: corpus BLEU from sacrebleu with its defaults (``13a`` tokenisation, exponential
  smoothing, case-sensitive); Chinese uses sacrebleu's ``zh`` tokenizer. This is the number
  sacrebleu prints; the report states :data:`BLEU_SETTINGS`.
- **ROUGE-1/2/L**: the F-measure of each prediction against its reference from Google's
  ``rouge-score`` with the Porter stemmer (as the MoEI paper reports ROUGE), averaged over
  predictions. ``rouge-score`` keeps only ASCII letters and digits, which would score every Chinese
  text 0, so Chinese is compared character by character (whitespace dropped).
- **Distinct-1/2** (Li et al., 2016): distinct n-grams over all n-grams of all predictions
  (lowercased whitespace tokens; characters for Chinese); 0 when there is no n-gram at all.

Every function runs in this process only: callers hand it all predictions (the evaluation runner
gives every rank every result), so no metric state is synced across ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu
from rouge_score import rouge_scorer

ROUGE_KEYS = ("rouge1", "rouge2", "rouge_l")
_ROUGE_TYPES = {"rouge1": "rouge1", "rouge2": "rouge2", "rouge_l": "rougeL"}  # our key -> rouge-score's name
GENERATION_KEYS = ("bleu4", *ROUGE_KEYS, "distinct1", "distinct2")
BLEU_SETTINGS = f"sacrebleu {sacrebleu.__version__} corpus_bleu defaults: tok 13a (zh: tok zh), smooth exp, case mixed"
ROUGE_SETTINGS = "rouge-score, use_stemmer=True, F-measure averaged over predictions (zh: characters)"


class _Characters:
    """A rouge-score tokenizer for Chinese: every non-whitespace character is a token."""

    def tokenize(self, text: str) -> list[str]:
        return [c for c in text if not c.isspace()]


_SCORERS = {
    "en": rouge_scorer.RougeScorer(list(_ROUGE_TYPES.values()), use_stemmer=True),
    "zh": rouge_scorer.RougeScorer(list(_ROUGE_TYPES.values()), tokenizer=_Characters()),
}


def _language(language: str) -> str:
    return "zh" if language == "zh" else "en"


def bleu4(predictions: Sequence[str], references: Sequence[str], language: str = "en") -> float:
    """Corpus BLEU-4 in percent, exactly as ``sacrebleu.corpus_bleu`` computes it by default."""
    tokenize = "zh" if _language(language) == "zh" else "13a"
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize=tokenize).score)


def rouge(predictions: Sequence[str], references: Sequence[str], language: str = "en") -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure in percent (rouge-score, stemmed), keys ``rouge1``, ``rouge2``, ``rouge_l``."""
    scorer = _SCORERS[_language(language)]
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)  # rouge-score takes (target, prediction)
        for key in ROUGE_KEYS:
            totals[key] += scores[_ROUGE_TYPES[key]].fmeasure
    return {key: 100.0 * total / len(predictions) for key, total in totals.items()}


def _tokens(text: str, language: str) -> list[str]:
    return [c for c in text if not c.isspace()] if _language(language) == "zh" else text.lower().split()


def distinct_n(texts: Sequence[str], n: int, language: str = "en") -> float:
    """Corpus Distinct-n in percent: distinct n-grams / all n-grams over ``texts`` (0 when there is none)."""
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1, got {n}")
    grams = []
    for text in texts:
        tokens = _tokens(text, language)
        grams += [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 100.0 * len(set(grams)) / len(grams) if grams else 0.0


def score_generations(predictions: Sequence[str], references: Sequence[str], language: str = "en") -> dict[str, float]:
    """Every generation score of ``predictions`` against ``references`` (one each), keys :data:`GENERATION_KEYS`."""
    if not predictions:
        raise ValueError("score_generations needs at least one prediction")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    return {
        "bleu4": bleu4(predictions, references, language),
        **rouge(predictions, references, language),
        "distinct1": distinct_n(predictions, 1, language),
        "distinct2": distinct_n(predictions, 2, language),
    }
