"""EQ-Bench v2 scorer: conformance with the recorded harness runs, parsing, the revision rule and the CLI."""

import json
import math
import subprocess
import sys

import pytest

from moei_lightning.eval.eqbench import (
    EqBenchInputError,
    Question,
    load_questions,
    load_responses,
    parse_answers,
    question_prompts,
    score_question,
    score_responses,
    score_run,
)

RECORDED_RUNS = ["results_Llama-2-7b-chat-hf.json", "results_Llama-2-13B-chat-AWQ.json"]
REQUIRED_KEYS = {"score", "first_pass_score", "revised_score", "parseable", "n_questions", "unparseable_ids"}


def reply(first: dict[str, int], revised: dict[str, int]) -> str:
    def block(scores):
        return "\n".join(f"{name}: {value}" for name, value in scores.items())

    return f"First pass scores:\n{block(first)}\n\nCritique: fine.\n\nRevised scores:\n{block(revised)}\n"


def make_questions(n: int) -> dict[str, Question]:
    reference = {"Angry": 7, "Calm": 0, "Proud": 3, "Scared": 5}
    return {str(i): Question(id=str(i), prompt=f"prompt {i}", reference=dict(reference)) for i in range(1, n + 1)}


def off_by(reference: dict[str, int], d: int) -> dict[str, int]:
    """The reference with its first emotion moved by d."""
    name = next(iter(reference))
    return {**reference, name: reference[name] + d}


@pytest.mark.parametrize("run_file", RECORDED_RUNS)
def test_recorded_runs_rescored_from_raw_replies(shared_data, run_file):
    folder = shared_data / "eq-bench"
    recorded = json.loads((folder / run_file).read_text(encoding="utf-8"))
    run = score_run(load_responses(folder / run_file), load_questions(folder / "eq_bench_v2_questions_171.json"))
    assert abs(run.score - recorded["benchmark_score"]) < 0.01
    assert round(run.score, 2) == recorded["benchmark_score"]
    assert run.parseable == recorded["n_questions_parseable"]


@pytest.mark.parametrize("run_file", RECORDED_RUNS)
def test_parser_matches_recorded_parsed_answers(shared_data, run_file):
    recorded = json.loads((shared_data / "eq-bench" / run_file).read_text(encoding="utf-8"))
    iteration = recorded["raw_results"]["1"]
    for qid, text in iteration["raw_inference"].items():
        expected = iteration["respondent_answers"][qid]
        first, revised = parse_answers(text)
        assert first == {k: int(v) for k, v in expected["first_pass"].items()}, qid
        assert revised == {k: int(v) for k, v in expected["revised"].items()}, qid


def test_question_file_and_prompts(shared_data):
    questions = load_questions(shared_data / "eq-bench" / "eq_bench_v2_questions_171.json")
    assert len(questions) == 171
    assert questions["1"].reference == {"Remorseful": 0, "Indifferent": 6, "Affectionate": 0, "Annoyed": 7}
    prompts = question_prompts(questions)
    assert prompts["1"] == questions["1"].prompt
    assert "First pass scores:" in prompts["1"]


def test_penalty_curve():
    reference = {"A": 0, "B": 0, "C": 0, "D": 0}
    assert score_question(reference, reference) == 10
    assert score_question({**reference, "A": 4}, reference) == pytest.approx(10 - 0.7477 * 3.25)
    sigmoid_at_1 = 6.5 / (1 + math.exp(3.6))
    assert score_question({**reference, "A": 1}, reference) == pytest.approx(10 - 0.7477 * sigmoid_at_1)
    # From a miss of 5 on, the penalty is the miss itself.
    assert score_question({**reference, "A": 5}, reference) == pytest.approx(10 - 0.7477 * 5)
    assert score_question({**reference, "A": 9, "B": 9}, reference) == pytest.approx(10 - 0.7477 * 18)


def test_parse_sections():
    first, revised = parse_answers(reply({"Angry": 7, "Calm": 1}, {"Angry": 6, "Calm": 2}))
    assert first == {"Angry": 7, "Calm": 1}
    assert revised == {"Angry": 6, "Calm": 2}
    # No revision heading: neither pass can be delimited.
    assert parse_answers("First pass scores:\nAngry: 7\n") == ({}, {})
    # Decorated or glued pairs are not answers.
    assert parse_answers("First pass scores:\n**Angry:** 7\nCalm:3\nRevised scores:\n") == ({}, {})


def test_perfect_replies_score_100():
    questions = make_questions(3)
    responses = {qid: reply(q.reference, q.reference) for qid, q in questions.items()}
    result = score_responses(responses, questions)
    assert result.score == pytest.approx(100)
    assert result.parseable == result.first_pass_parseable == result.revised_parseable == 3
    assert result.unparseable_ids == ()


def test_missing_or_extra_emotion_is_unparseable_and_listed():
    questions = make_questions(3)
    ref = questions["1"].reference
    missing = {k: v for k, v in ref.items() if k != "Calm"}
    extra = {**ref, "Happy": 2}
    responses = {"1": reply(missing, missing), "2": reply(extra, extra), "3": reply(ref, ref)}
    result = score_responses(responses, questions)
    assert result.per_question["1"].first_pass is None
    assert result.per_question["2"].revised is None
    assert result.parseable == 1
    assert result.unparseable_ids == ("1", "2")
    assert result.score == pytest.approx(100)


def test_reply_missing_for_a_question_is_counted():
    questions = make_questions(2)
    result = score_responses({"1": reply(questions["1"].reference, questions["1"].reference)}, questions)
    assert result.missing_ids == ("2",)
    assert result.unparseable_ids == ("2",)
    assert result.n_questions == 2


