"""The report from hand-made outcomes: every number checked, both files written, reports compared side by side."""

import dataclasses
import itertools
from pathlib import Path

import pytest

from moei_lightning.callbacks import PaperEvaluation
from moei_lightning.callbacks.fit_summary import _change, score_records, summary_markdown
from moei_lightning.data import EiRecord
from moei_lightning.eval.choices import ChoiceScores
from moei_lightning.eval.compare import main as compare_main
from moei_lightning.eval.eibench import EiBenchOutcomes
from moei_lightning.eval.emobench import EmoBenchItem, EmoBenchOutcome
from moei_lightning.eval.emobench import Question as EmoQuestion
from moei_lightning.eval.emotion_prompt import ProbeOutcomes
from moei_lightning.eval.eqbench import EqBenchOutcome, EqBenchQuestions, Question, score_responses
from moei_lightning.eval.harness import Results
from moei_lightning.eval.registry import build_report, suite_rows
from moei_lightning.eval.report import Report, load_report
from moei_lightning.eval.scorer import row_key, score_rows
from moei_lightning.eval.suite import ChoiceOutcome, Item, OpenOutcome

NAMES = ["eibench", "gi", "eqbench", "emobench", "emotion_prompt"]
CONFIG = {"checkpoint": "runs/x/last.ckpt", "backbone": {"name_or_path": "tiny"}, "adapter": "molora", "data": {}}
REFERENCE = {"Angry": 7, "Calm": 0, "Proud": 3, "Scared": 5}
IDS = itertools.count()


def choice(
    source: str,
    task: str,
    group: str,
    correct: bool,
    language: str = "en",
    gate: float | None = None,
    acc_correct: bool | None = None,
) -> ChoiceOutcome:
    """An outcome right or wrong by acc_norm, and by acc as ``acc_correct`` says (default: the same)."""
    domain = "gi" if source in ("gi", "mmlu") else "ei"
    record = EiRecord(id=f"{task}-{next(IDS)}", task=task, domain=domain, aspect=group, instruction="i",
                      input="x", output="bb", choices=["a", "bb", "cccc"])  # fmt: skip
    if acc_correct is None or acc_correct == correct:
        logprobs, chars = [-1.0 if i == (1 if correct else 0) else -5.0 for i in range(3)], [1, 1, 1]
    elif correct:  # per character "bb" wins (-1 / 2), summed "a" wins (-0.9)
        logprobs, chars = [-0.9, -1.0, -9.0], [1, 2, 4]
    else:  # per character "cccc" wins (-1.2 / 4), summed "bb" wins (-1.0)
        logprobs, chars = [-9.0, -1.0, -1.2], [1, 2, 4]
    item = Item(source, task, group, language, record, answer=1)
    outcome = ChoiceOutcome(item, ChoiceScores(logprobs, [1, 1, 1], chars), gate)
    assert outcome.correct("acc_norm") == correct and outcome.correct("acc") == (
        correct if acc_correct is None else acc_correct
    )
    return outcome


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


def build(
    names: list[str],
    outcomes: dict,
    config: dict = CONFIG,
    stimuli: dict[str, str] | None = None,
    limit: int | None = None,
    protocol: str = "generate",
) -> Report:
    """The report of ``names`` over hand-made outcomes, as the ``test`` evaluation builds it."""
    suites = PaperEvaluation(
        suites=names,
        eqbench_questions="q.json",
        emobench_dir="emobench",
        emobench_protocol=protocol,
        emotion_prompt_stimuli=stimuli or {"EP02": "s"},
        limit=limit,
    ).suites
    results = Results({suite.name: outcomes[suite.name] for suite in suites})
    return build_report(suites, results, suite_rows(suites, results), config, limit)


