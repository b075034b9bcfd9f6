"""EQ-Bench: ask and score a model exactly as the reference harness (EQ-bench/EQ-Bench) does.

The scores must be comparable with published EQ-Bench numbers, so every rule follows the harness
whose recorded runs are the conformance vectors (tests/test_eqbench.py; docs/evaluation.md).

- **Modes.** ``no_revise`` (the harness's default since v2.1) asks for one set of ``Emotion: N``
  lines: the question's revise instructions are cut out and ``Your answer:`` is appended, as the
  harness's ``remove_revision_instructions`` does. ``revise`` sends the question as written: a first
  pass, a critique and revised scores under the headings ``First pass scores:`` and
  ``Revised scores:``. v1 questions are always asked in revise form, as in the harness.
- **Version.** As in the harness, a file of 60 questions is v1 (the official
  ``eq_bench_v1_questions_60.json`` carries ``reference_answer_fullscale`` too) and any other is v2;
  a file without ``reference_answer_fullscale`` can only be v1.
- **Parsing.** Answers are ``Name: <int>`` pairs: one word, matched case-sensitively, a colon,
  whitespace, then digits (``**Name:** 5`` or ``Name:5`` is no answer). A later pair with the same
  name overrides an earlier one. In revise mode the first pass is the text between the two headings
  and the revision the text after ``Revised scores:``. In no-revise mode a reply laid out with both
  headings anyway is read the same way (as the harness that recorded the shared runs did); any
  other reply is read whole as the first pass.
- **Validity.** The harness keeps a reply when the passes its mode asks for name exactly the
  reference's four emotions with intensities that do not sum to 0 (its v1 check, applied whatever the
  version); in revise mode, once the attempts run out, it keeps a reply of which one pass does. It
  stores no reply for a question otherwise, so such a question counts for neither pass. A kept reply
  is then scored pass by pass: v2 counts (calls *parseable*) every pass naming the four emotions,
  all-zero intensities included (the harness's v2 score has no sum check); v1 keeps the sum check.
- **Question score.** v2: per emotion d = |answer - reference| against the full-scale reference;
  the penalty is 0 for d = 0, 6.5 / (1 + e^(-1.2 (d - 4))) for 0 < d < 5, and d itself for d >= 5
  (the recorded runs were scored with ``d < 5``; later harness versions moved d = 5 onto the curve,
  0.005 less). Question score = 10 - 0.7477 * (sum of the penalties). v1: the answers are rescaled
  to sum to 10 and the score is 10 - sum |answer - reference| against the v1 reference.
- **Benchmark score.** A pass scores 10 * the mean question score over its parseable questions (0
  if none). The revision is the final score when it scores at least the first pass and has at least
  0.95 times as many parseable questions; otherwise the first pass is. Iterations are scored apart
  and averaged; the score and the parseable count are rounded to 2 decimals. A run with fewer than
  83.33 % of its questions parseable has *failed*: the harness records no score for it.
- **Generation.** The harness wraps each prompt in an instruction template with a system message:
  "Answer the questions." in its Llama-2 template, "You are an expert in emotional analysis." in the
  others (:func:`system_message`; the evaluation wraps with the tokenizer's chat template). It allows
  60 new tokens without the revise step and 600 with it (:func:`default_max_new_tokens`), and samples at the
  attempt's temperature with the model's other sampling settings left as they are.
- **Retries.** The harness asks an unparseable question again, up to 3 attempts, at temperature
  0.01, then 0.16, then 0.31. It takes the first reply whose passes all parse; in revise mode it
  otherwise keeps the first reply of which one pass parsed. :func:`accepted` and :func:`partial`
  say which; :func:`ask` runs the loop.
- **Suite.** :class:`EqBench` is the ``eqbench`` suite of the ``test`` evaluation; the module is also a
  command that rescores replies from any engine (``python -m moei_lightning.eval.eqbench``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moei_lightning.data import DataError
from moei_lightning.eval.harness import Harness, chat_prompt
from moei_lightning.eval.report import Report, Table
from moei_lightning.eval.suite import Row, Settings, Source, Suite, require_file

Mode = Literal["revise", "no_revise"]
Version = Literal["v1", "v2"]
MODES: tuple[str, ...] = ("revise", "no_revise")
DEFAULT_MODE: Mode = "no_revise"
MAX_ATTEMPTS = 3
FIRST_TEMPERATURE = 0.01
TEMPERATURE_STEP = 0.15
MIN_PARSEABLE_FRACTION = 0.8333

_FIRST_PASS = re.compile(r"First pass scores:(.*?)Revised scores:", re.DOTALL)
_REVISED = re.compile(r"Revised scores:(.*)", re.DOTALL)
_ANSWER = re.compile(r"(\w+):\s+(\d+)")

_N_EMOTIONS = 4
_ADJUST = 0.7477  # chosen by the benchmark so that random answers score about zero
_REVISION_MIN_PARSEABLE = 0.95
V1_QUESTION_COUNT = 60  # the harness tells v1 from v2 by the number of questions in the file

# The no-revise prompt: the harness's edit of the revise prompt (English questions).
_REVISE_SENTENCE = " Then critique your answer by thinking it through step by step. Finally, give your revised scores."
_FIRST_PASS_HEADING = "First pass scores:\n"
_CRITIQUE = "Critique: <your critique here>"
_END_OF_ANSWER = "[End of answer]"
_ANSWER_CUE = "\nYour answer:\n"


SYSTEM_MESSAGES: tuple[str, ...] = ("harness", "none")
LLAMA2_SYSTEM_MESSAGE = "Answer the questions."  # the context of the Llama-2 instruction template it uses
SYSTEM_MESSAGE = "You are an expert in emotional analysis."  # its default for every other template
SAMPLINGS: tuple[str, ...] = ("harness", "plain")
_MAX_NEW_TOKENS: dict[str, int] = {"no_revise": 60, "revise": 600}


class EqBenchInputError(ValueError):
    """A questions or responses file that cannot be used as given."""


@dataclass(frozen=True)
class Question:
    """One EQ-Bench question: its revise-form prompt and reference intensities.

    ``reference`` is the v2 full-scale reference (0-10 per emotion), ``reference_v1`` the legacy
    v1 reference (intensities summing to 10); a v1 question file has only the latter.
    """

    id: str
    prompt: str
    reference: dict[str, int] | None
    reference_v1: dict[str, float] | None = None

    @property
    def emotions(self) -> set[str]:
        return set(self.reference if self.reference is not None else self.reference_v1 or {})


@dataclass(frozen=True)
class QuestionScore:
    """Scores of both passes of one reply; None where that pass is unparseable or there is no reply."""

    first_pass: float | None
    revised: float | None


@dataclass(frozen=True)
class EqBenchResult:
    """One iteration scored; ``parseable`` and ``unparseable_ids`` belong to the chosen pass."""

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
    mode: Mode = DEFAULT_MODE
    version: Version = "v2"

    @property
    def failed(self) -> bool:
        """Whether the harness would mark the run failed: under 83.33 % of the questions parseable."""
        return self.parseable / self.n_questions < MIN_PARSEABLE_FRACTION

    @property
    def benchmark_score(self) -> float:
        """The score as the harness reports it: rounded to 2 decimals."""
        return round(self.score, 2)


@dataclass(frozen=True)
class EqBenchRun:
    """Several iterations of one model, averaged and rounded the way the harness does."""

    iterations: dict[str, EqBenchResult]

    @property
    def score(self) -> float:
        return round(_mean([r.score for r in self.iterations.values()]), 2)

    @property
    def parseable(self) -> float:
        return round(_mean([r.parseable for r in self.iterations.values()]), 2)

    @property
    def first_pass_score(self) -> float:
        return round(_mean([r.first_pass_score for r in self.iterations.values()]), 2)

    @property
    def revised_score(self) -> float:
        return round(_mean([r.revised_score for r in self.iterations.values()]), 2)

    @property
    def n_questions(self) -> int:
        return next(iter(self.iterations.values())).n_questions

    @property
    def failed(self) -> bool:
        return self.parseable / self.n_questions < MIN_PARSEABLE_FRACTION


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _read_json(path: str | Path) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise EqBenchInputError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from e


def _intensity(value: object, where: str, upper: float = 10) -> float:
    """Reference intensities are stored as numbers and as digit strings; both mean the same."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = math.nan
    else:
        number = math.nan
    if not 0 <= number <= upper:
        raise EqBenchInputError(f"{where}: intensity {value!r} is not a number from 0 to {upper:g}")
    return int(number) if float(number).is_integer() else float(number)


