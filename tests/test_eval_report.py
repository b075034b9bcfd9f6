"""The report from hand-made outcomes: every number checked, both files written, reports compared side by side."""

import dataclasses
from pathlib import Path

import pytest

from moei_lightning.data import EiRecord
from moei_lightning.eval.aggregate import build_report
from moei_lightning.eval.choices import ChoiceScores
from moei_lightning.eval.compare import main as compare_main
from moei_lightning.eval.emobench import EmoBenchItem, EmoBenchOutcome
from moei_lightning.eval.emobench import Question as EmoQuestion
from moei_lightning.eval.eqbench import Question, score_responses
from moei_lightning.eval.harness import ChoiceOutcome, EqBenchOutcome, OpenOutcome, Results
from moei_lightning.eval.report import Report, load_report
from moei_lightning.eval.suites import EqBenchQuestions, Item

NAMES = ["eibench", "gi", "eqbench", "emobench", "emotion_prompt"]
CONFIG = {"checkpoint": "runs/x/last.ckpt", "backbone": {"name_or_path": "tiny"}, "adapter": "molora", "data": {}}
REFERENCE = {"Angry": 7, "Calm": 0, "Proud": 3, "Scared": 5}


def choice(source: str, task: str, group: str, correct: bool, language: str = "en", gate: float | None = None):
    record = EiRecord(id=f"{task}-{id(object())}", task=task, domain="ei", aspect=group, instruction="i", input="x",
                      output="b", choices=["a", "b", "c"])  # fmt: skip
    predicted = 1 if correct else 0
    logprobs = [-1.0 if i == predicted else -5.0 for i in range(3)]
    item = Item(source, task, group, language, record, answer=1)
    return ChoiceOutcome(item, ChoiceScores(logprobs, [1, 1, 1], [1, 1, 1]), gate)


def open_outcome(task: str, prediction: str, reference: str) -> OpenOutcome:
    record = EiRecord(
        id=task, task=task, domain="ei", aspect="expression", instruction="i", input="x", output=reference
    )
    return OpenOutcome(Item("eibench", task, "expression", "en", record, answer=None), prediction)


def emobench_outcome(task: str, category: str, language: str, correct: bool) -> EmoBenchOutcome:
    questions = (EmoQuestion(("x", "y"), 1),) * (2 if task == "EU" else 1)
    item = EmoBenchItem(f"{task}-{id(object())}", task, language, category, "1", "s", "Ann", questions)
    return EmoBenchOutcome(item, ["B" if correct else "A"] * len(questions))


def eqbench_outcome(parseable: int = 5) -> EqBenchOutcome:
    """Six questions, ``parseable`` of them answered perfectly (5 of 6 is just above the 83.33 % floor)."""
    questions = {str(i): Question(id=str(i), prompt="p", reference=REFERENCE) for i in range(1, 7)}
    scores = "\n".join(f"{name}: {value}" for name, value in REFERENCE.items())
    replies = {qid: scores if int(qid) <= parseable else "I cannot say." for qid in questions}
    return EqBenchOutcome(EqBenchQuestions("q.json", questions, 171), replies, score_responses(replies, questions))


def make_results(gates: bool = True) -> Results:
    plain_gate, stimulus_gate = (0.2, 0.6) if gates else (None, None)
    gi = [choice("gi", "trivia", "knowledge", c, gate=plain_gate) for c in (True, True, True, False)]
    gi += [choice("mmlu", "formal_logic", "reasoning", False, gate=plain_gate) for _ in range(2)]
    probe = [dataclasses.replace(o, item=dataclasses.replace(o.item, variant="EP02"), gate=stimulus_gate) for o in gi]
    for outcome in probe:
        outcome.scores = ChoiceScores([-1.0, -5.0, -5.0], [1, 1, 1], [1, 1, 1])  # every answer wrong now
    return Results(
        eibench=[
            choice("eibench", "polarity", "perception", True),
            choice("eibench", "polarity", "perception", False),
            choice("eibench", "intensity", "perception", True),
        ],
        eibench_open=[open_outcome("reply", "thank you so much", "thank you so much")] * 2,
        gi=gi,
        eqbench=eqbench_outcome(),
        emobench=[
            emobench_outcome("EU", "complex", "en", True),
            emobench_outcome("EU", "complex", "en", False),
            emobench_outcome("EU", "complex", "zh", False),
            emobench_outcome("EA", "Social-Self", "en", True),
        ],
        emotion_prompt=probe,
    )


