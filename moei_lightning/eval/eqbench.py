"""EQ-Bench v2: score a model's raw replies exactly as the reference harness (v2.0) does.

The scores must be comparable with published EQ-Bench v2 numbers, so every rule follows the
harness that produced them; the two recorded harness runs in the shared data are the
conformance vectors (tests/test_eqbench.py).

- A reply has a first pass (between ``First pass scores:`` and ``Revised scores:``) and a
  revision (after ``Revised scores:``). Each holds ``Name: <int>`` pairs: one word, matched
  case-sensitively, a colon, whitespace, then digits. Anything else (``**Name:** 5``,
  ``Name:5``) is not an answer, as in the harness.
- A pass of a question is parseable only if it names exactly the reference's four emotions.
- Per emotion, d = |answer - reference| against the full-scale reference; the penalty is
  0 for d = 0, 6.5 / (1 + e^(-1.2 (d - 4))) for 0 < d < 5, and d itself for d >= 5.
  Question score = 10 - 0.7477 * (sum of the four penalties).
- Pass score = 10 * mean question score over that pass's parseable questions (0 if none).
- The revision is the final score when it scores at least the first pass and has at least
  0.95 times as many parseable questions; otherwise the first pass is.
- Several iterations of one run: each is scored on its own, then the final scores and the
  parseable counts are averaged, as the harness does.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_FIRST_PASS = re.compile(r"First pass scores:(.*?)Revised scores:", re.DOTALL)
_REVISED = re.compile(r"Revised scores:(.*)", re.DOTALL)
_ANSWER = re.compile(r"(\w+):\s+(\d+)")

_N_EMOTIONS = 4
_ADJUST = 0.7477  # chosen by the benchmark so that random answers score about zero
_REVISION_MIN_PARSEABLE = 0.95


class EqBenchInputError(ValueError):
    """A questions or responses file that cannot be used as given."""


@dataclass(frozen=True)
class Question:
    """One EQ-Bench question: the prompt a model answers and the full-scale reference intensities."""

    id: str
    prompt: str
    reference: dict[str, int]


@dataclass(frozen=True)
class QuestionScore:
    """Scores of both passes of one reply; None where that pass is unparseable or there is no reply."""

    first_pass: float | None
    revised: float | None


@dataclass(frozen=True)
class EqBenchResult:
    """One iteration scored; `parseable` and `unparseable_ids` belong to the chosen pass."""

    score: float
    first_pass_score: float
    revised_score: float
    chosen_pass: str
    parseable: int
    first_pass_parseable: int
    revised_parseable: int
    n_questions: int
    unparseable_ids: tuple[str, ...]
    missing_ids: tuple[str, ...]
    per_question: dict[str, QuestionScore]


@dataclass(frozen=True)
class EqBenchRun:
    """Several iterations of one model, averaged the way the harness averages them."""

    iterations: dict[str, EqBenchResult]

    @property
    def score(self) -> float:
        return _mean([r.score for r in self.iterations.values()])

    @property
    def parseable(self) -> float:
        return _mean([r.parseable for r in self.iterations.values()])

    @property
    def first_pass_score(self) -> float:
        return _mean([r.first_pass_score for r in self.iterations.values()])

    @property
    def revised_score(self) -> float:
        return _mean([r.revised_score for r in self.iterations.values()])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _read_json(path: str | Path) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise EqBenchInputError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from e


def _intensity(value: object, where: str) -> int:
    """Reference intensities are stored both as ints and as digit strings; both mean the same."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdecimal():
        number = int(value)
    else:
        raise EqBenchInputError(f"{where}: intensity {value!r} is not a whole number from 0 to 10")
    if not 0 <= number <= 10:
        raise EqBenchInputError(f"{where}: intensity {number} is outside 0-10")
    return number