def _reference(ref: object, where: str, key: str) -> dict:
    if not isinstance(ref, dict):
        raise EqBenchInputError(f"{where}: '{key}' must be an object with emotion1..4 and their scores")
    reference: dict = {}
    for i in range(1, _N_EMOTIONS + 1):
        name = ref.get(f"emotion{i}")
        if not isinstance(name, str) or not name:
            raise EqBenchInputError(f"{where}: {key} lacks emotion{i}")
        if name in reference:
            raise EqBenchInputError(f"{where}: emotion {name!r} appears twice in {key}")
        reference[name] = _intensity(ref.get(f"emotion{i}_score"), f"{where}: emotion{i}_score")
    return reference


def load_questions(path: str | Path) -> dict[str, Question]:
    """Read a question file: v2 (``reference_answer_fullscale``, 171 questions) or v1 (``reference_answer`` only)."""
    raw = _read_json(path)
    if not isinstance(raw, dict) or not raw:
        raise EqBenchInputError(
            f"{path}: expected a JSON object mapping question id to question, e.g. eq_bench_v2_questions_171.json"
        )
    questions = {}
    for qid, entry in raw.items():
        where = f"{path}: question {qid}"
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise EqBenchInputError(f"{where}: needs a string 'prompt'; is this an EQ-Bench question file?")
        if "reference_answer_fullscale" not in entry and "reference_answer" not in entry:
            raise EqBenchInputError(f"{where}: needs 'reference_answer_fullscale' (v2) or 'reference_answer' (v1)")
        full = entry.get("reference_answer_fullscale")
        legacy = entry.get("reference_answer")
        questions[qid] = Question(
            id=qid,
            prompt=entry["prompt"],
            reference=None if full is None else _reference(full, where, "reference_answer_fullscale"),
            reference_v1=None if legacy is None else _reference(legacy, where, "reference_answer"),
        )
    kinds = {q.reference is None for q in questions.values()}
    if len(kinds) > 1:
        raise EqBenchInputError(f"{path}: some questions have 'reference_answer_fullscale' and some do not")
    return questions


