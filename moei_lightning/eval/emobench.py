"""EmoBench (Sabour et al. 2024) as multiple-choice items.

Emotional understanding (EU.jsonl) asks two questions per scenario, so each line gives two items:
which emotion the subject feels (`EU-emotion`) and why they feel the labelled emotion
(`EU-cause`). Emotional application (EA.jsonl) gives one item per line: the most effective
action or response (`EA`). Every line of the requested languages becomes items; a line that
cannot be read is an error naming file:line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from moei_lightning.eval.items import ChoiceItem

SUITE = "emobench"
LANGUAGES = ("en", "zh")

_INSTRUCTION = {
    "en": "Read the scenario and answer the question with the single best choice.",
    "zh": "阅读下面的情景，并选出最恰当的一个选项回答问题。",
}
_EMOTION_QUESTION = {
    "en": "What emotion would {subject} ultimately feel in this situation?",
    "zh": "在这种情况下，{subject}最终会感受到什么情绪？",
}
_CAUSE_QUESTION = {
    "en": "Why would {subject} feel {emotion} in this situation?",
    "zh": "在这种情况下，{subject}为什么会感到{emotion}？",
}
_EA_QUESTION = {
    "en": "In this scenario, what is the most effective {kind} for {subject}?",
    "zh": "在这种情况下，{subject}最有效的{kind}是什么？",
}
_EA_KIND = {
    "en": {"Action": "action", "Response": "response"},
    "zh": {"Action": "行动", "Response": "回应"},
}
_SCENARIO = {"en": "Scenario: {scenario}\nQuestion: {question}", "zh": "情景：{scenario}\n问题：{question}"}


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

    def choices(self, key: str) -> list[str]:
        value = self.record.get(key)
        if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, str) for c in value):
            raise self.error(f"field '{key}' must be a list of at least two strings, got {value!r}")
        if len(set(value)) != len(value):
            raise self.error(f"field '{key}' repeats a choice, so its label would be ambiguous: {value!r}")
        return value

    def answer(self, choices_key: str, label_key: str) -> tuple[list[str], int]:
        choices = self.choices(choices_key)
        label = self.text(label_key)
        if label not in choices:
            raise self.error(f"'{label_key}' {label!r} is not one of '{choices_key}' {choices!r}")
        return choices, choices.index(label)


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


def _item(line: _Line, task: str, category: str, question: str, choices_key: str, label_key: str) -> ChoiceItem:
    language = line.text("language")
    choices, answer_index = line.answer(choices_key, label_key)
    return ChoiceItem(
        id=f"{SUITE}/{task}/{language}/{line.text('qid')}",
        suite=SUITE,
        task=task,
        category=category,
        language=language,
        prompt_instruction=_INSTRUCTION[language],
        prompt_input=_SCENARIO[language].format(scenario=line.text("scenario"), question=question),
        choices=choices,
        answer_index=answer_index,
    )


def _eu_items(line: _Line) -> list[ChoiceItem]:
    language = line.text("language")
    subject = line.text("subject")
    category = line.text("coarse_category")
    emotion = _EMOTION_QUESTION[language].format(subject=subject)
    cause = _CAUSE_QUESTION[language].format(subject=subject, emotion=line.text("emotion_label"))
    return [
        _item(line, "EU-emotion", category, emotion, "emotion_choices", "emotion_label"),
        _item(line, "EU-cause", category, cause, "cause_choices", "cause_label"),
    ]


def _ea_item(line: _Line) -> ChoiceItem:
    language = line.text("language")
    kind = line.text("question type")
    if kind not in _EA_KIND[language]:
        raise line.error(f"'question type' {kind!r} is not one of {sorted(_EA_KIND[language])}")
    question = _EA_QUESTION[language].format(subject=line.text("subject"), kind=_EA_KIND[language][kind])
    return _item(line, "EA", line.text("category"), question, "choices", "label")


def load_emobench(directory: str | Path, languages: Sequence[str] = LANGUAGES) -> list[ChoiceItem]:
    """All EmoBench items of the given languages from EU.jsonl and EA.jsonl in `directory`."""
    unknown = [lang for lang in languages if lang not in LANGUAGES]
    if unknown or not languages:
        raise ValueError(f"languages must be a non-empty selection of {LANGUAGES}, got {tuple(languages)}")
    directory = Path(directory)
    items: list[ChoiceItem] = []
    seen: dict[str, str] = {}
    for name in ("EU.jsonl", "EA.jsonl"):
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: EmoBench file not found; point at the folder holding EU.jsonl and EA.jsonl"
            )
        for line in _lines(path, languages):
            for item in _eu_items(line) if name == "EU.jsonl" else [_ea_item(line)]:
                if item.id in seen:
                    raise line.error(f"item {item.id} already came from {seen[item.id]}; qids must be unique")
                seen[item.id] = line.where
                items.append(item)
    return items
