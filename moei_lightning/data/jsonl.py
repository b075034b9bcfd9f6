"""JSON Lines files, read one way for every reader: UTF-8, one object a line, errors that name ``file:line``.

A bad line in a 10k-line file is otherwise hard to find, so every problem is a :class:`DataError`
that names the file and, for a line, its number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moei_lightning.data.errors import DataError


def read_text(file: Path) -> str:
    """The file's text as UTF-8, a byte-order mark skipped."""
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{file}: not valid UTF-8 ({err}); save the file as UTF-8") from err


def read_lines(file: Path) -> list[str]:
    """A text file's lines as the data readers take them: UTF-8 (a byte-order mark skipped), ended by ``\\n`` only.

    ``str.splitlines`` would also split at U+2028, U+0085 and other characters that JSON strings may
    hold as they are, cutting a valid record in two. A ``\\r`` before the ``\\n`` is dropped.
    """
    return [line.removesuffix("\r") for line in read_text(file).split("\n")]


def parse_object(line: str, where: str) -> dict[str, Any]:
    """One line's JSON object; ``where`` (``file:line``) prefixes the error when it is not one."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{where}: malformed JSON ({err.msg} at column {err.colno}); each line must be one object"
        ) from err
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def read_jsonl(file: Path) -> list[tuple[int, dict[str, Any]]]:
    """Every object of a JSON Lines file with its line number; blank lines are skipped.

    A file without any object is an error too: an empty file in a list of data paths is a mistake
    that would otherwise only show as a missing task or a smaller split.
    """
    lines = enumerate(read_lines(file), start=1)
    rows = [(number, parse_object(line, f"{file}:{number}")) for number, line in lines if line.strip()]
    if not rows:
        raise DataError(f"{file}: the file is empty (no JSON object on any line); fill it or remove it from the list")
    return rows
