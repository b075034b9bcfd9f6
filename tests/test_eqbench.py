"""EQ-Bench v2 scorer: conformance with the recorded harness runs, parsing, the revision rule and the CLI."""

import json
import math
import subprocess
import sys

import pytest

from moei_lightning.eval.eqbench import (
    EqBenchInputError,
    Question,
    QuestionScore,
    accepted,
    attempt_temperatures,
    detect_mode,
    eqbench_questions,
    load_questions,
    load_responses,
    main,
    parse_answers,
    partial,
    question_prompt,
    question_prompts,
    questions_version,
    read_responses,
    results_file,
    score_question,
    score_responses,
    score_run,
)
from tests.conftest import load_benchmark

# The reference harness's recorded runs: file -> (benchmark_score, n_questions_parseable, mode).
RECORDED = {
    "results_Llama-2-7b-chat-hf.json": (36.32, 171, "revise"),
    "results_Llama-2-13B-chat-AWQ.json": (49.12, 171, "revise"),
    "results_Yi-6B-Chat.json": (61.79, 157, "no_revise"),
    "results_Qwen-7B-Chat.json": (50.11, 170, "no_revise"),
}
RECORDED_RUNS = [name for name, (_, _, mode) in RECORDED.items() if mode == "revise"]
REQUIRED_KEYS = {"score", "first_pass_score", "revised_score", "parseable", "n_questions", "unparseable_ids", "failed"}


def reply(first: dict[str, int], revised: dict[str, int]) -> str:
    def block(scores):
        return "\n".join(f"{name}: {value}" for name, value in scores.items())

    return f"First pass scores:\n{block(first)}\n\nCritique: fine.\n\nRevised scores:\n{block(revised)}\n"


def make_questions(n: int) -> dict[str, Question]:
    reference = {"Angry": 7, "Calm": 0, "Proud": 3, "Scared": 5}
    return {str(i): Question(id=str(i), prompt=f"prompt {i}", reference=dict(reference)) for i in range(1, n + 1)}


def revise_scores(responses, questions):
    return score_responses(responses, questions, "revise")


def off_by(reference: dict[str, int], d: int) -> dict[str, int]:
    """The reference with its first emotion moved by d."""
    name = next(iter(reference))
    return {**reference, name: reference[name] + d}


@pytest.mark.parametrize("run_file", list(RECORDED))
def test_recorded_runs_rescored_from_raw_replies(shared_data, run_file):
    folder = shared_data / "eq-bench"
    recorded = json.loads((folder / run_file).read_text(encoding="utf-8"))
    score, parseable, mode = RECORDED[run_file]
    assert (recorded["benchmark_score"], recorded["n_questions_parseable"]) == (score, parseable)
    iterations = load_responses(folder / run_file)
    assert detect_mode(iterations) == mode
    run = score_run(iterations, load_questions(folder / "eq_bench_v2_questions_171.json"), mode)
    assert run.score == score
    assert run.parseable == parseable
    assert not run.failed


@pytest.mark.parametrize("run_file", list(RECORDED))
def test_cli_reproduces_recorded_runs(shared_data, run_file, capsys):
    folder = shared_data / "eq-bench"
    main([str(folder / run_file), "--questions", str(folder / "eq_bench_v2_questions_171.json")])
    report = json.loads(capsys.readouterr().out)
    score, parseable, mode = RECORDED[run_file]
    assert (report["score"], report["parseable"], report["mode"], report["failed"]) == (score, parseable, mode, False)


def test_no_revise_run_scored_in_revise_mode_loses_everything(shared_data):
    """Why the mode matters: Yi-6B-Chat's replies carry no headings."""
    folder = shared_data / "eq-bench"
    questions = load_questions(folder / "eq_bench_v2_questions_171.json")
    run = score_run(load_responses(folder / "results_Yi-6B-Chat.json"), questions, "revise")
    assert (run.score, run.parseable, run.failed) == (0.0, 0.0, True)


@pytest.mark.parametrize("run_file", RECORDED_RUNS)
def test_parser_matches_recorded_parsed_answers(shared_data, run_file):
    recorded = json.loads((shared_data / "eq-bench" / run_file).read_text(encoding="utf-8"))
    iteration = recorded["raw_results"]["1"]
    for qid, text in iteration["raw_inference"].items():
        expected = iteration["respondent_answers"][qid]
        first, revised = parse_answers(text, "revise")
        assert first == {k: int(v) for k, v in expected["first_pass"].items()}, qid
        assert revised == {k: int(v) for k, v in expected["revised"].items()}, qid


