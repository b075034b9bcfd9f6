"""EmoBench (Sabour et al. 2024), asked and scored by the protocol of its reference code (Sahandfer/EmoBench).

- **Items.** One item per line: an EU (emotional understanding) scenario asks two questions at once,
  which emotion the subject feels and why, and an EA (emotional application) scenario one, the most
  effective action or response. Neither question names the answer of the other.
- **Protocol ``generate``** (the default, as published): the reference's system prompt (task
  instructions and the JSON answer format) and user prompt (scenario, questions, choices lettered
  ``A) ...``), through the chat template; the reply is parsed as the reference parses it: the JSON
  inside a ```json fence, else the whole reply as JSON; ``answer_q1``/``answer_q2`` (EU) or ``answer``
  (EA) must equal the gold letter. A reply that does not parse answers nothing, which is wrong.
- **Protocol ``loglikelihood``** (a named option, not the published protocol): each question is a
  multiple-choice record scored by log-likelihood (``acc`` and ``acc_norm``, the latter primary), the
  EU questions asked apart, the cause question without naming any emotion.
- **Scoring.** An EU scenario is right only when both its answers are; accuracy per language, per
  category (EU: coarse category; EA: category) and over the language (``Overall``), as the
  reference reports it; languages are never pooled. Percent here, where the reference prints 0-1.
- **Suite.** :class:`EmoBench` is the ``emobench`` suite of the ``test`` evaluation.

Every line that cannot be read is an error naming file:line.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moei_lightning.data import DataError
from moei_lightning.eval.harness import Harness, chat_prompt
from moei_lightning.eval.report import Report, Table
from moei_lightning.eval.scorer import CHOICE_NOTE
from moei_lightning.eval.suite import (
    CHOICE_METRICS,
    ChoiceItem,
    Row,
    Settings,
    Source,
    Suite,
    from_choice_item,
    limit_items,
    primary_metric,
)

SUITE = "emobench"
LANGUAGES = ("en", "zh")
TASKS = ("EU", "EA")
PROTOCOLS = ("generate", "loglikelihood")
DEFAULT_PROTOCOL = "generate"
MAX_NEW_TOKENS = 50  # the reference's generation length for Hugging Face models without chain of thought
OVERALL = "Overall"
LETTERS = string.ascii_uppercase

# The reference's prompts (src/configs/prompts.yaml, response.yaml at commit 3b4f843), as rendered. Each
# user prompt is a YAML block ending in a line break, except EU zh: the file's last block has none.
_SYSTEM = {
    "en": "# Instructions\n\nIn this task, you are presented with a scenario, a question, and multiple choices. \n"
    "Carefully analyze the scenario and take the perspective of the individual involved.\n"
    "Then, select the option that best reflects their perspective or emotional response.\n\n# Output\n",
    "zh": "# 说明\n在这个任务中，你会面临一个场景、一个问题和多个选项。\n仔细分析场景，并从相关人员的角度进行思考。\n"
    "然后，选择最能反映他们的观点或情绪反应的选项。\n\n# 输出\n",
}
_STATEMENT = {
    "en": "Provide only one single correct answer to this question.  Do not provide any additional information "
    "or explanations. The response should be in the following JSON format:\n",
    "zh": "只提供一个正确的答案。 不要提供任何额外的信息或解释。 回复应采用以下JSON格式：\n",
}
_CONDITIONS = {
    ("EU", "en"): '"answer_q1": "<Respond to the Question 1 with the corresponding letter numbering>",\n'
    '"answer_q2": "<Respond to the Question 2 with the corresponding letter numbering>"\n',
    ("EU", "zh"): '"answer_q1": "<用相应的字母进行回答问题1>",\n"answer_q2": "<用相应的字母进行回答问题2>"\n',
    ("EA", "en"): '"answer": "<Respond with the corresponding letter numbering>"\n',
    ("EA", "zh"): '"answer": "<用相应的字母进行回答>"\n',
}
_FORMAT = "\n{statement}\n```json\n    {{\n    {conditions}\n    }}\n``` \n    "
_USER = {
    ("EU", "en"): "## Scenario\n{scenario}\n\n## Question 1\nWhat emotion(s) would {subject} ultimately feel in this "
    "situation?\n\n## Choices for Question 1\n{emo_choices}\n\n## Question 2\nWhy would {subject} feel these "
    "emotions in this situation?\n\n## Choices for Question 2\n{cause_choices}\n",
    (
        "EU",
        "zh",
    ): "## 场景\n{scenario}\n\n## 问题 1\n在这种情况下，{subject}最终会感受到什么情绪？\n\n## 问题 1 的选项\n"
    "{emo_choices}\n\n## 问题 2\n{subject}为什么会在这种情况下感受到这些情绪？\n\n## 问题 2 的选项\n{cause_choices}",
    ("EA", "en"): "## Scenario\n{scenario}\n\n## Question \nIn this scenario, what is the most effective {q_type} "
    "for {subject}?\n\n## Choices\n{choices}\n",
    (
        "EA",
        "zh",
    ): "## 场景\n{scenario}\n\n## 问题\n在这个场景中，{subject}最有效的{q_type}是什么？\n\n## 选项\n{choices}\n",
}
_ANSWER_KEYS = {"EU": ("answer_q1", "answer_q2"), "EA": ("answer",)}
_FENCE = re.compile(r"```json\s*([\s\S]*?)```", re.DOTALL)

# The log-likelihood option asks each question apart, so each needs its own wording.
_LL_INSTRUCTION = {
    "en": "Read the scenario and answer the question with the single best choice.",
    "zh": "阅读下面的情景，并选出最恰当的一个选项回答问题。",
}
_LL_QUESTIONS = {
    ("EU", "en"): (
        "What emotion(s) would {subject} ultimately feel in this situation?",
        "Why would {subject} feel these emotions in this situation?",
    ),
    ("EU", "zh"): ("在这种情况下，{subject}最终会感受到什么情绪？", "{subject}为什么会在这种情况下感受到这些情绪？"),
    ("EA", "en"): ("In this scenario, what is the most effective {q_type} for {subject}?",),
    ("EA", "zh"): ("在这个场景中，{subject}最有效的{q_type}是什么？",),
}
_LL_LAYOUT = {"en": "Scenario: {scenario}\nQuestion: {question}", "zh": "场景：{scenario}\n问题：{question}"}


@dataclass(frozen=True)
class Question:
    """One question of an item: its choices and the index of the gold one."""

    choices: tuple[str, ...]
    answer: int

    @property
    def letter(self) -> str:
        return LETTERS[self.answer]


@dataclass(frozen=True)
class EmoBenchItem:
    """One EmoBench line: ``task`` ``EU`` (two questions: emotion, cause) or ``EA`` (one)."""

    id: str
    task: str
    language: str
    category: str
    qid: str
    scenario: str
    subject: str
    questions: tuple[Question, ...]
    question_type: str = ""


@dataclass
class EmoBenchOutcome:
    """An item with the model's answer letter per question ("" for none) and, when generated, its reply.

    The ``loglikelihood`` protocol keeps the letters of each choice metric in ``by_metric`` (``acc``,
    ``acc_norm``); ``answers`` are then its primary metric's.
    """

    item: EmoBenchItem
    answers: list[str]
    reply: str | None = None
    by_metric: dict[str, list[str]] = field(default_factory=dict)

    @property
    def correct(self) -> bool:
        """Right only when every question is (EU: emotion and cause, as the reference scores it)."""
        return self.correct_by(self.answers)

    def correct_by(self, answers: Sequence[str]) -> bool:
        return all(a == q.letter for a, q in zip(answers, self.item.questions, strict=True))


class _Line:
    """One parsed JSONL line that knows where it came from, so every error names file:line."""

    def __init__(self, record: dict[str, object], where: str) -> None:
        self.record = record
        self.where = where

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.where}: {message}")

    def text(self, key: str) -> str:
        value = self.record.get(key)
        if not isinstance(value, str) or not value.strip():
            raise self.error(f"field '{key}' must be a non-empty string, got {value!r}")
        return value

    def question(self, choices_key: str, label_key: str) -> Question:
        choices = self.record.get(choices_key)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise self.error(f"field '{choices_key}' must be a list of at least two strings, got {choices!r}")
        if len(set(choices)) != len(choices):
            raise self.error(f"field '{choices_key}' repeats a choice, so its label would be ambiguous: {choices!r}")
        if len(choices) > len(LETTERS):
            raise self.error(f"field '{choices_key}' has more choices than letters A-Z")
        label = self.text(label_key)
        if label not in choices:
            raise self.error(f"'{label_key}' {label!r} is not one of '{choices_key}' {choices!r}")
        return Question(tuple(choices), choices.index(label))


def _lines(path: Path, languages: Sequence[str]) -> Iterator[_Line]:
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            line = _Line(record, where)
            language = line.text("language")
            if language not in LANGUAGES:
                raise line.error(f"language {language!r} is not one of {LANGUAGES}")
            if language in languages:
                yield line


def _item(line: _Line, task: str) -> EmoBenchItem:
    language, qid = line.text("language"), line.text("qid")
    if task == "EU":
        category = line.text("coarse_category")
        questions = (line.question("emotion_choices", "emotion_label"), line.question("cause_choices", "cause_label"))
        question_type = ""
    else:
        category = line.text("category")
        questions = (line.question("choices", "label"),)
        question_type = line.text("question type")
    return EmoBenchItem(
        id=f"{SUITE}/{task}/{language}/{qid}",
        task=task,
        language=language,
        category=category,
        qid=qid,
        scenario=line.text("scenario"),
        subject=line.text("subject"),
        questions=questions,
        question_type=question_type,
    )


def load_emobench(directory: str | Path, languages: Sequence[str] = LANGUAGES) -> list[EmoBenchItem]:
    """Every item of the given languages from EU.jsonl and EA.jsonl in ``directory``, EU first."""
    unknown = [lang for lang in languages if lang not in LANGUAGES]
    if unknown or not languages:
        raise ValueError(f"languages must be a non-empty selection of {LANGUAGES}, got {tuple(languages)}")
    directory = Path(directory)
    items: list[EmoBenchItem] = []
    seen: dict[str, str] = {}
    for task in TASKS:
        path = directory / f"{task}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: EmoBench file not found; point at the folder holding EU.jsonl and EA.jsonl"
            )
        for line in _lines(path, languages):
            item = _item(line, task)
            if item.id in seen:
                raise line.error(f"item {item.id} already came from {seen[item.id]}; qids must be unique")
            seen[item.id] = line.where
            items.append(item)
    return items


def _lettered(choices: Sequence[str]) -> str:
    return "\n".join(f"{LETTERS[i]}) {choice}" for i, choice in enumerate(choices))


def system_prompt(task: str, language: str) -> str:
    """The reference's system message: instructions, then the JSON answer format."""
    statement = _STATEMENT[language]
    return _SYSTEM[language] + _FORMAT.format(statement=statement, conditions=_CONDITIONS[(task, language)])