def load_questions(path: str | Path) -> dict[str, Question]:
    """Read the v2 question file (id -> prompt, reference_answer_fullscale) into Questions."""
    raw = _read_json(path)
    if not isinstance(raw, dict) or not raw:
        raise EqBenchInputError(
            f"{path}: expected a JSON object mapping question id to question; pass eq_bench_v2_questions_171.json"
        )
    questions = {}
    for qid, entry in raw.items():
        where = f"{path}: question {qid}"
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise EqBenchInputError(f"{where}: needs a string 'prompt'; is this the v2 question file?")
        ref = entry.get("reference_answer_fullscale")
        if not isinstance(ref, dict):
            raise EqBenchInputError(
                f"{where}: needs 'reference_answer_fullscale' (v2 questions); v1 files cannot be scored"
            )
        reference = {}
        for i in range(1, _N_EMOTIONS + 1):
            name = ref.get(f"emotion{i}")
            if not isinstance(name, str) or not name:
                raise EqBenchInputError(f"{where}: reference_answer_fullscale lacks emotion{i}")
            if name in reference:
                raise EqBenchInputError(f"{where}: emotion {name!r} appears twice in the reference")
            reference[name] = _intensity(ref.get(f"emotion{i}_score"), f"{where}: emotion{i}_score")
        questions[qid] = Question(id=qid, prompt=entry["prompt"], reference=reference)
    return questions


def question_prompts(questions: Mapping[str, Question]) -> dict[str, str]:
    """The text each question asks a model to answer, by id; a harness wraps it in a chat template."""
    return {qid: q.prompt for qid, q in questions.items()}


def _answers(section: str) -> dict[str, int]:
    # A name given twice keeps its last value, as in the harness.
    return {name: int(value) for name, value in _ANSWER.findall(section)}


def parse_answers(text: str) -> tuple[dict[str, int], dict[str, int]]:
    """Split a reply into (first pass, revised) emotion intensities; a missing section gives {}."""
    first = _FIRST_PASS.search(text)
    revised = _REVISED.search(text)
    return (
        _answers(first.group(1)) if first else {},
        _answers(revised.group(1)) if revised else {},
    )


def _penalty(difference: int) -> float:
    """Small misses cost little (S-curve), misses of 5 or more cost their full size."""
    if difference == 0:
        return 0.0
    if difference < 5:
        return 6.5 / (1 + math.exp(-1.2 * (difference - 4)))
    return float(difference)


def score_question(answers: Mapping[str, int], reference: Mapping[str, int]) -> float | None:
    """Score one pass of one question (10 is perfect); None unless it names exactly the reference emotions."""
    if set(answers) != set(reference):
        return None
    return 10 - _ADJUST * sum(_penalty(abs(answers[name] - ref)) for name, ref in reference.items())


def _pass_score(scores: list[float | None]) -> tuple[float, int]:
    parsed = [s for s in scores if s is not None]
    return (10 * _mean(parsed) if parsed else 0.0), len(parsed)


def score_responses(responses: Mapping[str, str], questions: Mapping[str, Question]) -> EqBenchResult:
    """Score one iteration of replies (question id -> reply text) against the questions."""
    unknown = [qid for qid in responses if qid not in questions]
    if unknown:
        raise EqBenchInputError(
            f"replies for {len(unknown)} question id(s) not in the question file, e.g. {unknown[:5]}; "
            "score them against the question file the model was asked"
        )
    per_question = {}
    for qid, question in questions.items():
        if qid not in responses:
            per_question[qid] = QuestionScore(first_pass=None, revised=None)
            continue
        first, revised = parse_answers(responses[qid])
        per_question[qid] = QuestionScore(
            first_pass=score_question(first, question.reference),
            revised=score_question(revised, question.reference),
        )
    first_score, first_parseable = _pass_score([s.first_pass for s in per_question.values()])
    revised_score, revised_parseable = _pass_score([s.revised for s in per_question.values()])
    use_revised = revised_score >= first_score and revised_parseable >= _REVISION_MIN_PARSEABLE * first_parseable
    chosen = "revised" if use_revised else "first_pass"
    return EqBenchResult(
        score=revised_score if use_revised else first_score,
        first_pass_score=first_score,
        revised_score=revised_score,
        chosen_pass=chosen,
        parseable=revised_parseable if use_revised else first_parseable,
        first_pass_parseable=first_parseable,
        revised_parseable=revised_parseable,
        n_questions=len(questions),
        unparseable_ids=tuple(qid for qid, s in per_question.items() if getattr(s, chosen) is None),
        missing_ids=tuple(qid for qid in questions if qid not in responses),
        per_question=per_question,
    )