def test_question_file_and_prompts(shared_data):
    questions = load_questions(shared_data / "eq-bench" / "eq_bench_v2_questions_171.json")
    assert len(questions) == 171
    assert questions["1"].reference == {"Remorseful": 0, "Indifferent": 6, "Affectionate": 0, "Annoyed": 7}
    revise = question_prompts(questions, "revise")
    assert revise["1"] == questions["1"].prompt
    assert "First pass scores:" in revise["1"]
    # No revise (the default): the harness's remove_revision_instructions, applied to question 1.
    plain = question_prompts(questions)["1"]
    assert plain == question_prompt(questions["1"], "no_revise")
    assert plain.endswith(
        "relative intensity that they are likely to be feeling each.\n\n"
        "You must output in the following format, including headings (of course, you should give your own "
        "scores), with no additional commentary:\n\n"
        "Remorseful: <score>\nIndifferent: <score>\nAffectionate: <score>\nAnnoyed: <score>\n\n\n"
        "[End of answer]\n\nRemember: zero is a valid score, meaning they are likely not feeling that "
        "emotion. You must score at least one emotion > 0.\n\nYour answer:\n"
    )
    assert "Critique" not in plain and "Revised" not in plain and "First pass" not in plain


def test_penalty_curve():
    reference = {"A": 0, "B": 0, "C": 0, "D": 1}
    question = Question("q", "p", reference)
    assert score_question(reference, question) == 10
    assert score_question({**reference, "A": 4}, question) == pytest.approx(10 - 0.7477 * 3.25)
    sigmoid_at_1 = 6.5 / (1 + math.exp(3.6))
    assert score_question({**reference, "A": 1}, question) == pytest.approx(10 - 0.7477 * sigmoid_at_1)
    # From a miss of 5 on, the penalty is the miss itself (the recorded runs need d = 5 off the curve).
    assert score_question({**reference, "A": 5}, question) == pytest.approx(10 - 0.7477 * 5)
    assert score_question({**reference, "A": 9, "B": 9}, question) == pytest.approx(10 - 0.7477 * 18)


def test_all_zero_pass_follows_the_harness():
    """The harness keeps or retries a reply by its v1 check (intensities must not sum to 0), then scores
    a kept reply's passes on v2, which has no sum check (eq_bench_utils.process_question, scoring.py)."""
    question = Question("q", "p", {"A": 0, "B": 0, "C": 0, "D": 1}, reference_v1={"A": 0, "B": 0, "C": 0, "D": 10})
    zeros, right = {"A": 0, "B": 0, "C": 0, "D": 0}, {"A": 0, "B": 0, "C": 0, "D": 1}
    zeros_score = 10 - 0.7477 * 6.5 / (1 + math.exp(3.6))  # one emotion off by 1
    assert score_question(zeros, question) == pytest.approx(zeros_score)
    assert score_question(zeros, question, "v1") is None  # v1 rescales to sum 10: it keeps the check
    plain_zeros = "A: 0\nB: 0\nC: 0\nD: 0"
    assert not accepted(plain_zeros, question, "no_revise") and not partial(plain_zeros, question, "no_revise")
    assert not accepted(reply(zeros, right), question, "revise") and partial(reply(zeros, right), question, "revise")
    assert not partial(reply(zeros, zeros), question, "revise")
    questions = {"1": question, "2": Question("2", "p", dict(right), reference_v1=question.reference_v1)}
    # Revise: a reply kept for its revision has its all-zero first pass scored too.
    result = score_responses({"1": reply(zeros, right), "2": reply(right, right)}, questions, "revise", "v2")
    assert result.per_question["1"] == QuestionScore(first_pass=pytest.approx(zeros_score), revised=10)
    assert (result.first_pass_parseable, result.revised_parseable) == (2, 2)
    assert result.first_pass_score == pytest.approx(10 * (zeros_score + 10) / 2)
    # A reply with no pass passing the check is one the harness never stores: neither pass counts.
    result = score_responses({"1": reply(zeros, zeros), "2": plain_zeros}, questions, "revise", "v2")
    assert (result.first_pass_parseable, result.revised_parseable) == (0, 0)
    result = score_responses({"1": plain_zeros, "2": "A: 0\nB: 0\nC: 0\nD: 1"}, questions, "no_revise", "v2")
    assert result.per_question["1"] == QuestionScore(None, None) and result.parseable == 1
    # v1 keeps the reply but not its all-zero pass.
    result = score_responses({"1": reply(zeros, right), "2": reply(right, right)}, questions, "revise", "v1")
    assert result.per_question["1"] == QuestionScore(first_pass=None, revised=pytest.approx(10))
    assert (result.first_pass_parseable, result.revised_parseable) == (1, 2)