def questions_version(questions: Mapping[str, Question]) -> Version:
    """The version of a whole question file, told apart as the harness does: 60 questions are v1.

    The official v1 file carries ``reference_answer_fullscale`` too, so the count decides; a file
    without the full-scale reference cannot be scored as v2 at all. Call it on the whole file, not on
    a subset: the first 60 questions of the v2 file are still v2.
    """
    if len(questions) == V1_QUESTION_COUNT or any(q.reference is None for q in questions.values()):
        return "v1"
    return "v2"


def question_prompt(question: Question, mode: Mode, version: Version = "v2") -> str:
    """The text the harness sends for ``question`` in ``mode`` (wrapped in a chat template by the caller)."""
    _check_mode(mode)
    if mode == "revise" or version == "v1":  # v1 is always asked in revise form
        return question.prompt
    prompt = question.prompt.replace(_REVISE_SENTENCE, "").replace(_FIRST_PASS_HEADING, "")
    prompt = prompt[: prompt.find(_CRITIQUE)] + "\n" + prompt[prompt.find(_END_OF_ANSWER) :]
    return prompt + _ANSWER_CUE


def question_prompts(
    questions: Mapping[str, Question], mode: Mode = DEFAULT_MODE, version: Version | None = None
) -> dict[str, str]:
    """Every question's prompt in ``mode``, by id; the version is the file's unless given."""
    version = version or questions_version(questions)
    return {qid: question_prompt(q, mode, version) for qid, q in questions.items()}


