"""Generation scores on texts with known answers, accumulated across batches and across 2 processes."""

import math
from pathlib import Path

import pytest
import torch

from moei_lightning.eval.text_metrics import GENERATION_KEYS, GenerationMetrics, distinct_n, score_generations
from tests.conftest import on_two_ranks

PREDICTIONS = ["the cat sat", "a b c d", "hello there", ""]
REFERENCES = ["the cat ran away", "a b c d e", "hello there friend", "nothing"]


def test_distinct_n_counts_ngrams_over_the_corpus() -> None:
    assert distinct_n(["a b a b", "A b"], 1) == pytest.approx(2 / 6)  # lowercased: {a, b} of 6 unigrams
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)  # {ab, ba} of ab, ba, ab, ab
    assert distinct_n(["x", ""], 2) == 0.0  # no bigram at all
    with pytest.raises(ValueError, match="n >= 1"):
        distinct_n(["a"], 0)


def test_known_scores() -> None:
    perfect = score_generations(["the cat is on the mat"], ["the cat is on the mat"])
    # "the" twice: 5 distinct of 6 unigrams; every bigram differs
    assert perfect == pytest.approx(dict.fromkeys(GENERATION_KEYS, 1.0) | {"distinct1": 5 / 6})
    assert set(perfect) == {"bleu4", "rouge1", "rouge2", "rougeL", "distinct1", "distinct2"}
    rouge = score_generations(["the cat sat"], ["the cat ran away"])
    # rouge1: P 2/3, R 2/4 -> F 4/7; rouge2: (the cat) of 2 and 3 bigrams -> F 2/5; LCS "the cat" -> 4/7
    assert rouge["rouge1"] == pytest.approx(4 / 7) and rouge["rouge2"] == pytest.approx(2 / 5)
    assert rouge["rougeL"] == pytest.approx(4 / 7)
    short = score_generations(["a b c d"], ["a b c d e"])  # all n-grams match; brevity penalty exp(1 - 5/4)
    assert short["bleu4"] == pytest.approx(math.exp(-0.25), rel=1e-5)
    nothing = score_generations(["x y"], ["a b"])
    assert nothing["bleu4"] == nothing["rouge1"] == nothing["rougeL"] == 0.0


def test_scores_stay_in_unit_interval_and_empty_input_is_an_error() -> None:
    scores = score_generations(PREDICTIONS, REFERENCES)
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    with pytest.raises(ValueError, match="at least one prediction"):
        score_generations([], [])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        GenerationMetrics().update(["a", "b"], ["a"])


def test_batches_add_up_to_the_corpus() -> None:
    metrics = GenerationMetrics()
    for start in range(0, len(PREDICTIONS), 3):
        metrics.update(PREDICTIONS[start : start + 3], REFERENCES[start : start + 3])
    assert metrics.compute() == pytest.approx(score_generations(PREDICTIONS, REFERENCES))


def _generation_on_rank(rank: int) -> dict[str, float]:
    torch.set_num_threads(1)
    metrics = GenerationMetrics()
    if rank == 0:  # uneven shares: three predictions here, one there
        metrics.update(PREDICTIONS[:3], REFERENCES[:3])
    else:
        metrics.update(PREDICTIONS[3:], REFERENCES[3:])
    return metrics.compute()


@pytest.mark.slow
def test_two_processes_score_the_whole_corpus(tmp_path: Path) -> None:
    expected = score_generations(PREDICTIONS, REFERENCES)
    for result in on_two_ranks(_generation_on_rank, tmp_path):
        assert result == pytest.approx(expected)