def make_results(gates: bool = True) -> dict:
    plain_gate, stimulus_gate = (0.2, 0.6) if gates else (None, None)
    gi = [choice("gi", "trivia", "knowledge", c, gate=plain_gate) for c in (True, True, True, False)]
    gi += [choice("mmlu", "formal_logic", "reasoning", False, gate=plain_gate) for _ in range(2)]
    probe = [dataclasses.replace(o, item=dataclasses.replace(o.item, variant="EP02"), gate=stimulus_gate) for o in gi]
    for outcome in probe:
        outcome.scores = ChoiceScores([-1.0, -5.0, -5.0], [1, 1, 1], [1, 1, 1])  # every answer wrong now
    eibench = [
        choice("eibench", "polarity", "perception", True),
        choice("eibench", "polarity", "perception", False, acc_correct=True),
        choice("eibench", "intensity", "perception", True, acc_correct=False),
    ]
    return {
        "eibench": EiBenchOutcomes(eibench, [open_outcome("reply", "thank you so much", "thank you so much")] * 2),
        "gi": gi,
        "eqbench": eqbench_outcome(),
        "emobench": [
            emobench_outcome("EU", "complex", "en", True),
            emobench_outcome("EU", "complex", "en", False),
            emobench_outcome("EU", "complex", "zh", False),
            emobench_outcome("EA", "Social-Self", "en", True),
        ],
        "emotion_prompt": ProbeOutcomes(gi, probe),
    }


def test_summary_numbers() -> None:
    report = build(NAMES, make_results(), stimuli={"EP02": "This is very important to my career."})
    scores = report.scores
    assert scores["EI/perception"] == pytest.approx(200 / 3)  # acc_norm over the items: tasks 1 of 2 and 1 of 1
    assert scores["EI/expression"] == pytest.approx(100.0)  # ROUGE-L of exact copies
    assert scores["EI/average"] == pytest.approx((3 * 200 / 3 + 2 * 100.0) / 5)  # weighted by the aspects' items
    assert scores["EI/acc"] == pytest.approx(200 / 3)  # by summed log-likelihood: tasks 2 of 2 and 0 of 1
    assert scores["EI/acc_norm"] == pytest.approx(200 / 3)
    assert report.tables["eibench"].rows[0][:6] == ["intensity", "perception", "choice", 1, 0.0, 100.0]
    assert report.tables["eibench"].rows[1][:6] == ["polarity", "perception", "choice", 2, 100.0, 50.0]
    assert scores["GI/knowledge"] == pytest.approx(75.0)
    assert scores["GI/reasoning"] == pytest.approx(0.0)
    assert scores["GI/average"] == pytest.approx(50.0)  # 3 of 6 GI items
    assert scores["GI/MMLU"] == 0.0  # lm-eval's mmlu group over the one MMLU subject asked
    assert report.metrics["test/gi/mmlu"] == 0.0
    assert scores["EQ-Bench v2/score"] == pytest.approx(100.0)  # the parseable replies are perfect
    assert scores["EQ-Bench v2/parseable"] == 5
    assert scores["EmoBench/EU en"] == pytest.approx(50.0)
    assert scores["EmoBench/EU zh"] == pytest.approx(0.0)
    assert scores["EmoBench/EA en"] == pytest.approx(100.0)
    assert "EmoBench/average" not in scores  # the reference reports no pooled average
    for metric in ("acc", "acc_norm"):
        assert scores[f"EmotionPrompt/GI {metric} (plain)"] == pytest.approx(50.0)  # 3 of 6 GI items
        assert scores[f"EmotionPrompt/GI {metric} (stimuli)"] == pytest.approx(0.0)
        assert scores[f"EmotionPrompt/GI {metric} change"] == pytest.approx(-50.0)
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
    report = build(NAMES, make_results(gates=False), {**CONFIG, "adapter": "full"})
    assert report.scores["EmotionPrompt/inter gate (plain)"] is None
    row = next(r for r in report.summary.rows if r[1] == "inter gate (plain)")
    assert "no adapters" in row[4]
    assert "| EmotionPrompt | inter gate (plain) | n/a |" in report.to_markdown()
    lora = build(NAMES, make_results(), {**CONFIG, "adapter": "lora"})
    row = next(r for r in lora.summary.rows if r[1] == "inter gate (plain)")
    assert "no inter gate" in row[4] and "gate 1" in row[4]