def _answers(section: str) -> dict[str, int]:
    return {name: int(value) for name, value in _ANSWER.findall(section)}


def parse_answers(text: str, mode: Mode = "revise") -> tuple[dict[str, int], dict[str, int]]:
    """Split a reply into (first pass, revised) emotion intensities; a missing section gives {}."""
    _check_mode(mode)
    first = _FIRST_PASS.search(text)
    if mode == "no_revise" and not first:
        return _answers(text), {}
    revised = _REVISED.search(text)
    return (
        _answers(first.group(1)) if first else {},
        _answers(revised.group(1)) if revised else {},
    )


def _penalty(difference: float) -> float:
    """Small misses cost little (S-curve), misses of 5 or more cost their full size."""
    if difference == 0:
        return 0.0
    if difference < 5:
        return 6.5 / (1 + math.exp(-1.2 * (difference - 4)))
    return float(difference)


def _names_the_emotions(answers: Mapping[str, int], question: Question) -> bool:
    return len(answers) == _N_EMOTIONS and set(answers) == question.emotions


def _passes_v1_check(answers: Mapping[str, int], question: Question) -> bool:
    """The harness's test of whether a pass parsed (its v1 score exists), used to keep or retry a reply."""
    return _names_the_emotions(answers, question) and sum(answers.values()) > 0


def score_question(answers: Mapping[str, int], question: Question, version: Version = "v2") -> float | None:
    """Score one pass of one question (10 is perfect); None unless it names exactly the reference's
    four emotions. v1 also needs intensities that do not sum to 0 (it rescales them to sum to 10);
    v2 scores all-zero intensities like any others, as the harness does."""
    if not _names_the_emotions(answers, question):
        return None
    if version == "v2":
        if question.reference is None:
            raise EqBenchInputError(f"question {question.id}: no full-scale reference, so it cannot be scored as v2")
        penalties = sum(_penalty(abs(answers[name] - ref)) for name, ref in question.reference.items())
        return 10 - _ADJUST * penalties
    if question.reference_v1 is None:
        raise EqBenchInputError(f"question {question.id}: no v1 reference ('reference_answer')")
    total = sum(answers.values())
    if total <= 0:
        return None
    return 10 - sum(abs(answers[name] / total * 10 - ref) for name, ref in question.reference_v1.items())


def _accepted(first: Mapping[str, int], revised: Mapping[str, int], question: Question, mode: Mode) -> bool:
    return _passes_v1_check(first, question) and (mode == "no_revise" or _passes_v1_check(revised, question))


def _partial(first: Mapping[str, int], revised: Mapping[str, int], question: Question, mode: Mode) -> bool:
    return mode == "revise" and (_passes_v1_check(first, question) or _passes_v1_check(revised, question))


def accepted(text: str, question: Question, mode: Mode) -> bool:
    """Whether the harness takes this reply without asking again: every pass the mode asks for passes
    its v1 check (the four emotions, intensities not summing to 0), whatever the version."""
    return _accepted(*parse_answers(text, mode), question, mode)


def partial(text: str, question: Question, mode: Mode) -> bool:
    """Whether a revise-mode reply is kept once the attempts run out: one of its passes passes the v1 check."""
    return _partial(*parse_answers(text, mode), question, mode)


def _pass_scores(
    first: Mapping[str, int], revised: Mapping[str, int], question: Question, mode: Mode, version: Version
) -> QuestionScore:
    """Both passes scored, if the harness would have kept the reply at all; else neither counts."""
    if not (_accepted(first, revised, question, mode) or _partial(first, revised, question, mode)):
        return QuestionScore(first_pass=None, revised=None)
    return QuestionScore(score_question(first, question, version), score_question(revised, question, version))


def attempt_temperatures(attempts: int = MAX_ATTEMPTS) -> list[float]:
    """The sampling temperature of each attempt: 0.01, then 0.15 more per retry."""
    return [round(FIRST_TEMPERATURE + TEMPERATURE_STEP * i, 10) for i in range(attempts)]


def _pass_score(scores: list[float | None]) -> tuple[float, int]:
    parsed = [s for s in scores if s is not None]
    return (10 * _mean(parsed) if parsed else 0.0), len(parsed)


def score_responses(
    responses: Mapping[str, str],
    questions: Mapping[str, Question],
    mode: Mode = DEFAULT_MODE,
    version: Version | None = None,
) -> EqBenchResult:
    """Score one iteration of replies (question id -> reply text) against the questions."""
    _check_mode(mode)
    return score_parsed({qid: parse_answers(text, mode) for qid, text in responses.items()}, questions, mode, version)


def score_parsed(
    answers: Mapping[str, tuple[Mapping[str, int], Mapping[str, int]]],
    questions: Mapping[str, Question],
    mode: Mode = DEFAULT_MODE,
    version: Version | None = None,
) -> EqBenchResult:
    """Score one iteration of parsed replies (question id -> (first pass, revised) intensities, as
    :func:`parse_answers` gives them or the harness stores them as ``respondent_answers``)."""
    _check_mode(mode)
    version = version or questions_version(questions)
    unknown = [qid for qid in answers if qid not in questions]
    if unknown:
        raise EqBenchInputError(
            f"replies for {len(unknown)} question id(s) not in the question file, e.g. {unknown[:5]}; "
            "score them against the question file the model was asked"
        )
    per_question = {
        qid: _pass_scores(*answers[qid], question, mode, version)
        if qid in answers
        else QuestionScore(first_pass=None, revised=None)
        for qid, question in questions.items()
    }
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
        missing_ids=tuple(qid for qid in questions if qid not in answers),
        per_question=per_question,
        mode=mode,
        version=version,
    )


def score_run(
    iterations: Mapping[str, Mapping[str, str]],
    questions: Mapping[str, Question],
    mode: Mode = DEFAULT_MODE,
    version: Version | None = None,
) -> EqBenchRun:
    """Score every iteration of a run (iteration id -> replies)."""
    if not iterations:
        raise EqBenchInputError("no iterations to score")
    return EqBenchRun({it: score_responses(replies, questions, mode, version) for it, replies in iterations.items()})


@dataclass(frozen=True)
class Responses:
    """Replies by iteration, with the mode and version the file says it was asked in (None: not said)."""

    iterations: dict[str, dict[str, str]]
    mode: Mode | None = None
    version: Version | None = None


def _replies(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(t, str) for t in value.values()):
        raise EqBenchInputError(f"{where}: expected a JSON object mapping question id to reply text")
    return value


def read_responses(path: str | Path) -> Responses:
    """Read a harness results file (raw_results -> iteration -> raw_inference), a file written by
    this project's evaluation (the same, plus ``revise``), or a plain {question id: reply} map."""
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
        revise = raw.get("revise")
        version = raw.get("eqbench_version")
        return Responses(
            iterations,
            mode=None if not isinstance(revise, bool) else ("revise" if revise else "no_revise"),
            version=version if version in ("v1", "v2") else None,
        )
    if isinstance(raw, dict) and raw and all(isinstance(t, str) for t in raw.values()):
        return Responses({"1": raw})
    raise EqBenchInputError(
        f"{path}: expected an EQ-Bench results file (with 'raw_results') "
        "or a JSON object mapping question id to reply text"
    )


def load_responses(path: str | Path) -> dict[str, dict[str, str]]:
    """Replies by iteration, from any file :func:`read_responses` reads."""
    return read_responses(path).iterations


def detect_mode(iterations: Mapping[str, Mapping[str, str]]) -> Mode:
    """The mode replies were asked in, read from the replies themselves.

    Asked in revise form, a model lays out its reply under both headings; asked without, it does so
    rarely (3 of 170 replies in the shared Qwen-7B-Chat run). So: revise when most replies do.
    """
    replies = [text for run in iterations.values() for text in run.values()]
    laid_out = sum(bool(_FIRST_PASS.search(text)) for text in replies)
    return "revise" if replies and laid_out * 2 > len(replies) else "no_revise"


