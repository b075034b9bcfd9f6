"""The evaluation suites and where their items come from.

Every multiple-choice or open item becomes an :class:`Item` whose ``record`` is an EiBench record, so
the model sees it formatted exactly like its training data (``data.prompt_template``, chat template);
MMLU items are the exception, asked as lm-evaluation-harness's ``mmlu`` asks them (:mod:`.mmlu`).

- ``eibench``: EI test records (EiBench JSONL); choice tasks by log-likelihood, open tasks by greedy
  generation. Grouped by aspect (perception, cognition, expression).
- ``gi``: GI records (EiBench JSONL with ``choices``) and MMLU CSV files, by log-likelihood.
  Grouped by dimension (knowledge, reasoning, commonsense, reading).
- ``eqbench``: EQ-Bench questions (v2, or v1), asked and scored as the reference harness does
  (:mod:`moei_lightning.eval.eqbench`; ``eval.eqbench_mode``).
- ``emobench``: EmoBench EU (emotion and cause, jointly) and EA items, by the reference protocol
  (generated letter answers) or, as an option, by log-likelihood (:mod:`moei_lightning.eval.emobench`).
- ``emotion_prompt``: the ``gi`` items again with emotional stimuli appended
  (:mod:`moei_lightning.eval.emotion_prompt`).

Every problem with an input file is a :class:`~moei_lightning.data.DataError` that names the file
(and line, where there is one) and the config key that pointed at it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from moei_lightning.data import EI_ASPECTS, GI_ASPECTS, DataError, EiRecord, load_records
from moei_lightning.eval.emobench import EmoBenchItem, load_emobench
from moei_lightning.eval.eqbench import EqBenchInputError, Question, Version, load_questions, questions_version
from moei_lightning.eval.items import ChoiceItem
from moei_lightning.eval.mmlu import load_mmlu_csv

SUITES: tuple[str, ...] = ("eibench", "gi", "eqbench", "emobench", "emotion_prompt")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")


@dataclass(frozen=True)
class Item:
    """One question for the model.

    ``source`` is where it came from (``eibench``, ``gi``, ``mmlu`` or ``emobench``); ``group`` is
    the EI aspect, the GI dimension or the EmoBench category; ``answer`` indexes ``record.choices``
    and is None for open (generation) items; ``variant`` names the emotional stimulus appended to
    the prompt, empty for the plain item.
    """

    source: str
    task: str
    group: str
    language: str
    record: EiRecord
    answer: int | None
    variant: str = ""


@dataclass(frozen=True)
class EqBenchQuestions:
    """The EQ-Bench questions to ask; ``available`` counts the file's questions before any cap, and
    ``version`` is the whole file's (a cap to 60 questions must not turn v2 into v1)."""

    path: str
    questions: dict[str, Question]
    available: int
    version: Version = "v2"


@dataclass
class SuiteInputs:
    """Everything the configured suites will ask, loaded and checked before any model call."""

    names: list[str]
    eibench: list[Item] = field(default_factory=list)
    gi: list[Item] = field(default_factory=list)
    emobench: list[EmoBenchItem] = field(default_factory=list)
    eqbench: EqBenchQuestions | None = None
    stimuli: dict[str, str] = field(default_factory=dict)


def check_suites(suites: Sequence[str]) -> list[str]:
    """The suite names in their canonical order; unknown or repeated names are an error."""
    unknown = [name for name in suites if name not in SUITES]
    if unknown:
        raise DataError(f"config key eval.suites: unknown suite(s) {unknown}; choose from {list(SUITES)}")
    if len(set(suites)) != len(suites):
        raise DataError(f"config key eval.suites: a suite is listed twice in {list(suites)}")
    if "emotion_prompt" in suites and "gi" not in suites:
        raise DataError(
            "config key eval.suites: emotion_prompt reruns the gi suite with emotional stimuli and compares "
            "the two, so list gi as well"
        )
    return [name for name in SUITES if name in suites]


def record_language(record: EiRecord) -> str:
    """The record's ``language`` when it has one, else ``zh`` when its target (or, without one, its prompt)
    has more Chinese characters than Latin letters, else ``en``: open answers are scored by the
    language's tokens, and Chinese scored with English tokens gets BLEU and ROUGE of 0."""
    if record.language:
        return record.language
    text = record.output
    if not (_HAN.search(text) or _LATIN.search(text)):
        text = f"{record.instruction}{record.input}"
    return "zh" if len(_HAN.findall(text)) > len(_LATIN.findall(text)) else "en"