def test_v1_scoring_rescales_answers_to_ten():
    question = Question("q", "p", None, reference_v1={"A": 5, "B": 5, "C": 0, "D": 0})
    assert score_question({"A": 2, "B": 2, "C": 0, "D": 0}, question, "v1") == pytest.approx(10)
    # 4/8*10 = 5 off by 0, 2/8*10 = 2.5 off by 2.5 twice, 2/8*10 = 2.5 off by 2.5.
    assert score_question({"A": 4, "B": 2, "C": 2, "D": 0}, question, "v1") == pytest.approx(10 - 5.0)
    with pytest.raises(EqBenchInputError, match="no full-scale reference"):
        score_question({"A": 4, "B": 2, "C": 2, "D": 0}, question, "v2")


@pytest.mark.parametrize("fullscale", [False, True])
def test_v1_question_file_is_scored_as_v1(tmp_path, capsys, fullscale):
    """The official eq_bench_v1_questions_60.json carries reference_answer_fullscale too (its scores as
    strings); the harness tells v1 by the count of 60 questions, and so does this scorer."""
    ref = {"emotion1": "A", "emotion2": "B", "emotion3": "C", "emotion4": "D"}
    entry = {"prompt": "p", "reference_answer": {**ref, "emotion1_score": 5, "emotion2_score": 5}}
    entry["reference_answer"].update({"emotion3_score": 0, "emotion4_score": 0})
    if fullscale:
        entry["reference_answer_fullscale"] = {**ref, **{f"emotion{i}_score": str(i) for i in range(1, 5)}}
    path = tmp_path / "eq_bench_v1_questions_60.json"
    path.write_text(json.dumps({str(i): entry for i in range(60)}), encoding="utf-8")
    questions = load_questions(path)
    assert questions_version(questions) == "v1"
    # Perfect on v1 (rescaled to sum 10), far off on v2: the v1 score shows which was used.
    perfect = reply({"A": 1, "B": 1, "C": 0, "D": 0}, {"A": 3, "B": 3, "C": 0, "D": 0})
    result = score_responses({qid: perfect for qid in questions}, questions, "revise")
    assert (result.version, result.score, result.parseable) == ("v1", pytest.approx(100), 60)
    # v1 questions are asked as written, whatever the mode.
    assert question_prompts(questions, "no_revise")["0"] == question_prompt(questions["0"], "no_revise", "v1") == "p"
    replies = tmp_path / "replies.json"
    replies.write_text(json.dumps({qid: perfect for qid in questions}), encoding="utf-8")
    main([str(replies), "--questions", str(path), "--mode", "revise"])
    report = json.loads(capsys.readouterr().out)
    assert (report["version"], report["score"], report["parseable"]) == ("v1", 100.0, 60)


def test_first_60_v2_questions_stay_v2(shared_data):
    """The version belongs to the whole file: capping the v2 file to 60 questions must not make it v1."""
    path = shared_data / "eq-bench" / "eq_bench_v2_questions_171.json"
    assert questions_version(load_questions(path)) == "v2"
    capped = eqbench_questions(str(path), 60)
    assert (len(capped.questions), capped.version) == (60, "v2")


def test_failed_run_rule():
    questions = make_questions(171)
    good = reply(questions["1"].reference, questions["1"].reference)
    for parseable, failed in ((143, False), (142, True)):
        replies = {qid: good for qid in list(questions)[:parseable]}
        result = revise_scores(replies, questions)
        assert (result.parseable, result.failed) == (parseable, failed)


def test_no_revise_parser():
    text = "Angry: 1\nCalm: 2\nAngry: 7\nNote:5 Proud: 3\nScared: 5"
    assert parse_answers(text, "no_revise") == ({"Angry": 7, "Calm": 2, "Proud": 3, "Scared": 5}, {})
    # Laid out with both headings anyway: read as the recorded harness read it (as in revise mode).
    laid_out = reply({"Angry": 1}, {"Angry": 2})
    assert parse_answers(laid_out, "no_revise") == parse_answers(laid_out, "revise") == ({"Angry": 1}, {"Angry": 2})


def test_retry_rules():
    question = make_questions(1)["1"]
    ref = question.reference
    plain = "\n".join(f"{k}: {v}" for k, v in ref.items())
    assert accepted(plain, question, "no_revise")
    assert not accepted(plain, question, "revise") and not partial(plain, question, "revise")
    half = reply(ref, {"Angry": 1})
    assert not accepted(half, question, "revise") and partial(half, question, "revise")
    assert accepted(reply(ref, ref), question, "revise")
    assert not partial("nothing", question, "no_revise")
    assert attempt_temperatures() == [0.01, 0.16, 0.31]