def results_file(
    replies: Mapping[str, str], mode: Mode, version: Version, attempts: Mapping[str, int] | None = None
) -> dict[str, object]:
    """Replies in the harness's results layout, with the mode stated, so the CLI rescoring needs no guess."""
    iteration: dict[str, object] = {"raw_inference": dict(replies)}
    if attempts is not None:
        iteration["attempts"] = dict(attempts)
    return {"eqbench_version": version, "revise": mode == "revise", "raw_results": {"1": iteration}}


def system_message(choice: str, chat_template: str | None) -> str | None:
    """The system message sent with every question: ``harness`` picks the harness's for this chat
    template (a Llama-2 template, recognised by its ``<<SYS>>`` block, gets "Answer the questions.");
    ``none`` sends none."""
    if choice not in SYSTEM_MESSAGES:
        raise EqBenchInputError(f"EQ-Bench system message {choice!r} is not one of {list(SYSTEM_MESSAGES)}")
    if choice == "none":
        return None
    return LLAMA2_SYSTEM_MESSAGE if chat_template and "<<SYS>>" in chat_template else SYSTEM_MESSAGE


def default_max_new_tokens(mode: Mode) -> int:
    """The harness's reply length: 60 tokens for one set of scores, 600 for first pass, critique and revision."""
    _check_mode(mode)
    return _MAX_NEW_TOKENS[mode]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise EqBenchInputError(f"EQ-Bench mode {mode!r} is not one of {list(MODES)}")


def _summary(result: EqBenchResult) -> dict[str, object]:
    return {
        "score": result.benchmark_score,
        "first_pass_score": round(result.first_pass_score, 2),
        "revised_score": round(result.revised_score, 2),
        "chosen_pass": result.chosen_pass,
        "parseable": result.parseable,
        "first_pass_parseable": result.first_pass_parseable,
        "revised_parseable": result.revised_parseable,
        "n_questions": result.n_questions,
        "failed": result.failed,
        "unparseable_ids": list(result.unparseable_ids),
        "missing_ids": list(result.missing_ids),
    }


def _report(run: EqBenchRun, mode: Mode, mode_source: str, version: Version) -> dict[str, object]:
    """Run-level numbers first (means over iterations, rounded as the harness rounds), then each iteration."""
    return {
        "score": run.score,
        "parseable": run.parseable,
        "n_questions": run.n_questions,
        "failed": run.failed,
        "mode": mode,
        "mode_source": mode_source,
        "version": version,
        "first_pass_score": run.first_pass_score,
        "revised_score": run.revised_score,
        "n_iterations": len(run.iterations),
        "unparseable_ids": {it: list(r.unparseable_ids) for it, r in run.iterations.items()},
        "iterations": {it: _summary(r) for it, r in run.iterations.items()},
    }


@dataclass(frozen=True)
class EqBenchQuestions:
    """The EQ-Bench questions to ask; ``available`` counts the file's questions before any cap, and
    ``version`` is the whole file's (a cap to 60 questions must not turn v2 into v1)."""

    path: str
    questions: dict[str, Question]
    available: int
    version: Version = "v2"


@dataclass
class EqBenchOutcome:
    """The questions asked, the kept reply by question id, how many attempts each took, and the score."""

    questions: EqBenchQuestions
    replies: dict[str, str]
    result: EqBenchResult
    attempts: dict[str, int] = field(default_factory=dict)


def eqbench_questions(path: str, limit: int | None) -> EqBenchQuestions:
    """The questions in file order, the first ``limit`` of them when a limit is set."""
    require_file(path, "eval.eqbench_questions")
    try:
        questions = load_questions(path)
    except EqBenchInputError as err:
        raise DataError(f"{err} (file from config key eval.eqbench_questions)") from err
    kept = dict(list(questions.items())[:limit]) if limit is not None else questions
    return EqBenchQuestions(
        path=str(path), questions=kept, available=len(questions), version=questions_version(questions)
    )


