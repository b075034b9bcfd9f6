"""Data in other shapes: JSON arrays, Alpaca files, Parquet, Arrow and saved datasets through a column mapping."""

import json
import sys
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

from moei_lightning.cli import main
from moei_lightning.data import DataError, EiRecord, MoEIDataModule
from moei_lightning.data.sources import DataSource, load_source_records
from tests.conftest import LLAMA_CONFIG

datasets = pytest.importorskip("datasets")

ALPACA = [
    {"instruction": "Reply kindly.", "input": "I failed my exam.", "output": "That is hard; you can retake it."},
    {"instruction": "Reply kindly.", "input": "", "output": "I am here if you want to talk."},
]
EMOTION = {"text": ["I won the race!", "My dog died.", "Who ate my cake?!"], "label": [0, 1, 2]}
EMOTION_NAMES = ["joy", "sadness", "anger"]


def emotion_dataset():
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=EMOTION_NAMES)})
    return datasets.Dataset.from_dict(EMOTION, features=features)


EMOTION_SOURCE = {
    "columns": {"input": "text", "output": "label"},
    "defaults": {"task": "emotion", "aspect": "perception", "instruction": "Which emotion does the speaker feel?"},
}


def load(*sources, split: str = "train", **kwargs) -> list[EiRecord]:
    return load_source_records(list(sources), key=f"ei_{split}", domain="ei", split=split, **kwargs)


def test_alpaca_json_array_maps_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "alpaca_kind.json"
    path.write_text(json.dumps(ALPACA))
    records = load(DataSource(path=str(path), defaults={"task": "kind_reply", "aspect": "expression"}))
    assert records == [
        EiRecord(
            "ei/alpaca_kind:0",
            "kind_reply",
            "ei",
            "expression",
            "Reply kindly.",
            ALPACA[0]["input"],
            ALPACA[0]["output"],
        ),
        EiRecord("ei/alpaca_kind:1", "kind_reply", "ei", "expression", "Reply kindly.", "", ALPACA[1]["output"]),
    ]
    assert records[1].source == f"{path}: row 1"


def test_jsonl_with_other_column_names_maps_like_a_json_array(tmp_path: Path) -> None:
    rows = [{"question": "2+2?", "answer": "4", "options": ["3", "4"], "dim": "reasoning", "kind": "arith"}]
    jsonl, array = tmp_path / "gi.jsonl", tmp_path / "gi.json"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    array.write_text(json.dumps(rows))
    mapping = {"instruction": "question", "output": "answer", "choices": "options", "aspect": "dim", "task": "kind"}
    from_jsonl, from_array = (
        load_source_records([str(p)], key="gi_val", domain="gi", split="val", columns=mapping) for p in (jsonl, array)
    )
    expected = EiRecord("gi/gi:1", "arith", "gi", "reasoning", "2+2?", "", "4", ["3", "4"])
    assert from_jsonl == [expected]  # JSON Lines are numbered by line, arrays by index
    assert from_array == [EiRecord(**{**vars(expected), "id": "gi/gi:0"})]
    assert (from_jsonl[0].source, from_array[0].source) == (f"{jsonl}:1", f"{array}: row 0")


def test_saved_dataset_with_class_labels_reads_label_names(tmp_path: Path) -> None:
    emotion_dataset().save_to_disk(str(tmp_path / "emotion"))
    records = load(DataSource(path=str(tmp_path / "emotion"), **EMOTION_SOURCE))
    assert [(r.input, r.output) for r in records] == list(zip(EMOTION["text"], EMOTION_NAMES))
    assert records[0].id == "ei/emotion:0" and records[2].source == f"{tmp_path / 'emotion'}: row 2"