def eibench_items(paths: Sequence[str], key: str) -> list[Item]:
    """EI records from EiBench JSONL files or folders; choice records score by likelihood, the rest generate."""
    items = []
    for record in _records(paths, key, "ei"):
        answer = record.choices.index(record.output) if record.choices else None
        items.append(Item("eibench", record.task, record.aspect, record_language(record), record, answer))
    return items


def gi_items(
    paths: Sequence[str], key: str, mmlu_csv: Mapping[str, Sequence[str]], mmlu_num_fewshot: int = 0
) -> list[Item]:
    """GI multiple choice: EiBench-format JSONL records with ``choices``, then MMLU-style CSV files by dimension,
    prompted as lm-eval's ``mmlu`` with ``mmlu_num_fewshot`` dev examples (:mod:`moei_lightning.eval.mmlu`)."""
    items = []
    for record in _records(paths, key, "gi"):
        if not record.choices:
            raise DataError(
                f"{record.source}: field 'choices': the gi suite scores multiple choice only, and this "
                f"record (from {key}) has none; add choices or leave the record out of {key}"
            )
        answer = record.choices.index(record.output)
        items.append(Item("gi", record.task, record.aspect, record_language(record), record, answer))
    for dimension, files in mmlu_csv.items():
        if dimension not in GI_ASPECTS:
            raise DataError(
                f"config key eval.gi_mmlu_csv: {dimension!r} is not a GI dimension; use one of {list(GI_ASPECTS)}"
            )
        for path in [files] if isinstance(files, str) else files:
            _require_file(path, "eval.gi_mmlu_csv")
            try:
                loaded = load_mmlu_csv(path, dimension, mmlu_num_fewshot)
            except ValueError as err:
                shots = f"; eval.mmlu_num_fewshot: {mmlu_num_fewshot}" if mmlu_num_fewshot else ""
                raise DataError(f"{err} (file from config key eval.gi_mmlu_csv{shots})") from err
            items += [from_choice_item(item, "gi") for item in loaded]
    return items


def emobench_items(directory: str, languages: Sequence[str]) -> list[EmoBenchItem]:
    """EmoBench EU and EA items of ``languages`` from ``directory``."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(
            f"config key eval.emobench_dir: {directory} is not a folder; point it at the folder holding "
            "EmoBench's EU.jsonl and EA.jsonl"
        )
    try:
        loaded = load_emobench(directory, languages)
    except ValueError as err:
        raise DataError(f"{err} (config keys eval.emobench_dir, eval.emobench_languages)") from err
    return loaded


def eqbench_questions(path: str, limit: int | None) -> EqBenchQuestions:
    """The questions in file order, the first ``limit`` of them when a limit is set."""
    _require_file(path, "eval.eqbench_questions")
    try:
        questions = load_questions(path)
    except EqBenchInputError as err:
        raise DataError(f"{err} (file from config key eval.eqbench_questions)") from err
    kept = dict(list(questions.items())[:limit]) if limit is not None else questions
    return EqBenchQuestions(
        path=str(path), questions=kept, available=len(questions), version=questions_version(questions)
    )


T = TypeVar("T", Item, EmoBenchItem)


def limit_items(items: list[T], limit: int | None) -> list[T]:
    """The first ``limit`` items of each task and language, in their order (all of them without a limit)."""
    if limit is None:
        return items
    seen: Counter[tuple[str, str]] = Counter()
    kept = []
    for item in items:
        seen[(item.task, item.language)] += 1
        if seen[(item.task, item.language)] <= limit:
            kept.append(item)
    return kept


def _records(paths: Sequence[str], key: str, domain: str) -> list[EiRecord]:
    records = load_records(paths)
    aspects = EI_ASPECTS if domain == "ei" else GI_ASPECTS
    for record in records:
        if record.domain != domain or record.aspect not in aspects:
            raise DataError(
                f"{record.source}: field 'domain': a {record.domain!r} record ({record.aspect}) among the "
                f"{domain} records of {key}; list it under the other domain's files"
            )
    return records


def from_choice_item(item: ChoiceItem, domain: str) -> Item:
    """A loader's :class:`ChoiceItem` as an :class:`Item` whose record is formatted like training data."""
    record = EiRecord(
        id=item.id,
        task=item.task,
        domain=domain,
        aspect=item.category,
        instruction=item.prompt_instruction,
        input=item.prompt_input,
        output=item.choices[item.answer_index],
        choices=item.choices,
        source=item.id,
    )
    return Item(item.suite, item.task, item.category, item.language, record, item.answer_index)


def _require_file(path: str, key: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"config key {key}: file {path} not found; fix the path, or download it (docs/evaluation.md)"
        )
