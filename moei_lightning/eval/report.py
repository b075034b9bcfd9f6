"""The evaluation report of one checkpoint: tables of numbers, written as report.json and report.md.

``report.json`` is for programs (``python -m moei_lightning.eval.compare`` reads it back);
``report.md`` is for people. Both hold the same numbers: a summary table (one row per EI aspect, GI
dimension, benchmark score and average, each with the key it is logged under), one table per suite
with its tasks, free-text notes (unparseable replies, truncated prompts) and the run's configuration.

:func:`metric_key` is the one naming of every number a run logs: validation and test rows
(``val/ei/perception/acc``, ``test/ei/avg``), the report's summary scores (``test/eq_bench_v2/score``)
and the fit summary (``summary/val/after/ei/acc_norm``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Value = str | int | float | None

SUMMARY_COLUMNS = ["suite", "measure", "score", "n", "note", "key"]
STAGE = "test"
"""The stage a report's numbers are logged under: ``test`` runs the evaluation."""
ALL = "all"
"""The task or aspect of an aggregate row: left out of its key."""


def metric_key(stage: str, *parts: str) -> str:
    """The key a number is logged under: ``<stage>/<part>/...`` without the :data:`ALL` parts.

    ``metric_key("val", "ei", "perception", ALL, "acc")`` is ``val/ei/perception/acc``;
    ``metric_key("test", "ei", ALL, ALL, "avg")`` is ``test/ei/avg``.
    """
    return "/".join([stage, *(part for part in parts if part != ALL)])


@dataclass
class Table:
    """A titled table; ``note`` says how its numbers were computed."""

    title: str
    columns: list[str]
    rows: list[list[Value]] = field(default_factory=list)
    note: str = ""

    def to_markdown(self) -> str:
        return markdown_table(self.columns, self.rows)


@dataclass
class Report:
    """The summary (columns :data:`SUMMARY_COLUMNS`), the per-suite tables, notes and the run's configuration."""

    summary: Table
    tables: dict[str, Table] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def scores(self) -> dict[str, float | None]:
        """Every summary score by ``suite/measure`` as the tables label them (``EI/perception``)."""
        return {f"{row[0]}/{row[1]}": row[2] for row in self.summary.rows}

    @property
    def metrics(self) -> dict[str, float | None]:
        """The same scores under the keys they are logged under (``test/ei/perception/score``, ``test/ei/avg``,
        ``test/eq_bench_v2/score``)."""
        return {row[5]: row[2] for row in self.summary.rows}

    def add(self, suite: str, measure: str, score: Value, n: Value, note: str, key: str | None = None) -> None:
        """One summary row; ``key`` defaults to ``test/<suite>/<measure>`` in snake_case."""
        key = key or metric_key(STAGE, metric_name(suite), metric_name(measure))
        self.summary.rows.append([suite, measure, score, n, note, key])

    def to_dict(self) -> dict[str, Any]:
        return {
            "scores": self.scores,
            "metrics": self.metrics,
            "summary": asdict(self.summary),
            "tables": {name: asdict(table) for name, table in self.tables.items()},
            "notes": self.notes,
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        return cls(
            summary=Table(**data["summary"]),
            tables={name: Table(**table) for name, table in data.get("tables", {}).items()},
            notes=list(data.get("notes", [])),
            config=dict(data.get("config", {})),
        )

    def to_markdown(self) -> str:
        parts = ["# MoEI evaluation report", "", _headline(self.config), "", "## Summary", ""]
        if self.summary.note:
            parts += [self.summary.note, ""]
        parts += [self.summary.to_markdown(), ""]
        for table in self.tables.values():
            parts += [f"## {table.title}", ""]
            if table.note:
                parts += [table.note, ""]
            parts += [table.to_markdown(), ""]
        if self.notes:
            parts += ["## Notes", "", *[f"- {note}" for note in self.notes], ""]
        parts += ["## Configuration", "", markdown_table(["key", "value"], list(flatten(self.config).items())), ""]
        return "\n".join(parts)

    def write(self, directory: str | Path) -> tuple[Path, Path]:
        """Write ``report.json`` and ``report.md`` into ``directory``; returns their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        json_path, md_path = directory / "report.json", directory / "report.md"
        json_path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        md_path.write_text(self.to_markdown(), encoding="utf-8")
        return json_path, md_path


def load_report(path: str | Path) -> Report:
    """A report.json read back; a file that is not one is an error naming it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return Report.from_dict(data)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a report.json written by PaperEvaluation ({type(err).__name__}: {err})") from err


def metric_name(label: str) -> str:
    """A table label as a snake_case key part.

    ``EmotionPrompt/GI acc (plain)`` -> ``emotionprompt/gi_acc_plain``.
    """
    return "/".join(re.sub(r"[^0-9a-z]+", "_", part.lower()).strip("_") for part in label.split("/"))


def plural(count: int, word: str) -> str:
    """``1 task``, ``2 tasks``."""
    return f"{count} {word}{'s' * (count != 1)}"


def format_value(value: Value) -> str:
    """Numbers for reading: two decimals, three below 1 (inter gates live in [0, 1]); missing values as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, int):  # bool is an int too
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1 and value != 0 else f"{value:.2f}"
    return str(value)


def markdown_table(columns: list[str], rows: list[list[Value]] | list[tuple[Value, ...]]) -> str:
    """A GitHub-flavoured markdown table; numbers are right-aligned."""
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in rows) and bool(rows)
        for i in range(len(columns))
    ]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" if is_number else "---" for is_number in numeric) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(format_value(value)) for value in row) + " |")
    return "\n".join(lines)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Value]:
    """Nested settings as dotted keys, lists joined, so they fit a two-column table."""
    flat: dict[str, Value] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = ", ".join(str(v) for v in value) if value else "[]"
        elif isinstance(value, dict):
            flat[name] = "{}"
        else:
            flat[name] = value
    return flat


def _headline(config: dict[str, Any]) -> str:
    backbone = config.get("backbone", {}).get("name_or_path", "?")
    return f"Backbone `{backbone}`, adapter `{config.get('adapter', '?')}`, checkpoint: {config.get('checkpoint')}."


def _cell(text: str) -> str:
    """One table cell: pipes escaped, line breaks written as a visible ``\\n``."""
    return text.replace("|", "\\|").replace("\n", "\\n")