def test_reply_for_unknown_question_is_an_error():
    with pytest.raises(EqBenchInputError, match="not in the question file"):
        score_responses({"999": "text"}, make_questions(1))


def test_revision_used_when_better_and_as_parseable():
    questions = make_questions(4)
    responses = {qid: reply(off_by(q.reference, 3), q.reference) for qid, q in questions.items()}
    result = score_responses(responses, questions)
    assert result.chosen_pass == "revised"
    assert result.score == result.revised_score == pytest.approx(100)
    assert result.first_pass_score < 100


def test_revision_ignored_when_worse():
    questions = make_questions(4)
    responses = {qid: reply(q.reference, off_by(q.reference, 3)) for qid, q in questions.items()}
    result = score_responses(responses, questions)
    assert result.chosen_pass == "first_pass"
    assert result.score == result.first_pass_score == pytest.approx(100)


def test_revision_ignored_when_it_loses_parseable_replies():
    questions = make_questions(20)
    broken = {"Angry": 7}
    responses = {
        qid: reply(off_by(q.reference, 3), broken if qid in {"1", "2"} else q.reference) for qid, q in questions.items()
    }
    result = score_responses(responses, questions)
    assert result.revised_parseable == 18 < 0.95 * result.first_pass_parseable
    assert result.revised_score > result.first_pass_score
    assert result.chosen_pass == "first_pass"
    assert result.score == result.first_pass_score
    assert result.parseable == 20
    # 19 of 20 is still enough.
    responses["2"] = reply(off_by(questions["2"].reference, 3), questions["2"].reference)
    assert score_responses(responses, questions).chosen_pass == "revised"


def test_plain_map_and_iterations_are_averaged(tmp_path):
    questions = make_questions(2)
    perfect = {qid: reply(q.reference, q.reference) for qid, q in questions.items()}
    plain = tmp_path / "replies.json"
    plain.write_text(json.dumps(perfect), encoding="utf-8")
    assert load_responses(plain) == {"1": perfect}

    half = {"1": perfect["1"], "2": "no scores"}
    harness = tmp_path / "results.json"
    harness.write_text(
        json.dumps({"raw_results": {"1": {"raw_inference": perfect}, "2": {"raw_inference": half}}}),
        encoding="utf-8",
    )
    run = score_run(load_responses(harness), questions)
    assert run.score == pytest.approx(100)
    assert run.parseable == 1.5


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "expected an EQ-Bench results file"),
        ('{"1": 5}', "expected an EQ-Bench results file"),
        ('{"raw_results": {"1": {}}}', "has no 'raw_inference'"),
        ("{oops", "not valid JSON"),
    ],
)
def test_bad_responses_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(EqBenchInputError, match=message) as info:
        load_responses(path)
    assert str(path) in str(info.value)


def test_bad_question_file_names_the_question(tmp_path):
    path = tmp_path / "questions.json"
    ref = {"emotion1": "A", "emotion2": "B", "emotion3": "C", "emotion4": "D"}
    ref.update({"emotion1_score": 1, "emotion2_score": "2", "emotion3_score": 3, "emotion4_score": "eleven"})
    path.write_text(json.dumps({"7": {"prompt": "p", "reference_answer_fullscale": ref}}), encoding="utf-8")
    with pytest.raises(EqBenchInputError, match=r"question 7: emotion4_score"):
        load_questions(path)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "moei_lightning.eval.eqbench", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def write_questions(path, questions):
    raw = {}
    for qid, q in questions.items():
        ref = {}
        for i, (name, value) in enumerate(q.reference.items(), start=1):
            ref[f"emotion{i}"] = name
            ref[f"emotion{i}_score"] = value
        raw[qid] = {"prompt": q.prompt, "reference_answer_fullscale": ref}
    path.write_text(json.dumps(raw), encoding="utf-8")


@pytest.mark.slow
def test_cli_prints_json(tmp_path):
    questions = make_questions(2)
    write_questions(tmp_path / "questions.json", questions)
    (tmp_path / "replies.json").write_text(
        json.dumps({"1": reply(questions["1"].reference, questions["1"].reference), "2": "nothing"}),
        encoding="utf-8",
    )
    done = run_cli(tmp_path / "replies.json", "--questions", tmp_path / "questions.json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) >= REQUIRED_KEYS
    assert report["score"] == pytest.approx(100)
    assert report["parseable"] == 1
    assert report["unparseable_ids"] == {"1": ["2"]}


@pytest.mark.slow
def test_cli_on_recorded_run(shared_data):
    folder = shared_data / "eq-bench"
    done = run_cli(folder / RECORDED_RUNS[1], "--questions", folder / "eq_bench_v2_questions_171.json")
    assert done.returncode == 0, done.stderr
    assert round(json.loads(done.stdout)["score"], 2) == 49.12


@pytest.mark.slow
@pytest.mark.parametrize("content", [None, "not json"])
def test_cli_fails_cleanly_on_bad_file(tmp_path, content):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    write_questions(tmp_path / "questions.json", make_questions(1))
    done = run_cli(path, "--questions", tmp_path / "questions.json")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "results.json" in done.stderr


@pytest.mark.slow
def test_cli_names_the_file_with_unknown_question_ids(tmp_path):
    write_questions(tmp_path / "questions.json", make_questions(1))
    (tmp_path / "replies.json").write_text(json.dumps({"42": "text"}), encoding="utf-8")
    done = run_cli(tmp_path / "replies.json", "--questions", tmp_path / "questions.json")
    assert done.returncode == 2
    assert "replies.json" in done.stderr
    assert "['42']" in done.stderr