def test_mode_is_read_from_our_results_file(tmp_path):
    questions = make_questions(2)
    path = tmp_path / "eqbench_replies.json"
    path.write_text(json.dumps(results_file({"1": "Angry: 1"}, "revise", "v2")), encoding="utf-8")
    responses = read_responses(path)
    assert (responses.mode, responses.version, responses.iterations) == ("revise", "v2", {"1": {"1": "Angry: 1"}})
    assert detect_mode(responses.iterations) == "no_revise"
    assert score_run(responses.iterations, questions, responses.mode).iterations["1"].mode == "revise"


def test_parse_sections():
    first, revised = parse_answers(reply({"Angry": 7, "Calm": 1}, {"Angry": 6, "Calm": 2}), "revise")
    assert first == {"Angry": 7, "Calm": 1}
    assert revised == {"Angry": 6, "Calm": 2}
    # No revision heading: neither pass can be delimited.
    assert parse_answers("First pass scores:\nAngry: 7\n", "revise") == ({}, {})
    # Decorated or glued pairs are not answers.
    assert parse_answers("First pass scores:\n**Angry:** 7\nCalm:3\nRevised scores:\n", "revise") == ({}, {})


def test_perfect_replies_score_100():
    questions = make_questions(3)
    responses = {qid: reply(q.reference, q.reference) for qid, q in questions.items()}
    result = revise_scores(responses, questions)
    assert result.score == pytest.approx(100)
    assert result.parseable == result.first_pass_parseable == result.revised_parseable == 3
    assert result.unparseable_ids == ()


def test_missing_or_extra_emotion_is_unparseable_and_listed():
    questions = make_questions(3)
    ref = questions["1"].reference
    missing = {k: v for k, v in ref.items() if k != "Calm"}
    extra = {**ref, "Happy": 2}
    responses = {"1": reply(missing, missing), "2": reply(extra, extra), "3": reply(ref, ref)}
    result = revise_scores(responses, questions)
    assert result.per_question["1"].first_pass is None
    assert result.per_question["2"].revised is None
    assert result.parseable == 1
    assert result.unparseable_ids == ("1", "2")
    assert result.score == pytest.approx(100)


def test_reply_missing_for_a_question_is_counted():
    questions = make_questions(2)
    result = revise_scores({"1": reply(questions["1"].reference, questions["1"].reference)}, questions)
    assert result.missing_ids == ("2",)
    assert result.unparseable_ids == ("2",)
    assert result.n_questions == 2


def test_reply_for_unknown_question_is_an_error():
    with pytest.raises(EqBenchInputError, match="not in the question file"):
        score_responses({"999": "text"}, make_questions(1))


def test_revision_used_when_better_and_as_parseable():
    questions = make_questions(4)
    responses = {qid: reply(off_by(q.reference, 3), q.reference) for qid, q in questions.items()}
    result = revise_scores(responses, questions)
    assert result.chosen_pass == "revised"
    assert result.score == result.revised_score == pytest.approx(100)
    assert result.first_pass_score < 100


def test_revision_ignored_when_worse():
    questions = make_questions(4)
    responses = {qid: reply(q.reference, off_by(q.reference, 3)) for qid, q in questions.items()}
    result = revise_scores(responses, questions)
    assert result.chosen_pass == "first_pass"
    assert result.score == result.first_pass_score == pytest.approx(100)


def test_revision_ignored_when_it_loses_parseable_replies():
    questions = make_questions(20)
    broken = {"Angry": 7}
    responses = {
        qid: reply(off_by(q.reference, 3), broken if qid in {"1", "2"} else q.reference) for qid, q in questions.items()
    }
    result = revise_scores(responses, questions)
    assert result.revised_parseable == 18 < 0.95 * result.first_pass_parseable
    assert result.revised_score > result.first_pass_score
    assert result.chosen_pass == "first_pass"
    assert result.score == result.first_pass_score
    assert result.parseable == 20
    # 19 of 20 is still enough.
    responses["2"] = reply(off_by(questions["2"].reference, 3), questions["2"].reference)
    assert revise_scores(responses, questions).chosen_pass == "revised"


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
    run = score_run(load_responses(harness), questions, "revise")
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


# benchmarks/eqbench_rescore.py: the harness's stored answers rescored with this scorer.