def test_report_files_hold_the_same_numbers(tmp_path: Path) -> None:
    report = build(NAMES, make_results(), limit=20)
    json_path, md_path = report.write(tmp_path)
    assert load_report(json_path).to_dict() == report.to_dict()
    markdown = md_path.read_text(encoding="utf-8")
    assert "checkpoint: runs/x/last.ckpt" in markdown
    row = "| EI | perception | 66.67 | 3 | size-weighted mean of 2 choice tasks (acc_norm) | test/ei/perception/score |"
    assert row in markdown
    assert "5 of 6 parseable" in markdown and "of 171 questions" in markdown
    assert "eval.limit=20" in markdown
    for title in ("## Summary", "## EiBench (EI) tasks", "## GI tasks", "## EQ-Bench v2", "## EmoBench", "## Notes"):
        assert title in markdown
    assert "| backbone.name_or_path | tiny |" in markdown.split("## Configuration")[1]


def test_compare_puts_reports_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    full = build(NAMES, make_results())
    full.write(tmp_path / "moei")
    gi_only = build(["gi"], make_results())
    gi_only.write(tmp_path / "base")
    output = tmp_path / "table.md"
    compare_main([str(tmp_path / "base"), str(tmp_path / "moei" / "report.json"), "--output", str(output)])
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "| suite | measure | base | moei |"
    assert "| GI | average | 50.00 | 50.00 |" in printed
    assert "| EI | perception | - | 66.67 |" in printed
    assert output.read_text(encoding="utf-8") == printed


def test_compare_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report = Report.from_dict(build(["gi"], make_results()).to_dict())
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
    report = build(["eqbench"], {"eqbench": eqbench_outcome(parseable=4)})
    assert report.scores["EQ-Bench v2/score"] is None
    assert "FAILED" in report.summary.rows[0][4]


def test_report_keys_are_the_logged_keys(tmp_path: Path) -> None:
    """The report's keys are the ones the test run logs: the EI/GI rows' keys, and test/<suite>/<measure>."""
    outcomes = make_results()
    report = build(NAMES, outcomes, stimuli={"EP02": "This is very important to my career."})
    metrics = report.metrics
    eibench = outcomes["eibench"]
    rows = score_rows(eibench.choice + outcomes["gi"], eibench.open)
    logged = {row_key("test", r): r["value"] for r in rows}
    ei_gi = {key: value for key, value in metrics.items() if key.startswith(("test/ei/", "test/gi/"))}
    assert ei_gi.pop("test/gi/mmlu") == 0.0  # lm-eval's mmlu group score: the report's own, logged by the callback
    assert ei_gi == {key: logged[key] for key in ei_gi}  # every EI/GI summary number under its logged key
    assert set(ei_gi) == {
        *(f"test/ei/{aspect}/score" for aspect in ("perception", "expression")),
        *(f"test/gi/{dimension}/score" for dimension in ("knowledge", "reasoning")),
        *(f"test/{domain}/{metric}" for domain in ("ei", "gi") for metric in ("avg", "acc", "acc_norm")),
    }
    assert metrics["test/ei/avg"] == report.scores["EI/average"]
    assert metrics["test/eq_bench_v2/score"] == report.scores["EQ-Bench v2/score"]
    assert metrics["test/emobench/eu_en"] == report.scores["EmoBench/EU en"]
    assert "test/emotionprompt/gi_acc_norm_plain" in metrics and "test/emotionprompt/gi_acc_plain" in metrics
    assert all(key == key.lower() and " " not in key for key in metrics)
    assert [row[5] for row in report.summary.rows] == list(metrics)  # one key per summary row, none shared
    json_path, _ = report.write(tmp_path)
    assert load_report(json_path).metrics == metrics


class AnsweringHarness:
    """Stands in for the model of the fit summary: answers every record as its outcome says, reads no gate."""

    def __init__(self, outcomes: list[ChoiceOutcome]) -> None:
        self.scores = {o.item.record.id: o.scores for o in outcomes}

    def choices(self, items: list[Item], suite: str) -> list[ChoiceOutcome]:
        return [ChoiceOutcome(item, self.scores[item.record.id]) for item in items]

    def gates(self, records: list[EiRecord]) -> list[float | None]:
        return [None] * len(records)


