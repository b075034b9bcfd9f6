"""MMLU-style CSV (question, A, B, C, D, answer letter) as multiple-choice items for the GI dimensions."""

from __future__ import annotations

import csv
from pathlib import Path

from moei_lightning.eval.suite import ChoiceItem

SUITE = "mmlu"
DIMENSIONS = ("knowledge", "reasoning", "commonsense", "reading")
_LETTERS = ("A", "B", "C", "D")
_COLUMNS = 1 + len(_LETTERS) + 1


def _subject(path: Path) -> str:
    """MMLU names files <subject>_<split>.csv; the subject is what the question is about."""
    stem = path.stem
    for split in ("_test", "_val", "_dev"):
        if stem.endswith(split):
            return stem[: -len(split)]
    return stem


def load_mmlu_csv(path: str | Path, dimension: str) -> list[ChoiceItem]:
    """One item per row; a first row whose last column reads "answer" is taken as a header and skipped."""
    if dimension not in DIMENSIONS:
        raise ValueError(f"dimension {dimension!r} is not one of {DIMENSIONS}")
    path = Path(path)
    subject = _subject(path)
    instruction = f"The following is a multiple choice question about {subject.replace('_', ' ')}."
    items = []
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
            if answer not in _LETTERS:
                raise ValueError(f"{where}: answer {row[-1]!r} is not one of {', '.join(_LETTERS)}")
            items.append(
                ChoiceItem(
                    id=f"{SUITE}/{subject}/{line}",
                    suite=SUITE,
                    task=subject,
                    category=dimension,
                    language="en",
                    prompt_instruction=instruction,
                    prompt_input=row[0],
                    choices=row[1:-1],
                    answer_index=_LETTERS.index(answer),
                )
            )
    if not items:
        raise ValueError(f"{path}: no questions found; expected rows of question, A, B, C, D, answer")
    return items