def harness_file(path, answers: dict[str, tuple[dict[str, int], dict[str, int]]], score: float, parseable: float):
    """A results file laid out as the reference harness writes one, intensities stored as strings."""
    stored = {
        qid: {"first_pass": {k: str(v) for k, v in first.items()}, "revised": {k: str(v) for k, v in rev.items()}}
        for qid, (first, rev) in answers.items()
    }
    data = {
        "benchmark_score": score,
        "n_questions_parseable": parseable,
        "eqbench_version": "v2",
        "raw_results": {"1": {"respondent_answers": stored, "individual_scores": {}, "raw_inference": {}}},
    }
    path.write_text(json.dumps(data))
    return path


def test_rescore_reads_a_revise_run_with_an_all_zero_first_pass(shared_data, tmp_path):
    rescore = load_benchmark("eqbench_rescore")
    questions = load_questions(shared_data / "eq-bench" / "eq_bench_v2_questions_171.json")
    ids = list(questions)[:10]
    refs = {qid: dict(questions[qid].reference) for qid in ids}
    zeros = {name: 0 for name in refs[ids[0]]}
    answers = {qid: (refs[qid], refs[qid]) for qid in ids[1:8]}
    answers[ids[0]] = (zeros, refs[ids[0]])  # kept for its revision; its all-zero first pass still counts
    for qid in ids[8:]:
        answers[qid] = (refs[qid], {})  # no revision: 8 of 10 is under 0.95, so the first pass is final
    zeros_score = score_question(zeros, questions[ids[0]])
    expected = round(10 * (9 * 10 + zeros_score) / 10, 2)
    assert expected < 100  # an all-zero pass left out would give 100
    path = harness_file(tmp_path / "m__revise_eqbench_v2_results.json", answers, expected, 10.0)

    row = rescore.rescore(path, {"v2": questions})
    assert (row.name, row.mode, row.score, row.parseable, row.difference) == ("m__revise", "revise", expected, 10, 0)
    assert rescore.mismatches([row], set()) == []


def test_rescore_reads_a_no_revise_run_and_flags_a_mismatch(shared_data, tmp_path, capsys):
    rescore = load_benchmark("eqbench_rescore")
    questions_file = shared_data / "eq-bench" / "eq_bench_v2_questions_171.json"
    questions = load_questions(questions_file)
    ids = list(questions)[:5]
    refs = {qid: dict(questions[qid].reference) for qid in ids}
    missed = {name: min(value + 2, 10) if i == 0 else value for i, (name, value) in enumerate(refs[ids[0]].items())}
    answers = {qid: (refs[qid], {}) for qid in ids[1:]}
    answers[ids[0]] = (missed, {})
    expected = round(10 * (4 * 10 + score_question(missed, questions[ids[0]])) / 5, 2)
    good = harness_file(tmp_path / "good_eqbench_v2_results.json", answers, expected, 5.0)
    (tmp_path / "sub").mkdir()
    bad = harness_file(tmp_path / "sub" / "bad_eqbench_v2_results.json", answers, expected + 1, 5.0)

    row = rescore.rescore(good, {"v2": questions})
    assert (row.mode, row.score, row.parseable) == ("no_revise", expected, 5)
    assert rescore.result_files([tmp_path]) == [good, bad]
    assert rescore.main([str(tmp_path), "--questions", str(questions_file)]) == 1
    out = capsys.readouterr().out
    assert "| bad | no_revise |" in out and "unexpected mismatches: bad" in out
    args = [str(tmp_path), "--questions", str(questions_file), "--expect-mismatch", "bad"]
    assert rescore.main(args) == 0


def test_rescore_reproduces_the_recorded_runs_from_their_stored_answers(shared_data):
    rescore = load_benchmark("eqbench_rescore")
    questions = {"v2": load_questions(shared_data / "eq-bench" / "eq_bench_v2_questions_171.json")}
    for name, (score, parseable, mode) in RECORDED.items():
        row = rescore.rescore(shared_data / "eq-bench" / name, questions)
        assert (row.mode, row.stored_score, row.score, row.parseable) == (mode, score, score, parseable), name


@pytest.mark.parametrize(
    "content", ["not json", '{"raw_results": {}}', '{"benchmark_score": 1, "raw_results": {"1": {}}}']
)
def test_rescore_fails_cleanly_on_a_file_that_is_not_a_harness_result(shared_data, tmp_path, content, capsys):
    path = tmp_path / "x_eqbench_v2_results.json"
    path.write_text(content)
    questions = shared_data / "eq-bench" / "eq_bench_v2_questions_171.json"
    assert load_benchmark("eqbench_rescore").main([str(path), "--questions", str(questions)]) == 2
    assert str(path) in capsys.readouterr().err
