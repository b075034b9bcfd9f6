"""Generation scores equal the reference libraries' own numbers: sacrebleu (13a, zh) and rouge-score (stemmed)."""

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from moei_lightning.eval.text_metrics import GENERATION_KEYS, bleu4, distinct_n, rouge, score_generations

PREDICTIONS = ["The cats were sitting on the mat!", "a b c d", "hello there", "", "I'm so happy for you!"]
REFERENCES = ["the cat sat on the mat.", "a b c d e", "hello there friend", "nothing", "I am so happy for you."]


def test_bleu_is_sacrebleu_default() -> None:
    expected = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
    assert bleu4(PREDICTIONS, REFERENCES) == pytest.approx(expected, abs=1e-9)
    # 13a splits punctuation off: this pair shares most 4-grams (whitespace tokens shared none).
    assert bleu4(["I'm so happy for you!"], ["I am so happy for you."]) == pytest.approx(43.01, abs=0.01)


def test_chinese_bleu_and_rouge_are_not_zero() -> None:
    prediction, reference = ["我很高兴见到你"], ["我很高兴认识你"]
    expected = sacrebleu.corpus_bleu(prediction, [reference], tokenize="zh").score
    assert bleu4(prediction, reference, "zh") == pytest.approx(expected) and expected > 40
    scores = rouge(prediction, reference, "zh")
    assert scores["rouge1"] == pytest.approx(100 * 5 / 7)  # 5 of 7 characters shared
    assert rouge(prediction, reference)["rouge1"] == 0.0  # rouge-score's own tokenizer drops Chinese


def test_rouge_is_rouge_score_with_stemming() -> None:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    per_pair = [scorer.score(r, p) for p, r in zip(PREDICTIONS, REFERENCES)]
    ours = rouge(PREDICTIONS, REFERENCES)
    for key, theirs in (("rouge1", "rouge1"), ("rouge2", "rouge2"), ("rouge_l", "rougeL")):
        assert ours[key] == pytest.approx(100 * sum(s[theirs].fmeasure for s in per_pair) / len(per_pair))
    # Stemming: "cats"/"cat", "sitting"/"sat" is not a stem match, "were" is extra.
    assert rouge(["the cats"], ["the cat"])["rouge1"] == pytest.approx(100.0)


def test_distinct_n_counts_ngrams_over_the_corpus() -> None:
    assert distinct_n(["a b a b", "A b"], 1) == pytest.approx(100 * 2 / 6)  # lowercased: {a, b} of 6 unigrams
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(100 * 2 / 4)
    assert distinct_n(["x", ""], 2) == 0.0  # no bigram at all
    assert distinct_n(["我我你"], 1, "zh") == pytest.approx(100 * 2 / 3)
    with pytest.raises(ValueError, match="n >= 1"):
        distinct_n(["a"], 0)


def test_all_scores_in_percent_and_bad_input_is_an_error() -> None:
    perfect = score_generations(["the cat is on the mat"], ["the cat is on the mat"])
    assert set(perfect) == set(GENERATION_KEYS)
    assert perfect == pytest.approx(dict.fromkeys(GENERATION_KEYS, 100.0) | {"distinct1": 100 * 5 / 6})
    scores = score_generations(PREDICTIONS, REFERENCES)
    assert all(0.0 <= v <= 100.0 for v in scores.values())
    with pytest.raises(ValueError, match="at least one prediction"):
        score_generations([], [])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score_generations(["a", "b"], ["a"])