def score_run(iterations: Mapping[str, Mapping[str, str]], questions: Mapping[str, Question]) -> EqBenchRun:
    """Score every iteration of a run (iteration id -> replies)."""
    if not iterations:
        raise EqBenchInputError("no iterations to score")
    return EqBenchRun({it: score_responses(replies, questions) for it, replies in iterations.items()})


def _replies(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(t, str) for t in value.values()):
        raise EqBenchInputError(f"{where}: expected a JSON object mapping question id to reply text")
    return value


def load_responses(path: str | Path) -> dict[str, dict[str, str]]:
    """Read replies by iteration: a harness results file (raw_results -> iteration -> raw_inference)
    or a plain {question id: reply text} map, which counts as iteration "1"."""
    raw = _read_json(path)
    if isinstance(raw, dict) and "raw_results" in raw:
        runs = raw["raw_results"]
        if not isinstance(runs, dict) or not runs:
            raise EqBenchInputError(f"{path}: 'raw_results' holds no iterations")
        iterations = {}
        for it, run in runs.items():
            if not isinstance(run, dict) or "raw_inference" not in run:
                raise EqBenchInputError(f"{path}: raw_results -> {it} has no 'raw_inference'")
            iterations[it] = _replies(run["raw_inference"], f"{path}: raw_results -> {it} -> raw_inference")
        return iterations
    if isinstance(raw, dict) and raw and all(isinstance(t, str) for t in raw.values()):
        return {"1": raw}
    raise EqBenchInputError(
        f"{path}: expected an EQ-Bench results file (with 'raw_results') "
        "or a JSON object mapping question id to reply text"
    )


def _summary(result: EqBenchResult) -> dict[str, object]:
    return {
        "score": result.score,
        "first_pass_score": result.first_pass_score,
        "revised_score": result.revised_score,
        "chosen_pass": result.chosen_pass,
        "parseable": result.parseable,
        "first_pass_parseable": result.first_pass_parseable,
        "revised_parseable": result.revised_parseable,
        "n_questions": result.n_questions,
        "unparseable_ids": list(result.unparseable_ids),
        "missing_ids": list(result.missing_ids),
    }


def _report(run: EqBenchRun) -> dict[str, object]:
    """Run-level numbers first (means over iterations), then each iteration in full."""
    any_result = next(iter(run.iterations.values()))
    return {
        "score": run.score,
        "first_pass_score": run.first_pass_score,
        "revised_score": run.revised_score,
        "parseable": run.parseable,
        "n_questions": any_result.n_questions,
        "n_iterations": len(run.iterations),
        "unparseable_ids": {it: list(r.unparseable_ids) for it, r in run.iterations.items()},
        "iterations": {it: _summary(r) for it, r in run.iterations.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m moei_lightning.eval.eqbench",
        description="Score EQ-Bench v2 replies as the reference harness does and print the result as JSON.",
    )
    parser.add_argument(
        "responses",
        help="an EQ-Bench harness results file (raw_results -> iteration -> raw_inference) "
        "or a JSON object mapping question id to the model's reply",
    )
    parser.add_argument("--questions", required=True, help="the v2 question file, e.g. eq_bench_v2_questions_171.json")
    args = parser.parse_args(argv)
    try:
        iterations, questions = load_responses(args.responses), load_questions(args.questions)
    except (OSError, EqBenchInputError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    try:
        run = score_run(iterations, questions)
    except EqBenchInputError as e:
        parser.exit(2, f"{parser.prog}: error: {args.responses}: {e}\n")
    json.dump(_report(run), sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