def test_summary_numbers() -> None:
    report = build_report(NAMES, make_results(), CONFIG, {"EP02": "This is very important to my career."})
    scores = report.scores
    assert scores["EI/perception"] == pytest.approx(75.0)  # mean of the tasks (50, 100), not of the items
    assert scores["EI/expression"] == pytest.approx(100.0)  # ROUGE-L of exact copies
    assert scores["EI/average"] == pytest.approx(87.5)
    assert scores["GI/knowledge"] == pytest.approx(75.0)
    assert scores["GI/reasoning"] == pytest.approx(0.0)
    assert scores["GI/average"] == pytest.approx(37.5)
    assert scores["GI/MMLU"] == 0.0  # lm-eval's mmlu group over the one MMLU subject asked
    assert report.metrics["gi/mmlu"] == 0.0
    assert scores["EQ-Bench v2/score"] == pytest.approx(100.0)  # the parseable replies are perfect
    assert scores["EQ-Bench v2/parseable"] == 5
    assert scores["EmoBench/EU en"] == pytest.approx(50.0)
    assert scores["EmoBench/EU zh"] == pytest.approx(0.0)
    assert scores["EmoBench/EA en"] == pytest.approx(100.0)
    assert "EmoBench/average" not in scores  # the reference reports no pooled average
    assert scores["EmotionPrompt/GI accuracy (plain)"] == pytest.approx(50.0)  # 3 of 6 GI items
    assert scores["EmotionPrompt/GI accuracy (stimuli)"] == pytest.approx(0.0)
    assert scores["EmotionPrompt/GI accuracy change"] == pytest.approx(-50.0)
    assert scores["EmotionPrompt/inter gate (plain)"] == pytest.approx(0.2)
    assert scores["EmotionPrompt/inter gate change"] == pytest.approx(0.4)
    counts = {f"{row[0]}/{row[1]}": row[3] for row in report.summary.rows}
    assert counts["EI/perception"] == 3 and counts["GI/average"] == 6 and counts["EmoBench/EU en"] == 2
    assert set(report.tables) == {
        "eibench",
        "eibench_aspects",
        "gi",
        "eqbench",
        "emobench",
        "emotion_prompt",
    }
    assert any("1 of 6 replies could not be parsed" in note for note in report.notes)


def test_without_adapters_or_inter_gate_the_probe_says_so() -> None:
    report = build_report(NAMES, make_results(gates=False), {**CONFIG, "adapter": "full"}, {"EP02": "s"})
    assert report.scores["EmotionPrompt/inter gate (plain)"] is None
    row = next(r for r in report.summary.rows if r[1] == "inter gate (plain)")
    assert "no adapters" in row[4]
    assert "| EmotionPrompt | inter gate (plain) | n/a |" in report.to_markdown()
    lora = build_report(NAMES, make_results(), {**CONFIG, "adapter": "lora"}, {"EP02": "s"})
    row = next(r for r in lora.summary.rows if r[1] == "inter gate (plain)")
    assert "no inter gate" in row[4] and "gate 1" in row[4]


def test_report_files_hold_the_same_numbers(tmp_path: Path) -> None:
    report = build_report(NAMES, make_results(), CONFIG, {"EP02": "s"}, limit=20)
    json_path, md_path = report.write(tmp_path)
    assert load_report(json_path).to_dict() == report.to_dict()
    markdown = md_path.read_text(encoding="utf-8")
    assert "checkpoint: runs/x/last.ckpt" in markdown
    assert "| EI | perception | 75.00 | 3 | mean of 2 choice tasks (accuracy) |" in markdown
    assert "5 of 6 parseable" in markdown and "of 171 questions" in markdown
    assert "eval.limit=20" in markdown
    for title in ("## Summary", "## EiBench (EI) tasks", "## GI tasks", "## EQ-Bench v2", "## EmoBench", "## Notes"):
        assert title in markdown
    assert "| backbone.name_or_path | tiny |" in markdown.split("## Configuration")[1]


def test_compare_puts_reports_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    full = build_report(NAMES, make_results(), CONFIG, {"EP02": "s"})
    full.write(tmp_path / "moei")
    gi_only = build_report(["gi"], make_results(), CONFIG, {})
    gi_only.write(tmp_path / "base")
    output = tmp_path / "table.md"
    compare_main([str(tmp_path / "base"), str(tmp_path / "moei" / "report.json"), "--output", str(output)])
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "| suite | measure | base | moei |"
    assert "| GI | average | 37.50 | 37.50 |" in printed
    assert "| EI | perception | - | 75.00 |" in printed
    assert output.read_text(encoding="utf-8") == printed


def test_compare_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report = Report.from_dict(build_report(["gi"], make_results(), CONFIG, {}).to_dict())
    report.write(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        compare_main([str(tmp_path), "--names", "a", "b"])
    assert exit_info.value.code == 2 and "give one per report" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}", encoding="utf-8")
    with pytest.raises(SystemExit):
        compare_main([str(bad)])
    assert f"{bad}: not a report.json" in capsys.readouterr().err


def test_failed_eqbench_run_has_no_score() -> None:
    results = dataclasses.replace(make_results(), eqbench=eqbench_outcome(parseable=4))
    report = build_report(["eqbench"], results, CONFIG, {})
    assert report.scores["EQ-Bench v2/score"] is None
    assert "FAILED" in report.summary.rows[0][4]


def test_metrics_are_snake_case_and_in_report_json(tmp_path: Path) -> None:
    report = build_report(NAMES, make_results(), CONFIG, {"EP02": "This is very important to my career."})
    metrics = report.metrics
    assert metrics["ei/perception"] == report.scores["EI/perception"]
    assert metrics["eq_bench_v2/score"] == report.scores["EQ-Bench v2/score"]
    assert metrics["emobench/eu_en"] == report.scores["EmoBench/EU en"]
    assert "emotionprompt/gi_accuracy_plain" in metrics
    assert all(key == key.lower() and " " not in key for key in metrics)
    json_path, _ = report.write(tmp_path)
    assert load_report(json_path).metrics == metrics
