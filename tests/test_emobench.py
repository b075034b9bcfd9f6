"""EmoBench: items, the reference protocol (prompts, reply parsing, joint EU scoring, per-language rows)."""

import collections
import json

import pytest

from moei_lightning.eval.emobench import (
    OVERALL,
    EmoBenchOutcome,
    accuracy_rows,
    load_emobench,
    loglikelihood_questions,
    parse_reply,
    system_prompt,
    user_prompt,
)


def count_lines(path):
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def test_every_line_becomes_one_item(shared_data):
    folder = shared_data / "emobench"
    assert count_lines(folder / "EU.jsonl") == 400
    assert count_lines(folder / "EA.jsonl") == 400
    items = load_emobench(folder)
    counts = collections.Counter((item.task, item.language) for item in items)
    assert counts == {(task, lang): 200 for task in ("EU", "EA") for lang in ("en", "zh")}
    assert len({item.id for item in items}) == len(items)
    assert {len(item.questions) for item in items if item.task == "EU"} == {2}


def test_labels_resolve_to_the_source_labels(shared_data):
    folder = shared_data / "emobench"
    items = {item.id: item for item in load_emobench(folder)}
    for line in (folder / "EU.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        item = items[f"emobench/EU/{record['language']}/{record['qid']}"]
        emotion, cause = item.questions
        assert emotion.choices[emotion.answer] == record["emotion_label"]
        assert cause.choices[cause.answer] == record["cause_label"]
        assert item.category == record["coarse_category"]
    for line in (folder / "EA.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        item = items[f"emobench/EA/{record['language']}/{record['qid']}"]
        assert item.questions[0].choices[item.questions[0].answer] == record["label"]
        assert item.category == record["category"]


def test_no_question_names_the_gold_emotion(shared_data):
    """The cause question asks about "these emotions", never the labelled one (it used to, in all 400 prompts)."""
    for item in load_emobench(shared_data / "emobench"):
        if item.task != "EU":
            continue
        gold = item.questions[0].choices[item.questions[0].answer]
        prompt = user_prompt(item)
        choices_at = prompt.index("A) ")
        assert gold not in prompt[:choices_at].replace(item.scenario, ""), item.id
        cause = loglikelihood_questions(item)[1]
        assert gold not in cause.prompt_input.replace(item.scenario, ""), item.id


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


def test_reference_prompts(tmp_path):
    write_jsonl(tmp_path / "EU.jsonl", [EU_LINE])
    write_jsonl(tmp_path / "EA.jsonl", [EA_LINE])
    eu, ea = load_emobench(tmp_path)
    assert user_prompt(eu) == (
        "## Scenario\nAnn lost her keys.\n\n## Question 1\nWhat emotion(s) would Ann ultimately feel in this "
        "situation?\n\n## Choices for Question 1\nA) Joy\nB) Worry\n\n## Question 2\nWhy would Ann feel these "
        "emotions in this situation?\n\n## Choices for Question 2\nA) She is late\nB) She found them\n"
    )
    # The question type is inserted as the data gives it, in both languages, as the reference does.
    assert user_prompt(ea) == (
        "## 场景\n小明迟到了。\n\n## 问题\n在这个场景中，小明最有效的Response是什么？\n\n## 选项\nA) 道歉\nB) 沉默\n"
    )
    system = system_prompt("EU", "en")
    assert system.startswith("# Instructions\n\nIn this task, you are presented with a scenario")
    assert '"answer_q1": "<Respond to the Question 1 with the corresponding letter numbering>",' in system
    assert system.rstrip().endswith("```")
    assert '"answer": "<用相应的字母进行回答>"' in system_prompt("EA", "zh")
    assert load_emobench(tmp_path, languages=("en",)) == [eu]


def test_user_prompts_end_as_the_reference_renders_them(shared_data):
    """prompts.yaml ends with the EU zh block and no line break, so only those 200 prompts end without one."""
    endings = collections.Counter()
    for item in load_emobench(shared_data / "emobench"):
        prompt = user_prompt(item)
        last = item.questions[-1]
        assert prompt.rstrip("\n").endswith(f"{chr(ord('A') + len(last.choices) - 1)}) {last.choices[-1]}")
        endings[(item.task, item.language, prompt.endswith("\n"), prompt.endswith("\n\n"))] += 1
    assert endings == {
        ("EU", "en", True, False): 200,
        ("EU", "zh", False, False): 200,
        ("EA", "en", True, False): 200,
        ("EA", "zh", True, False): 200,
    }


@pytest.mark.parametrize(
    ("reply", "task", "letters"),
    [
        ('```json\n{"answer_q1": "B", "answer_q2": "A"}\n```', "EU", ["B", "A"]),
        ('Sure!\n```json\n{"answer": "C"}\n``` hope it helps', "EA", ["C"]),
        ('{"answer": "D"}', "EA", ["D"]),
        ('The answer is {"answer": "D"}', "EA", [""]),  # not JSON as a whole, no fence: nothing
        ('{"answer_q1": "B"}', "EU", ["B", ""]),
        ('{"answer": 3}', "EA", [""]),
        ('["A"]', "EA", [""]),
        ("```json\n{broken\n```", "EU", ["", ""]),
        ('{"answer": "A) Joy"}', "EA", ["A) Joy"]),  # kept as given; it is not the letter, so it is wrong
    ],
)
def test_replies_are_parsed_as_the_reference_parses_them(reply, task, letters):
    assert parse_reply(reply, task) == letters


def test_eu_is_right_only_when_both_answers_are_and_rows_are_per_language(tmp_path):
    lines = [{**EU_LINE, "qid": str(i)} for i in range(1, 5)]
    lines[3] = {**lines[3], "coarse_category": "emotional_cues"}
    write_jsonl(tmp_path / "EU.jsonl", lines)
    write_jsonl(tmp_path / "EA.jsonl", [EA_LINE])
    *eu, ea = load_emobench(tmp_path)
    outcomes = [
        EmoBenchOutcome(eu[0], ["B", "A"]),  # both right
        EmoBenchOutcome(eu[1], ["B", "B"]),  # cause wrong
        EmoBenchOutcome(eu[2], ["A", "A"]),  # emotion wrong
        EmoBenchOutcome(eu[3], ["B", "A"]),
        EmoBenchOutcome(ea, [""]),  # unparseable: wrong
    ]
    assert [o.correct for o in outcomes] == [True, False, False, True, False]
    assert accuracy_rows(outcomes) == [
        ("EU", "en", "complex_emotions", 3, pytest.approx(100 / 3)),
        ("EU", "en", "emotional_cues", 1, 100.0),
        ("EU", "en", OVERALL, 4, 50.0),
        ("EA", "zh", "Personal-Self", 1, 0.0),
        ("EA", "zh", OVERALL, 1, 0.0),
    ]


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
        (EU_LINE, r"EU.jsonl:2: item emobench/EU/en/1 already came from .*EU.jsonl:1"),
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
