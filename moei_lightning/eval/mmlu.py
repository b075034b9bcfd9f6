"""MMLU from the release's CSV files, asked and scored as lm-evaluation-harness 0.4.13's ``mmlu`` task.

What lm-eval's ``mmlu`` does (``tasks/mmlu/default/_default_template_yaml``, one YAML per subject,
``_mmlu.yaml``), done the same way here so that the numbers are its numbers:

- **Prompt**: the subject's description "The following are multiple choice questions (with answers)
  about {subject}." (the subject's underscores read as spaces) and a blank line, then ``k`` solved dev
  questions, each followed by a blank line, then the question: ``question.strip()``, the options as
  ``A. ...`` to ``D. ...`` lines and ``Answer:``. Plain text: no chat template, no system prompt.
- **Few-shot** (``num_fewshot``, 0 by default as in lm-eval): the first ``k`` rows of the subject's dev
  split, in file order (lm-eval's ``first_n`` sampler), each answered as `` B``.
- **Choices**: the continuations `` A`` to `` D`` (lm-eval's ``target_delimiter`` " " before the letter),
  scored by summed log-likelihood; ``acc`` (the highest sum is right) is the metric. With one-character
  choices acc_norm (per character) picks the same answer.
- **Per subject**: acc is the mean over its questions; **the group** is lm-eval's ``weight_by_size``
  aggregation, ``sum(acc * n) / sum(n)`` over the subjects in lm-eval's group order
  (:func:`group_accuracy`): the share of all questions answered right, summed as lm-eval sums it.

The numbers equal lm-eval's as long as no prompt is cut to ``data.max_length`` (the report counts
cuts; lm-eval cuts at the model's own length).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moei_lightning.data import Encoder, PromptFormatter
from moei_lightning.eval.choices import TARGET_DELIMITER
from moei_lightning.eval.suite import ChoiceItem

if TYPE_CHECKING:
    from moei_lightning.eval.suite import ChoiceOutcome

SUITE = "mmlu"
DIMENSIONS = ("knowledge", "reasoning", "commonsense", "reading")
LETTERS = ("A", "B", "C", "D")
_COLUMNS = 1 + len(LETTERS) + 1
DESCRIPTION = "The following are multiple choice questions (with answers) about {subject}."
FEWSHOT_DELIMITER = "\n\n"
TEMPLATE = "{instruction}\n\n{input}"
"""The prompt as a ``data.prompt_template``: the description, a blank line, the shots and the question."""

# lm-eval's mmlu group: stem, other, social sciences, humanities; each group's subjects sorted by task name.
GROUPS: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics", "computer_security",
        "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
        "high_school_chemistry", "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning",
    ),
    "other": (
        "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging", "management",
        "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
        "professional_medicine", "virology",
    ),
    "social_sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology", "human_sexuality",
        "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios",
        "philosophy", "prehistory", "professional_law", "world_religions",
    ),
}  # fmt: skip
_GROUP_ORDER = {subject: i for i, subject in enumerate(s for subjects in GROUPS.values() for s in subjects)}


@dataclass(frozen=True)
class Question:
    """One CSV row: the question, its four options and the index of the right one."""

    text: str
    options: tuple[str, ...]
    answer: int

    def asked(self) -> str:
        """lm-eval's ``doc_to_text``: the stripped question, the lettered options, ``Answer:``."""
        options = "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, self.options))
        return f"{self.text.strip()}{options}\nAnswer:"

    def solved(self) -> str:
        """A few-shot example: the question answered with its letter after the target delimiter."""
        return f"{self.asked()}{TARGET_DELIMITER}{LETTERS[self.answer]}"


def subject_of(path: Path) -> str:
    """MMLU names files <subject>_<split>.csv; the subject is what the question is about."""
    stem = path.stem
    for split in ("_test", "_val", "_dev"):
        if stem.endswith(split):
            return stem[: -len(split)]
    return stem


def read_questions(path: str | Path) -> list[tuple[int, Question]]:
    """``(line, question)`` per row; a first row whose last column reads "answer" is taken as a header."""
    path = Path(path)
    questions = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        start, first_row = 1, True
        for row in reader:
            # A quoted field may span lines: report the line the row starts on.
            line, start = start, reader.line_num + 1
            where = f"{path}:{line}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != _COLUMNS:
                raise ValueError(f"{where}: expected {_COLUMNS} columns (question, A, B, C, D, answer), got {len(row)}")
            is_header, first_row = first_row and row[-1].strip().lower() == "answer", False
            if is_header:
                continue
            if not row[0].strip():
                raise ValueError(f"{where}: the question (first column) is empty")
            answer = row[-1].strip()
            if answer not in LETTERS:
                raise ValueError(f"{where}: answer {row[-1]!r} is not one of {', '.join(LETTERS)}")
            questions.append((line, Question(row[0], tuple(row[1:-1]), LETTERS.index(answer))))
    if not questions:
        raise ValueError(f"{path}: no questions found; expected rows of question, A, B, C, D, answer")
    return questions