def test_one_averaging_rule_on_unbalanced_tasks() -> None:
    """A task of 1 item beside one of 9: the fit summary, the report and the logged rows all pool the items."""
    ei = [choice("eibench", "single", "perception", True)]
    ei += [choice("eibench", "many", "perception", i == 0, acc_correct=i < 3) for i in range(9)]
    ei += [choice("eibench", "cause", "cognition", True) for _ in range(2)]
    gi = [choice("gi", "capitals", "knowledge", True)] + [choice("gi", "math", "reasoning", False) for _ in range(9)]
    report = build(["eibench", "gi"], {"eibench": EiBenchOutcomes(ei), "gi": gi})
    scores = report.scores
    assert scores["EI/perception"] == pytest.approx(20.0)  # 2 of 10 items, where the mean of tasks is 55.6
    assert scores["EI/average"] == pytest.approx(100 * 4 / 12)  # 4 of 12 items
    assert scores["EI/acc"] == pytest.approx(100 * 6 / 12)  # 1 + 3 + 2 of 12 by summed log-likelihood
    assert scores["GI/average"] == pytest.approx(10.0)  # 1 of 10, where the mean of dimensions is 50
    summary = score_records(AnsweringHarness(ei + gi), [o.item.record for o in ei + gi])
    assert summary["ei"]["acc"] == pytest.approx({"perception": 40.0, "cognition": 100.0, "avg": 50.0})
    assert summary["ei"]["acc_norm"] == pytest.approx({"perception": 20.0, "cognition": 100.0, "avg": 100 * 4 / 12})
    assert summary["gi"]["acc_norm"] == pytest.approx({"knowledge": 100.0, "reasoning": 0.0, "avg": 10.0})
    assert (summary["counts_ei"], summary["n_gi"]) == ({"perception": 10, "cognition": 2}, 10)
    for domain in ("ei", "gi"):  # the fit summary's numbers are the report's, key for key
        for metric in ("acc", "acc_norm"):
            assert report.metrics[f"test/{domain}/{metric}"] == pytest.approx(summary[domain][metric]["avg"])
        assert report.metrics[f"test/{domain}/avg"] == pytest.approx(summary[domain]["acc_norm"]["avg"])
    assert report.metrics["test/ei/perception/score"] == pytest.approx(summary["ei"]["acc_norm"]["perception"])
    blank = {**summary, "ei": {m: dict.fromkeys(v, 0.0) for m, v in summary["ei"].items()}}
    fit = {
        "primary_metric": {"ei": "acc_norm", "gi": "acc_norm"},
        "splits": {"val": {"before": blank, "after": summary, "change": _change(blank, summary)}},
        "started_from": "the backbone",
        "adapter": "molora",
        "trainable_parameters": 1,
        "total_parameters": 10,
        "run_dir": "runs/x",
        "checkpoint": None,
    }
    markdown = summary_markdown(fit)
    assert "| | acc_norm before | after | change | acc before | after | change |" in markdown
    assert "| EI perception | 0.0 | 20.0 | +20.0 | 0.0 | 40.0 | +40.0 |" in markdown
    assert "| GI average (n=10) | 10.0 | 10.0 | +0.0 | 10.0 | 10.0 | +0.0 |" in markdown


def test_emobench_by_log_likelihood_reports_both_accuracies() -> None:
    outcomes = [
        EmoBenchOutcome(item.item, item.answers, by_metric={"acc": ["B"], "acc_norm": item.answers})
        for item in (emobench_outcome("EA", "Social-Self", "en", correct) for correct in (True, False))
    ]
    report = build(["emobench"], {"emobench": outcomes}, protocol="loglikelihood")
    table = report.tables["emobench"]
    assert table.columns == ["task", "language", "category", "n", "acc", "acc_norm"]
    assert table.rows[-1] == ["EA", "en", "Overall", 2, 100.0, 50.0]  # acc: "B", right twice; acc_norm: once
    assert report.metrics["test/emobench/ea_en"] == 50.0