def ask(
    harness: Harness,
    questions: EqBenchQuestions,
    max_new_tokens: int | None = None,
    mode: Mode = DEFAULT_MODE,
    system: str = "harness",
    sampling: str = "harness",
) -> EqBenchOutcome:
    """Ask every question through the chat template as the reference harness does, then score the replies.

    ``max_new_tokens`` None is the harness's reply length for ``mode``; ``system`` and ``sampling`` are
    ``harness`` or their named alternatives (``none``: no system message; ``plain``: no top-k or top-p cut).

    Attempt 1 samples every question at temperature 0.01; each later attempt (up to 3) asks the
    questions whose reply did not parse again, 0.15 hotter. A question keeps its first parsing reply,
    else (revise mode) its first reply of which one pass parsed, else its last reply. Every rank sees
    every reply, so all ranks agree on which questions are asked again.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"EQ-Bench sampling {sampling!r} is not one of {list(SAMPLINGS)}")
    asked, version = questions.questions, questions.version
    new_tokens = default_max_new_tokens(mode) if max_new_tokens is None else max_new_tokens
    message = system_message(system, getattr(harness.tokenizer, "chat_template", None))
    prompts = {
        qid: chat_prompt(harness.tokenizer, question_prompt(q, mode, version), message) for qid, q in asked.items()
    }
    replies: dict[str, str] = {}  # the latest reply of each question
    kept: dict[str, str] = {}  # the reply that parsed
    partials: dict[str, str] = {}  # revise mode: the first reply of which one pass parsed
    attempts: dict[str, int] = {}
    pending = list(asked)
    for attempt, temperature in enumerate(attempt_temperatures(), start=1):
        if not pending:
            break
        texts = harness.runner.generate([prompts[qid] for qid in pending], new_tokens, temperature, sampling == "plain")
        retry = []
        for qid, text in zip(pending, texts):
            replies[qid], attempts[qid] = text, attempt
            if accepted(text, asked[qid], mode):
                kept[qid] = text
                continue
            if partial(text, asked[qid], mode):
                partials.setdefault(qid, text)
            retry.append(qid)
        pending = retry
    final = {qid: kept.get(qid, partials.get(qid, replies[qid])) for qid in asked}
    return EqBenchOutcome(questions, final, score_responses(final, asked, mode, version), attempts)


class EqBench(Suite):
    """The ``eqbench`` suite: the questions of ``eval.eqbench_questions`` asked and scored as the reference
    harness does (``eval.eqbench_mode``, ``eval.eqbench_max_new_tokens``, ``eval.eqbench_system_message``,
    ``eval.eqbench_sampling``); the report gives its 0-100 score and parseable count."""

    name = "eqbench"

    @classmethod
    def check(cls, settings: Settings) -> None:
        for key, choices in (
            ("eqbench_mode", MODES),
            ("eqbench_system_message", SYSTEM_MESSAGES),
            ("eqbench_sampling", SAMPLINGS),
        ):
            if getattr(settings, key) not in choices:
                raise DataError(f"config key eval.{key}: {getattr(settings, key)!r} is not one of {list(choices)}")

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.require("eqbench_questions")

    def load(self, source: Source, loaded: Mapping[str, Any]) -> EqBenchQuestions:
        return eqbench_questions(self.settings.eqbench_questions, self.settings.limit)

    def count(self, items: EqBenchQuestions) -> int:
        return len(items.questions)

    def run(self, harness: Harness, items: EqBenchQuestions, done: Mapping[str, Any]) -> EqBenchOutcome:
        s = self.settings
        mode = s.eqbench_mode
        return ask(harness, items, s.eqbench_max_new_tokens, mode, s.eqbench_system_message, s.eqbench_sampling)

    def report(self, outcome: EqBenchOutcome, rows: list[Row], report: Report) -> None:
        result, asked, available = outcome.result, outcome.result.n_questions, outcome.questions.available
        name = f"EQ-Bench {result.version}"
        coverage = (
            f"first {asked} of {available} questions (eval.limit)" if asked < available else f"all {asked} questions"
        )
        mode = result.mode.replace("_", "-")
        parse_note = f"{result.parseable} of {asked} parseable ({result.chosen_pass.replace('_', ' ')}, {mode} mode)"
        failed = " FAILED: under 83.33% parseable, the reference harness records no score" if result.failed else ""
        score = None if result.failed else result.benchmark_score
        report.add(name, "score", score, asked, f"{parse_note}; {coverage}{failed}")
        report.add(name, "parseable", result.parseable, asked, parse_note)
        unparseable = list(result.unparseable_ids)
        shown = ", ".join(unparseable[:30]) + (f", ... ({len(unparseable)} in all)" if len(unparseable) > 30 else "")
        retried = sum(n > 1 for n in outcome.attempts.values())
        report.tables["eqbench"] = Table(
            name,
            ["measure", "value"],
            [
                ["score", result.benchmark_score],
                ["failed (under 83.33% parseable)", "yes" if result.failed else "no"],
                ["mode", mode],
                ["first pass score", round(result.first_pass_score, 2)],
                ["revised score", round(result.revised_score, 2)],
                ["chosen pass", result.chosen_pass],
                ["parseable (chosen pass)", f"{result.parseable} of {asked}"],
                ["parseable (first pass)", f"{result.first_pass_parseable} of {asked}"],
                ["parseable (revised)", f"{result.revised_parseable} of {asked}"],
                ["questions asked again (up to 3 attempts)", retried],
                ["questions asked", f"{coverage} in {outcome.questions.path}"],
                ["unparseable question ids", shown or "none"],
            ],
            note="Replies sampled at temperature 0.01 through the chat template (unparseable ones asked again, "
            "0.15 hotter, up to 3 attempts), scored as the reference harness does (docs/evaluation.md).",
        )
        if result.parseable < asked:
            report.notes.append(
                f"{name}: {asked - result.parseable} of {asked} replies could not be parsed and score nothing"
                + (" (with none parseable the benchmark score is 0)" if result.parseable == 0 else "")
                + "; the replies are in eqbench_replies.json, and "
                "`python -m moei_lightning.eval.eqbench eqbench_replies.json --questions ...` rescores them."
            )

    def outputs(self, outcome: EqBenchOutcome) -> dict[str, Any]:
        mode, version = outcome.result.mode, outcome.questions.version
        return {"eqbench_replies.json": results_file(outcome.replies, mode, version, outcome.attempts)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m moei_lightning.eval.eqbench",
        description="Score EQ-Bench replies as the reference harness does and print the result as JSON. "
        'A run with under 83.33%% of its questions parseable is reported with "failed": true.',
    )
    parser.add_argument(
        "responses",
        help="an EQ-Bench harness results file (raw_results -> iteration -> raw_inference), the "
        "eqbench_replies.json of an evaluation run, or a JSON object mapping question id to reply",
    )
    parser.add_argument(
        "--questions", required=True, help="the question file, e.g. eq_bench_v2_questions_171.json (v1: 60 questions)"
    )
    parser.add_argument(
        "--mode",
        choices=["auto", *MODES],
        default="auto",
        help="how the questions were asked; auto: as the file says, else revise when most replies carry "
        "both 'First pass scores:' and 'Revised scores:' (default: auto)",
    )
    args = parser.parse_args(argv)
    try:
        responses, questions = read_responses(args.responses), load_questions(args.questions)
    except (OSError, EqBenchInputError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    version = questions_version(questions)
    if responses.version is not None and responses.version != version:
        parser.exit(
            2,
            f"{parser.prog}: error: {args.responses} holds an EQ-Bench {responses.version} run but "
            f"{args.questions} is a {version} question file; pass the question file the run was asked\n",
        )
    if args.mode != "auto":
        mode, source = args.mode, "--mode"
    elif responses.mode is not None:
        mode, source = responses.mode, "file"
    else:
        mode, source = detect_mode(responses.iterations), "replies"
    try:
        run = score_run(responses.iterations, questions, mode, version)
    except EqBenchInputError as e:
        parser.exit(2, f"{parser.prog}: error: {args.responses}: {e}\n")
    json.dump(_report(run, mode, source, version), sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