def test_parquet_and_arrow_files_equal_the_saved_dataset(tmp_path: Path) -> None:
    dataset = emotion_dataset()
    dataset.to_parquet(str(tmp_path / "emotion.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    parquet = load(DataSource(path=str(tmp_path / "emotion.parquet"), **EMOTION_SOURCE))
    from_arrow = load(DataSource(path=str(arrow), **EMOTION_SOURCE))
    assert [(r.input, r.output) for r in parquet] == [(r.input, r.output) for r in from_arrow]
    assert [r.output for r in parquet] == EMOTION_NAMES


def test_dataset_dict_picks_the_matching_split(tmp_path: Path) -> None:
    whole = emotion_dataset()
    splits = {"train": whole.select([0, 1]), "validation": whole.select([2])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    val = load(DataSource(path=str(tmp_path / "dd"), **EMOTION_SOURCE), split="val")
    assert [r.output for r in val] == ["anger"]
    with pytest.raises(DataError, match=r"no split 'dev'; it has \['train', 'validation'\]"):
        load(DataSource(path=str(tmp_path / "dd"), split="dev", **EMOTION_SOURCE))


def test_load_dataset_reads_a_local_folder_of_data_files(tmp_path: Path) -> None:
    folder = tmp_path / "emotion_csv"
    folder.mkdir()
    lines = ["text,label", *(f"{t},{n}" for t, n in zip(EMOTION["text"], EMOTION_NAMES))]
    (folder / "train.csv").write_text("\n".join(lines) + "\n")
    records = load(DataSource(dataset=str(folder), **EMOTION_SOURCE))
    assert [r.input for r in records] == EMOTION["text"]
    assert records[0].source == f"dataset {folder} [train]: row 0"


def test_datamodule_mixes_mapped_sources_with_jsonl(tmp_path: Path) -> None:
    (tmp_path / "alpaca.json").write_text(json.dumps(ALPACA))
    emotion_dataset().save_to_disk(str(tmp_path / "emotion"))
    module = MoEIDataModule(
        ei_train=[
            DataSource(path=str(tmp_path / "alpaca.json"), defaults={"task": "kind", "aspect": "expression"}),
            DataSource(path=str(tmp_path / "emotion"), **EMOTION_SOURCE),
        ]
    )
    records = module.records("train")
    ei = [r for r in records if r.domain == "ei"]
    assert [r.task for r in ei] == ["kind"] * 2 + ["emotion"] * 3
    assert len(records) > len(ei)  # the bundled GI samples are still there


@pytest.mark.parametrize(
    ("rows", "source", "expected"),
    [
        (
            [{"instruction": "a", "output": "b"}],
            {},
            r"alpaca\.json: row 0: field 'task' is missing: the row has no column 'task' .*"
            r"columns: \{task: COLUMN\} or set defaults: \{task: VALUE\}",
        ),
        (
            [{"q": "a", "a": "b"}, {"q": "c"}],
            {"columns": {"instruction": "q", "output": "a"}, "defaults": {"task": "t", "aspect": "cognition"}},
            r"alpaca\.json: row 1: no column 'a' \(mapped to field 'output'\); the row has columns \['q'\]",
        ),
        (
            [{"instruction": "a", "output": "b"}],
            {"defaults": {"task": "t", "aspect": "telepathy"}},
            r"alpaca\.json: row 0: field 'aspect': unknown aspect 'telepathy'",
        ),
        (
            [{"instruction": "a", "output": "b"}],
            {"columns": {"outptu": "b"}},
            r"data\.ei_train\[0\]\.columns: unknown record field\(s\) \['outptu'\]",
        ),
    ],
)
def test_errors_name_the_file_row_and_column(tmp_path: Path, rows: list, source: dict, expected: str) -> None:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=expected):
        load(DataSource(path=str(path), **source))


def test_missing_column_of_a_saved_dataset_names_it(tmp_path: Path) -> None:
    emotion_dataset().save_to_disk(str(tmp_path / "emotion"))
    source = {**EMOTION_SOURCE, "columns": {"input": "text", "output": "emotion"}}
    expected = rf"{tmp_path / 'emotion'}: row 0: no column 'emotion' \(mapped to field 'output'\).*\['label', 'text'\]"
    with pytest.raises(DataError, match=expected):
        load(DataSource(path=str(tmp_path / "emotion"), **source))


def test_config_file_entries_reach_the_datamodule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A YAML ``data.ei_train`` list of mapped sources parses into DataSource entries; a misspelt option is one line."""
    (tmp_path / "alpaca.json").write_text(json.dumps(ALPACA))
    entry = {"path": str(tmp_path / "alpaca.json"), "defaults": {"task": "kind", "aspect": "expression"}}
    config = tmp_path / "data.yaml"
    config.write_text(yaml.safe_dump({"data": {"ei_train": [entry], "columns": {"input": "input"}}}))
    monkeypatch.setattr(sys, "argv", ["moei_lightning"])
    base = ["fit", "--config", LLAMA_CONFIG, "--config", str(config), "--print_config"]
    with pytest.raises(SystemExit) as done:
        main(base)
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["data"]
    assert printed["ei_train"][0]["defaults"] == entry["defaults"]
    assert printed["columns"] == {"input": "input"}

    parser = ArgumentParser()
    parser.add_class_arguments(MoEIDataModule, "data")
    module = parser.instantiate(parser.parse_object({"data": printed})).data
    assert [r.task for r in module.records("train") if r.domain == "ei"] == ["kind", "kind"]

    config.write_text(yaml.safe_dump({"data": {"ei_train": [{**entry, "colums": {"input": "text"}}]}}))
    with pytest.raises(SystemExit) as done:
        main(base)
    assert done.value.code == 2
    assert "colums" in capsys.readouterr().err