def user_prompt(item: EmoBenchItem) -> str:
    """The reference's user message: the scenario, the question(s) and the lettered choices."""
    template = _USER[(item.task, item.language)]
    if item.task == "EU":
        emotion, cause = item.questions
        return template.format(
            scenario=item.scenario,
            subject=item.subject,
            emo_choices=_lettered(emotion.choices),
            cause_choices=_lettered(cause.choices),
        )
    return template.format(
        scenario=item.scenario,
        subject=item.subject,
        choices=_lettered(item.questions[0].choices),
        q_type=item.question_type,
    )


def parse_reply(text: str, task: str) -> list[str]:
    """The answer letters of a reply, parsed as the reference parses it ("" where there is none)."""
    fenced = _FENCE.search(text) if "```json" in text else None
    try:
        parsed = json.loads(fenced.group(1) if fenced else text)
    except (json.JSONDecodeError, ValueError):
        parsed = None
    if not isinstance(parsed, dict):
        return [""] * len(_ANSWER_KEYS[task])
    return [value if isinstance(value := parsed.get(key, ""), str) else "" for key in _ANSWER_KEYS[task]]


def loglikelihood_questions(item: EmoBenchItem) -> list[ChoiceItem]:
    """The ``loglikelihood`` protocol's multiple-choice questions of an item, one per question."""
    wordings = _LL_QUESTIONS[(item.task, item.language)]
    return [
        ChoiceItem(
            id=f"{item.id}/q{i + 1}",
            suite=SUITE,
            task=item.task,
            category=item.category,
            language=item.language,
            prompt_instruction=_LL_INSTRUCTION[item.language],
            prompt_input=_LL_LAYOUT[item.language].format(
                scenario=item.scenario, question=wording.format(subject=item.subject, q_type=item.question_type)
            ),
            choices=list(question.choices),
            answer_index=question.answer,
        )
        for i, (wording, question) in enumerate(zip(wordings, item.questions, strict=True))
    ]


def accuracy_rows(
    outcomes: Sequence[EmoBenchOutcome], metric: str | None = None
) -> list[tuple[str, str, str, int, float]]:
    """``(task, language, category, n, accuracy %)`` per category and ``Overall``, as the reference reports;
    ``metric`` picks one of ``by_metric``'s answers (``loglikelihood`` protocol), else ``answers``."""
    groups: dict[tuple[str, str, str], list[bool]] = {}
    for outcome in outcomes:
        item = outcome.item
        correct = outcome.correct if metric is None else outcome.correct_by(outcome.by_metric[metric])
        groups.setdefault((item.task, item.language, item.category), []).append(correct)
        groups.setdefault((item.task, item.language, OVERALL), []).append(correct)
    order = sorted(groups, key=lambda k: (TASKS.index(k[0]), k[1], k[2] == OVERALL, k[2]))
    return [(*key, len(groups[key]), 100.0 * sum(groups[key]) / len(groups[key])) for key in order]


def emobench_items(directory: str, languages: Sequence[str]) -> list[EmoBenchItem]:
    """EmoBench EU and EA items of ``languages`` from ``directory``; problems name the config keys."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(
            f"config key eval.emobench_dir: {directory} is not a folder; point it at the folder holding "
            "EmoBench's EU.jsonl and EA.jsonl"
        )
    try:
        return load_emobench(directory, languages)
    except ValueError as err:
        raise DataError(f"{err} (config keys eval.emobench_dir, eval.emobench_languages)") from err


def answer(harness: Harness, items: list[EmoBenchItem], protocol: str, max_new_tokens: int) -> list[EmoBenchOutcome]:
    """Answer EmoBench items by ``protocol``: ``generate`` (the reference's prompts, greedy replies parsed for
    letters) or ``loglikelihood`` (each question as multiple choice, by ``acc`` and ``acc_norm``)."""
    if protocol == "generate":
        prompts = [chat_prompt(harness.tokenizer, user_prompt(i), system_prompt(i.task, i.language)) for i in items]
        replies = harness.runner.generate(prompts, max_new_tokens)
        return [EmoBenchOutcome(i, parse_reply(r, i.task), r) for i, r in zip(items, replies)]
    if protocol != "loglikelihood":
        raise ValueError(f"EmoBench protocol {protocol!r} is not one of {list(PROTOCOLS)}")
    questions = [[from_choice_item(q, "ei") for q in loglikelihood_questions(i)] for i in items]
    flat = harness.choices([q for qs in questions for q in qs], SUITE)
    outcomes, at = [], 0
    for item, qs in zip(items, questions):
        chosen = flat[at : at + len(qs)]
        letters = {m: [LETTERS[o.predicted(m)] for o in chosen] for m in CHOICE_METRICS}
        outcomes.append(EmoBenchOutcome(item, letters[primary_metric(SUITE)], by_metric=letters))
        at += len(qs)
    return outcomes


class EmoBench(Suite):
    """The ``emobench`` suite: EU and EA items of ``eval.emobench_dir`` in ``eval.emobench_languages``, by
    ``eval.emobench_protocol``; the report gives accuracy per task, language and category."""

    name = SUITE

    @classmethod
    def check(cls, settings: Settings) -> None:
        if settings.emobench_protocol not in PROTOCOLS:
            raise DataError(
                f"config key eval.emobench_protocol: {settings.emobench_protocol!r} is not one of {list(PROTOCOLS)}"
            )

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.require("emobench_dir")
        self.protocol = settings.emobench_protocol

    def load(self, source: Source, loaded: Mapping[str, Any]) -> list[EmoBenchItem]:
        items = emobench_items(self.settings.emobench_dir, self.settings.emobench_languages)
        return limit_items(items, self.settings.limit)

    def run(self, harness: Harness, items: list[EmoBenchItem], done: Mapping[str, Any]) -> list[EmoBenchOutcome]:
        return answer(harness, items, self.protocol, self.settings.emobench_max_new_tokens)

    def report(self, outcomes: list[EmoBenchOutcome], rows: list[Row], report: Report) -> None:
        scored = accuracy_rows(outcomes)
        if self.protocol == "generate":
            how = "letter answers parsed from greedy replies to the reference prompts (unparseable = wrong)"
            columns, table = ["task", "language", "category", "n", "accuracy"], [list(row) for row in scored]
        else:
            how = (
                f"each question by log-likelihood, not the published protocol; {CHOICE_NOTE} "
                f"Summary: {primary_metric(SUITE)}"
            )
            by_metric = [accuracy_rows(outcomes, metric) for metric in CHOICE_METRICS]
            columns = ["task", "language", "category", "n", *CHOICE_METRICS]
            table = [[*row[:4], *(rows_of[i][4] for rows_of in by_metric)] for i, row in enumerate(scored)]
        report.tables["emobench"] = Table(
            "EmoBench",
            columns,
            table,
            note=f"As the reference reports it: per language, per category and Overall; EU is right only when "
            f"emotion and cause both are. Protocol {self.protocol}: {how}.",
        )
        for task, language, category, n, acc in scored:
            if category == OVERALL:
                report.add("EmoBench", f"{task} {language}", acc, n, f"Overall, {self.protocol}")

    def outputs(self, outcomes: list[EmoBenchOutcome]) -> dict[str, Any]:
        if self.protocol != "generate":
            return {}
        lines = [
            {
                "id": o.item.id,
                "task": o.item.task,
                "lang": o.item.language,
                "category": o.item.category,
                "labels": [q.letter for q in o.item.questions],
                "answers": o.answers,
                "correct": o.correct,
                "reply": o.reply,
            }
            for o in outcomes
        ]
        return {"emobench_replies.jsonl": lines}
