"""EmoBench loader: every line of both files and both languages becomes items with valid answers."""

import collections
import json

import pytest

from moei_lightning.eval.emobench import load_emobench
from moei_lightning.eval.items import ChoiceItem


def count_lines(path):
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def test_all_lines_become_items(shared_data):
    folder = shared_data / "emobench"
    assert count_lines(folder / "EU.jsonl") == 400
    assert count_lines(folder / "EA.jsonl") == 400
    items = load_emobench(folder)
    counts = collections.Counter((item.task, item.language) for item in items)
    assert counts == {(task, lang): 200 for task in ("EU-emotion", "EU-cause", "EA") for lang in ("en", "zh")}
    assert sum(item.task.startswith("EU") for item in items) == 800
    assert sum(item.task == "EA" for item in items) == 400
    assert len({item.id for item in items}) == len(items)
    assert {item.suite for item in items} == {"emobench"}


def test_labels_resolve_to_the_source_labels(shared_data):
    folder = shared_data / "emobench"
    items = {item.id: item for item in load_emobench(folder)}
    for line in (folder / "EU.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        emotion = items[f"emobench/EU-emotion/{record['language']}/{record['qid']}"]
        cause = items[f"emobench/EU-cause/{record['language']}/{record['qid']}"]
        assert emotion.choices[emotion.answer_index] == record["emotion_label"]
        assert cause.choices[cause.answer_index] == record["cause_label"]
        assert emotion.category == record["coarse_category"]
        assert record["scenario"] in emotion.prompt_input
    for line in (folder / "EA.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        item = items[f"emobench/EA/{record['language']}/{record['qid']}"]
        assert item.choices[item.answer_index] == record["label"]
        assert item.category == record["category"]


def test_chinese_text_is_preserved(shared_data):
    folder = shared_data / "emobench"
    first_zh = next(
        json.loads(line)
        for line in (folder / "EA.jsonl").read_text(encoding="utf-8").splitlines()
        if json.loads(line)["language"] == "zh"
    )
    items = load_emobench(folder, languages=("zh",))
    assert {item.language for item in items} == {"zh"}
    assert len(items) == 600
    item = next(i for i in items if i.id == f"emobench/EA/zh/{first_zh['qid']}")
    assert first_zh["scenario"] in item.prompt_input
    assert item.choices == first_zh["choices"]
    assert "问题" in item.prompt_input


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


EU_LINE = {
    "qid": "1",
    "language": "en",
    "coarse_category": "complex_emotions",
    "finegrained_category": "emotion_transition",
    "scenario": "Ann lost her keys.",
    "subject": "Ann",
    "emotion_choices": ["Joy", "Worry"],
    "emotion_label": "Worry",
    "cause_choices": ["She is late", "She found them"],
    "cause_label": "She is late",
}
EA_LINE = {
    "qid": "1",
    "language": "zh",
    "category": "Personal-Self",
    "question type": "Response",
    "scenario": "小明迟到了。",
    "subject": "小明",
    "choices": ["道歉", "沉默"],
    "label": "道歉",
}


def test_small_folder(tmp_path):
    write_jsonl(tmp_path / "EU.jsonl", [EU_LINE])
    write_jsonl(tmp_path / "EA.jsonl", [EA_LINE])
    emotion, cause, action = load_emobench(tmp_path)
    assert emotion == ChoiceItem(
        id="emobench/EU-emotion/en/1",
        suite="emobench",
        task="EU-emotion",
        category="complex_emotions",
        language="en",
        prompt_instruction=emotion.prompt_instruction,
        prompt_input=(
            "Scenario: Ann lost her keys.\nQuestion: What emotion would Ann ultimately feel in this situation?"
        ),
        choices=["Joy", "Worry"],
        answer_index=1,
    )
    assert "Worry" in cause.prompt_input
    assert cause.answer_index == 0
    assert action.prompt_input == "情景：小明迟到了。\n问题：在这种情况下，小明最有效的回应是什么？"
    assert load_emobench(tmp_path, languages=("en",)) == [emotion, cause]


SECOND = {**EU_LINE, "qid": "2"}


@pytest.mark.parametrize(
    ("second_line", "message"),
    [
        (
            {**SECOND, "cause_label": "Nobody knows"},
            r"EU.jsonl:2: 'cause_label' 'Nobody knows' is not one of",
        ),
        ({**SECOND, "emotion_choices": ["Joy", "Joy"]}, r"EU.jsonl:2: field 'emotion_choices' repeats"),
        ({k: v for k, v in SECOND.items() if k != "scenario"}, r"EU.jsonl:2: field 'scenario'"),
        ({**SECOND, "language": "fr"}, r"EU.jsonl:2: language 'fr'"),
        (EU_LINE, r"EU.jsonl:2: item emobench/EU-emotion/en/1 already came from .*EU.jsonl:1"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, second_line, message):
    write_jsonl(tmp_path / "EU.jsonl", [EU_LINE, second_line])
    write_jsonl(tmp_path / "EA.jsonl", [EA_LINE])
    with pytest.raises(ValueError, match=message):
        load_emobench(tmp_path)


def test_missing_file_and_bad_languages(tmp_path):
    write_jsonl(tmp_path / "EU.jsonl", [EU_LINE])
    with pytest.raises(FileNotFoundError, match=r"EA\.jsonl"):
        load_emobench(tmp_path)
    with pytest.raises(ValueError, match="languages"):
        load_emobench(tmp_path, languages=("de",))
