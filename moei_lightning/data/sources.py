"""Data in other shapes than our JSONL: JSON arrays, Alpaca-style files, CSV, Parquet, Arrow, ``datasets``.

A :class:`DataSource` names where the rows are and how their columns map onto the record's fields
(``id``, ``task``, ``domain``, ``aspect``, ``instruction``, ``input``, ``output``, ``choices``);
``defaults`` fills fields the source has no column for (an Alpaca file has no ``task`` or
``aspect``). Every row becomes an :class:`EiRecord` through the same validation as a JSONL line, so
an error names the source, the row and the column. Columns that no field maps to are ignored.

JSON and JSON Lines are read here (lines by :mod:`.jsonl`), which keeps exact line and row numbers.
CSV, Parquet, Arrow files, ``Dataset.save_to_disk`` folders and ``load_dataset`` names go through the
optional ``datasets`` package, from local files or the local Hugging Face cache only: nothing is
downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moei_lightning.data.errors import DataError
from moei_lightning.data.jsonl import read_jsonl, read_text
from moei_lightning.data.records import (
    FIELDS,
    REQUIRED_FIELDS,
    EiRecord,
    check_unique_ids,
    load_records,
    record_from_fields,
)

DATASETS_SUFFIXES = (".csv", ".parquet", ".arrow")
"""File suffixes read through ``datasets``; ``.json`` and ``.jsonl`` are read here."""

# the split names a dataset dict commonly uses for each of our splits, in order of preference
_SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid", "dev"), "test": ("test",)}


@dataclass
class DataSource:
    """One file, folder or dataset, with a mapping from the record's fields to its columns.

    Args:
        path: A file (``.jsonl``, ``.json`` array or JSON Lines, ``.csv``, ``.parquet``, ``.arrow``)
            or a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.
        dataset: Instead of ``path``: what ``datasets.load_dataset`` takes, e.g. a hub id whose files
            are in the local Hugging Face cache, or a local folder of data files.
        name: The dataset's configuration name (``load_dataset``'s second argument).
        split: The split of a dataset with several; default: the data key's split (``train``;
            ``validation``, ``val``, ``valid`` or ``dev``; ``test``).
        columns: Record field -> the source's column, e.g. ``{input: text, output: label}``. Fields not
            named read the column of their own name. None: ``data.columns``.
        defaults: Record field -> value, for rows without that column (or with null in it), e.g.
            ``{task: alpaca_emotion, aspect: expression}``. ``domain`` defaults to the data key's.
    """

    path: str | None = None
    dataset: str | None = None
    name: str | None = None
    split: str | None = None
    columns: dict[str, str] | None = None
    defaults: dict[str, Any] | None = None


Source = str | DataSource


def load_source_records(
    sources: Sequence[Source],
    *,
    key: str,
    domain: str,
    split: str,
    columns: Mapping[str, str] | None = None,
) -> list[EiRecord]:
    """Every record of ``sources`` (the value of ``data.<key>``), validated, ids unique over all of them.

    A plain path to a ``.jsonl`` file or a folder is read as our schema, unless ``columns`` (the
    ``data.columns`` mapping) is set; any other path, and every :class:`DataSource`, is mapped.
    """
    records: list[EiRecord] = []
    for index, source in enumerate(sources):
        where = f"data.{key}[{index}]"
        if isinstance(source, str) and not columns and _is_our_jsonl(Path(source).expanduser()):
            records.extend(load_records([source]))
            continue
        spec = DataSource(path=source) if isinstance(source, str) else source
        records.extend(_mapped(spec, where, domain, split, columns or {}))
    check_unique_ids(records)
    return records


def _mapped(spec: DataSource, where: str, domain: str, split: str, data_columns: Mapping[str, str]) -> list[EiRecord]:
    if (spec.path is None) == (spec.dataset is None):
        raise DataError(f"{where}: give exactly one of 'path' (a file or folder) and 'dataset', got {spec}")
    mapping = dict(data_columns if spec.columns is None else spec.columns)
    defaults = {"domain": domain, **(spec.defaults or {})}
    for option, names in (("columns", mapping), ("defaults", defaults)):
        unknown = sorted(set(names) - set(FIELDS))
        if unknown:
            raise DataError(
                f"{where}.{option}: unknown record field(s) {unknown}; the fields are {list(FIELDS)} "
                f"(a mapping reads 'field: column')"
            )
    rows, label, stem, numbered = _rows(spec, where, split)
    records = []
    for number, row in rows:
        at = f"{label}:{number}" if numbered else f"{label}: row {number}"
        fields = _fields(row, mapping, defaults, at)
        records.append(record_from_fields(fields, at, f"{stem}:{number}"))
    return records


def _fields(row: Any, mapping: Mapping[str, str], defaults: Mapping[str, Any], at: str) -> dict[str, Any]:
    """One row as record fields: mapped columns, else same-name columns, else the defaults."""
    if not isinstance(row, dict):
        raise DataError(f"{at}: expected an object with named columns, got {type(row).__name__}")
    for name, column in mapping.items():
        if column not in row and name not in defaults:
            raise DataError(f"{at}: no column {column!r} (mapped to field {name!r}); the row has columns {sorted(row)}")
    fields: dict[str, Any] = {}
    for name in FIELDS:
        column = mapping.get(name, name)
        value = row.get(column)
        if value is None:
            value = defaults.get(name)
        if value is None and name in REQUIRED_FIELDS:
            raise DataError(
                f"{at}: field {name!r} is missing: the row has no column {column!r} (columns: {sorted(row)}); "
                f"map one with columns: {{{name}: COLUMN}} or set defaults: {{{name}: VALUE}}"
            )
        if value is not None:
            fields[name] = value
    return fields


def _rows(spec: DataSource, where: str, split: str) -> tuple[Iterator[tuple[int, Any]], str, str, bool]:
    """The rows with their numbers, a label for errors, a stem for default ids, and whether numbers are lines."""
    if spec.dataset is not None:
        dataset = _load_dataset(spec, where, split)
        label = f"dataset {spec.dataset}" + (f" ({spec.name})" if spec.name else "") + f" [{dataset.split}]"
        stem = f"{spec.dataset.rstrip('/').rsplit('/', 1)[-1]}/{dataset.split}"
        return _dataset_rows(dataset), label, stem, False
    path = Path(spec.path).expanduser()
    if path.is_dir():
        if not _is_saved_dataset(path):
            raise DataError(
                f"{where}: {path} is a folder without a dataset saved by save_to_disk; use "
                f"'dataset: {spec.path}' for a folder of data files, or name the file"
            )
        dataset = _load_from_disk(path, spec.split, where, split)
        return _dataset_rows(dataset), str(path), path.name, False
    if not path.is_file():
        raise DataError(f"{where}: {path}: no such file or folder (resolved to {path.resolve()})")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return iter(read_jsonl(path)), str(path), path.stem, True
    if suffix == ".json":
        rows, numbered = _json_rows(path)
        return rows, str(path), path.stem, numbered
    if suffix in DATASETS_SUFFIXES:
        dataset = _load_file(path, where)
        return _dataset_rows(dataset), str(path), path.stem, False
    raise DataError(
        f"{where}: {path}: unknown file type {path.suffix!r}; use .jsonl, .json, "
        f"{', '.join(DATASETS_SUFFIXES)}, or a save_to_disk folder"
    )


def _json_rows(path: Path) -> tuple[Iterator[tuple[int, Any]], bool]:
    """A JSON array (rows numbered from 0, as in the array), or JSON Lines saved as ``.json``."""
    text = read_text(path)
    if not text.lstrip().startswith("["):
        return iter(read_jsonl(path)), True
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: malformed JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            "a .json file holds one array of objects, or one object per line"
        ) from err
    return iter(enumerate(value)), False


def _dataset_rows(dataset: Any) -> Iterator[tuple[int, Any]]:
    """Rows of a ``datasets.Dataset``, class labels given by name (``output: label`` reads ``'joy'``, not 3)."""
    features = dataset.features
    labels = {name: feature for name, feature in features.items() if type(feature).__name__ == "ClassLabel"}
    for number, row in enumerate(dataset):
        for name, feature in labels.items():
            if row[name] is not None and row[name] >= 0:
                row[name] = feature.int2str(row[name])
        yield number, row


def _is_our_jsonl(path: Path) -> bool:
    """A ``.jsonl`` file or a folder of them (not a saved dataset): read strictly as our schema."""
    return path.suffix == ".jsonl" or (path.is_dir() and not _is_saved_dataset(path))


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _datasets(where: str) -> Any:
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            f"{where}: reading CSV, Parquet, Arrow or a Hugging Face dataset needs the `datasets` package: "
            "pip install 'moei_lightning[datasets]'"
        ) from err
    return datasets


def _load_file(path: Path, where: str) -> Any:
    datasets = _datasets(where)
    if path.suffix.lower() == ".arrow":
        return _guard(lambda: datasets.Dataset.from_file(str(path)), f"{path}")
    builder = "csv" if path.suffix.lower() == ".csv" else "parquet"
    with _offline():
        return _guard(lambda: datasets.load_dataset(builder, data_files=str(path), split="train"), f"{path}")


def _load_from_disk(path: Path, wanted: str | None, where: str, split: str) -> Any:
    datasets = _datasets(where)
    loaded = _guard(lambda: datasets.load_from_disk(str(path)), str(path))
    if isinstance(loaded, datasets.DatasetDict):
        return loaded[_pick_split(list(loaded), wanted, split, str(path))]
    return loaded


def _load_dataset(spec: DataSource, where: str, split: str) -> Any:
    datasets = _datasets(where)
    with _offline():
        loaded = _guard(lambda: datasets.load_dataset(spec.dataset, spec.name), f"dataset {spec.dataset}")
    if isinstance(loaded, datasets.DatasetDict):
        return loaded[_pick_split(list(loaded), spec.split, split, f"dataset {spec.dataset}")]
    return loaded


def _pick_split(available: list[str], wanted: str | None, split: str, label: str) -> str:
    if wanted is not None:
        if wanted not in available:
            raise DataError(f"{label}: no split {wanted!r}; it has {available}")
        return wanted
    for name in _SPLIT_NAMES.get(split, (split,)):
        if name in available:
            return name
    if len(available) == 1:
        return available[0]
    raise DataError(f"{label}: which split is the {split} data? it has {available}; set 'split:' on this source")


def _guard(load: Any, label: str) -> Any:
    """Run a ``datasets`` loader; its failures become one-line errors that name the source."""
    try:
        return load()
    except DataError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"{label}: could not be read by `datasets` ({type(err).__name__}: {first}); nothing is downloaded, "
            "so a hub dataset must already be in the local Hugging Face cache"
        ) from err


@contextmanager
def _offline() -> Iterator[None]:
    """``datasets`` reads local files and the local cache only, whatever the environment says.

    Both libraries read ``HF_HUB_OFFLINE`` once, at import, into these flags; setting them is what
    the variable would have done.
    """
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved
