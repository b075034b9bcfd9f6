"""EiBench records: the JSONL schema, its validation, and loading from files or folders.

One JSON object per line::

    {"id": "...", "task": "goemotions", "domain": "ei", "aspect": "perception",
     "instruction": "...", "input": "...", "output": "...", "choices": ["...", "..."]}

Every problem is reported as a :class:`DataError` that names ``file:line`` and the field, because a
bad line in a 10k-line file is otherwise hard to find; the lines are read by :mod:`.jsonl`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moei_lightning.data.errors import DataError
from moei_lightning.data.jsonl import read_jsonl, read_lines

EI_ASPECTS: tuple[str, ...] = ("perception", "cognition", "expression")
GI_ASPECTS: tuple[str, ...] = ("knowledge", "reasoning", "commonsense", "reading")
ASPECTS: dict[str, tuple[str, ...]] = {"ei": EI_ASPECTS, "gi": GI_ASPECTS}

_REQUIRED_TEXT = ("task", "domain", "aspect", "instruction", "output")
FIELDS: tuple[str, ...] = ("id", *_REQUIRED_TEXT, "input", "choices", "language")
"""The record's fields; ``task``, ``domain``, ``aspect``, ``instruction`` and ``output`` are required."""
REQUIRED_FIELDS: tuple[str, ...] = _REQUIRED_TEXT


@dataclass(frozen=True)
class EiRecord:
    """One instruction example. ``choices`` is set for multiple choice, and ``output`` is one of them."""

    id: str
    task: str
    domain: str
    aspect: str
    instruction: str
    input: str
    output: str
    choices: list[str] | None = None
    language: str = ""
    """The text's language (``en``, ``zh``) when the data says; evaluation detects it otherwise."""
    source: str = field(default="", compare=False)
    """Where the record was read (``file:line``), so later stages can point back at it."""


def load_records(paths: Iterable[str | Path]) -> list[EiRecord]:
    """Read and validate every record in ``paths``: files, or folders whose ``*.jsonl`` are read by name.

    Ids must be unique over all the paths together, since metrics and predictions are keyed by id.
    """
    records = [record for file in _expand(paths) for record in _read_file(file)]
    check_unique_ids(records)
    return records


def check_unique_ids(records: Iterable[EiRecord]) -> None:
    """Every id once: metrics, per-aspect tables and predictions are keyed by id, so a repeat would be lost."""
    seen: dict[str, str] = {}
    for record in records:
        if record.id in seen:
            raise DataError(
                f"{record.source}: field 'id': duplicate id {record.id!r}, first seen at "
                f"{seen[record.id]}; ids must be unique across all files of a split (EI and GI together)"
            )
        seen[record.id] = record.source


def load_prompts(paths: Iterable[str | Path]) -> list[EiRecord]:
    """Prompts to generate for, from ``.txt`` files (one instruction a line) or ``.jsonl`` files.

    A JSONL line needs only ``instruction``; ``id``, ``input``, ``task``, ``aspect``, ``choices`` and
    ``output`` (a reference, written beside the prediction) are optional. Folders are read for both
    suffixes, by name.
    """
    records = [record for file in _expand(paths, ("*.jsonl", "*.txt")) for record in _read_prompts(file)]
    check_unique_ids(records)
    return records


def _read_prompts(file: Path) -> list[EiRecord]:
    if file.suffix != ".jsonl":
        lines = enumerate(read_lines(file), start=1)
        return [
            EiRecord(f"{file.stem}:{number}", "prompt", "ei", "", line.strip(), "", "", source=f"{file}:{number}")
            for number, line in lines
            if line.strip()
        ]
    records = []
    for number, obj in read_jsonl(file):
        where, default_id = f"{file}:{number}", f"{file.stem}:{number}"
        unknown = sorted(set(obj) - set(FIELDS))
        if unknown:
            raise DataError(f"{where}: unknown field(s) {unknown}; allowed fields are {list(FIELDS)}")
        values = {name: _text(obj, name, where, required=False) for name in ("id", "task", "aspect", "input", "output")}
        choices = obj.get("choices")
        if choices is not None and (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)):
            raise DataError(f"{where}: field 'choices' must be a list of strings, got {choices!r}")
        records.append(
            EiRecord(
                id=values["id"] or default_id,
                task=values["task"] or "prompt",
                domain="ei",
                aspect=values["aspect"],
                instruction=_text(obj, "instruction", where, required=True),
                input=values["input"],
                output=values["output"],
                choices=choices,
                source=where,
            )
        )
    return records


def _expand(paths: Iterable[str | Path], patterns: tuple[str, ...] = ("*.jsonl",)) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(f for pattern in patterns for f in path.glob(pattern))
            if not found:
                kinds = " or ".join(patterns)
                raise DataError(
                    f"{path}: folder has no {kinds} files; point the data path at a file or at a folder that has some"
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder (resolved to {path.resolve()})")
    return files


def _read_file(file: Path) -> list[EiRecord]:
    """The records of one JSON Lines file."""
    return [record_from_fields(obj, f"{file}:{number}", f"{file.stem}:{number}") for number, obj in read_jsonl(file)]


def record_from_fields(obj: dict[str, Any], where: str, default_stem_line: str) -> EiRecord:
    """Validate one record given as a mapping of our field names; ``where`` prefixes every error.

    A record without an id gets ``<domain>/<default_stem_line>``.
    """
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise DataError(f"{where}: unknown field(s) {unknown}; allowed fields are {list(FIELDS)}")

    values = {name: _text(obj, name, where, required=True) for name in _REQUIRED_TEXT}
    domain, aspect = values["domain"], values["aspect"]
    if domain not in ASPECTS:
        raise DataError(f"{where}: field 'domain': unknown domain {domain!r}; allowed: {list(ASPECTS)}")
    if aspect not in ASPECTS[domain]:
        raise DataError(
            f"{where}: field 'aspect': unknown aspect {aspect!r} for domain {domain!r}; "
            f"allowed: {list(ASPECTS[domain])}"
        )
    # the default names the domain too, so files of the same name in an EI and a GI folder never collide
    record_id = _text(obj, "id", where, required=False) or f"{domain}/{default_stem_line}"
    input_text = _text(obj, "input", where, required=False)
    language = _text(obj, "language", where, required=False)
    choices = _choices(obj.get("choices"), values["output"], where)
    return EiRecord(id=record_id, input=input_text, choices=choices, language=language, source=where, **values)


def _text(obj: dict[str, Any], name: str, where: str, *, required: bool) -> str:
    """A string field; required ones must be present and non-blank, optional ones default to ''."""
    if name not in obj or obj[name] is None:
        if required:
            raise DataError(f"{where}: field {name!r} is missing")
        return ""
    value = obj[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def _choices(value: Any, output: str, where: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(c, str) and c.strip() for c in value):
        raise DataError(f"{where}: field 'choices' must be a list of non-empty strings, got {value!r}")
    if len(value) < 2:
        raise DataError(f"{where}: field 'choices' needs at least two options, got {value!r}")
    if len(set(value)) != len(value):
        raise DataError(f"{where}: field 'choices' has duplicate options: {value!r}")
    if output not in value:
        raise DataError(f"{where}: field 'output': {output!r} is not one of the choices {value!r}")
    return list(value)