def dev_files(path: str | Path) -> tuple[Path, Path]:
    """Where a subject's dev split may be, in this order: ``<subject>_dev.csv`` beside the file, or in
    ``../dev/`` as the MMLU release lays it out (``data/test/``, ``data/dev/``)."""
    path = Path(path)
    name = f"{subject_of(path)}_dev.csv"
    return path.parent / name, path.parent.parent / "dev" / name


def fewshot_questions(path: str | Path, num_fewshot: int) -> list[Question]:
    """The first ``num_fewshot`` questions of the subject's dev split (lm-eval's ``first_n``)."""
    if num_fewshot == 0:
        return []
    candidates = dev_files(path)
    dev = next((candidate for candidate in candidates if candidate.is_file()), None)
    if dev is None:
        raise ValueError(
            f"{path}: {num_fewshot}-shot needs the subject's dev split, looked for {candidates[0]} and "
            f"{candidates[1]}; put the release's dev files there or ask 0-shot"
        )
    shots = [question for _, question in read_questions(dev)]
    if len(shots) < num_fewshot:
        raise ValueError(f"{dev}: {num_fewshot}-shot needs {num_fewshot} dev questions, the file has {len(shots)}")
    return shots[:num_fewshot]


def load_mmlu_csv(path: str | Path, dimension: str, num_fewshot: int = 0) -> list[ChoiceItem]:
    """One item per row, prompted as lm-eval's ``mmlu`` with ``num_fewshot`` dev examples; the choices are the
    letters. Format an item's record with :func:`prompt_encoder`'s formatter to get lm-eval's context."""
    if dimension not in DIMENSIONS:
        raise ValueError(f"dimension {dimension!r} is not one of {DIMENSIONS}")
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot must be 0 or more, got {num_fewshot}")
    path = Path(path)
    subject = subject_of(path)
    shots = "".join(shot.solved() + FEWSHOT_DELIMITER for shot in fewshot_questions(path, num_fewshot))
    return [
        ChoiceItem(
            id=f"{SUITE}/{subject}/{line}",
            suite=SUITE,
            task=subject,
            category=dimension,
            language="en",
            prompt_instruction=DESCRIPTION.format(subject=subject.replace("_", " ")),
            prompt_input=shots + question.asked(),
            choices=list(LETTERS),
            answer_index=question.answer,
        )
        for line, question in read_questions(path)
    ]


def prompt_encoder(encoder: Encoder) -> Encoder:
    """The encoder of MMLU items: ``encoder``'s tokenizer, model kind and length, with lm-eval's plain-text
    prompt (:data:`TEMPLATE`) in place of the training template, chat template and system prompt."""
    formatter = PromptFormatter(TEMPLATE, None, False, encoder.tokenizer)
    return Encoder(encoder.tokenizer, formatter, encoder.kind, encoder.max_length)


def subject_accuracies(outcomes: Iterable[ChoiceOutcome]) -> dict[str, tuple[float, int]]:
    """``subject -> (acc, n)`` of the MMLU outcomes (others are ignored), in lm-eval's group order; acc is the
    fraction whose highest summed log-likelihood is the answer, as lm-eval's ``acc`` (0-1, not percent)."""
    right: dict[str, list[bool]] = {}
    for outcome in outcomes:
        if outcome.item.source == SUITE:
            right.setdefault(outcome.item.task, []).append(outcome.scores.predicted_unnormalised == outcome.item.answer)
    ordered = sorted(right, key=lambda s: (_GROUP_ORDER.get(s, len(_GROUP_ORDER)), s))
    return {s: (sum(right[s]) / len(right[s]), len(right[s])) for s in ordered}


def group_accuracy(subjects: Mapping[str, tuple[float, int]]) -> float:
    """lm-eval's group score with ``weight_by_size``: ``sum(acc * n) / sum(n)`` over the subjects in the order
    given (:func:`subject_accuracies` gives lm-eval's), so even the last bit is lm-eval's."""
    if not subjects:
        raise ValueError("no MMLU subjects to average")
    return sum(acc * n for acc, n in subjects.values()) / sum(n for _, n in subjects.values())
