"""Evaluation inputs: suite loading, config errors that name the key, quick-run limits, EmotionPrompt variants."""

import ast
import json
import types
from dataclasses import replace
from pathlib import Path

import pytest
from lightning.pytorch import Trainer

from moei_lightning.callbacks import PaperEvaluation
from moei_lightning.data import SAMPLES_DIR, DataError, MoEIDataModule, PromptFormatter, load_records
from moei_lightning.eval.eibench import eibench_items
from moei_lightning.eval.emobench import emobench_items
from moei_lightning.eval.emotion_prompt import check_stimuli, probe_items, with_stimulus
from moei_lightning.eval.eqbench import eqbench_questions
from moei_lightning.eval.gi import gi_items
from moei_lightning.eval.registry import SUITES, check_suites
from moei_lightning.eval.scorer import score_rows
from moei_lightning.eval.suite import OpenOutcome, limit_items
from moei_lightning.module import MoEIModule
from tests.conftest import REPO

EI_TEST = str(SAMPLES_DIR / "ei" / "test.jsonl")
GI_TEST = str(SAMPLES_DIR / "gi" / "test.jsonl")


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def gi_record(**overrides) -> dict:
    record = {
        "id": "q1",
        "task": "trivia",
        "domain": "gi",
        "aspect": "knowledge",
        "instruction": "Answer.",
        "input": "Capital of France?",
        "output": "Paris",
        "choices": ["Rome", "Paris"],
    }
    return {**record, **overrides}


def test_eibench_items_split_choice_and_open_tasks() -> None:
    items = eibench_items([EI_TEST], "data.ei_test")
    choice = [i for i in items if i.answer is not None]
    open_items = [i for i in items if i.answer is None]
    assert choice and open_items
    assert all(i.record.choices[i.answer] == i.record.output for i in choice)
    assert {i.group for i in open_items} == {"expression"}
    assert all(i.source == "eibench" for i in items)


def test_open_items_are_scored_in_their_own_language(tmp_path: Path) -> None:
    """A Chinese answer scored with English tokens gets BLEU and ROUGE 0; each item's language is the
    record's ``language`` when given, else detected from its Chinese characters."""
    base = {"task": "reply", "domain": "ei", "aspect": "expression", "instruction": "Respond kindly."}
    records = [
        {**base, "id": "en", "input": "I failed.", "output": "I am sorry to hear that."},
        {**base, "id": "zh", "input": "我考试没考好。", "output": "别难过，下次一定会更好。"},
        {**base, "id": "instruction-only", "instruction": "安慰他。", "input": "", "output": "……"},
        {**base, "id": "said", "input": "Ni hao.", "output": "Ni hao ma", "language": "zh"},
    ]
    items = eibench_items([write_jsonl(tmp_path / "ei.jsonl", records)], "eval.eibench")
    assert {i.record.id: i.language for i in items} == {"en": "en", "zh": "zh", "instruction-only": "zh", "said": "zh"}
    # Each prediction equal to its reference: 100 in both languages, where the English-only scoring gave
    # the Chinese half 0.
    outcomes = [OpenOutcome(i, i.record.output) for i in items[:2]]
    rows = {(r["task"], r["metric"]): r["value"] for r in score_rows([], outcomes)}
    assert rows[("reply", "bleu4")] == pytest.approx(100) and rows[("reply", "rouge_l")] == pytest.approx(100)
    english_only = [OpenOutcome(replace(i, language="en"), i.record.output) for i in items[:2]]
    rows = {(r["task"], r["metric"]): r["value"] for r in score_rows([], english_only)}
    assert rows[("reply", "rouge_l")] == pytest.approx(50)


def test_gi_items_from_jsonl_and_mmlu_csv(tmp_path: Path) -> None:
    csv = tmp_path / "astronomy_test.csv"
    csv.write_text("Which is a planet?,Moon,Mars,Sun,Comet,B\n", encoding="utf-8")
    items = gi_items([GI_TEST], "data.gi_test", {"knowledge": [str(csv)]})
    mmlu = [i for i in items if i.source == "mmlu"]
    assert len(mmlu) == 1 and mmlu[0].task == "astronomy" and mmlu[0].group == "knowledge"
    assert mmlu[0].record.output == "B" and mmlu[0].answer == 1  # the letters are the choices, as in lm-eval
    assert len(items) == 1 + len(Path(GI_TEST).read_text(encoding="utf-8").splitlines())


def test_gi_record_without_choices_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "gi.jsonl", [gi_record(), gi_record(id="q2", choices=None)])
    with pytest.raises(DataError, match=rf"{path}:2: field 'choices'.*eval.gi"):
        gi_items([path], "eval.gi", {})


def test_record_of_the_wrong_domain_names_the_config_key(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [gi_record()])
    with pytest.raises(DataError, match=rf"{path}:1: field 'domain'.*data.ei_test"):
        eibench_items([path], "data.ei_test")


def test_mmlu_csv_errors_name_the_config_key(tmp_path: Path) -> None:
    csv = tmp_path / "x.csv"
    csv.write_text("q,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"eval.gi_mmlu_csv: 'maths' is not a GI dimension"):
        gi_items([], "eval.gi", {"maths": [str(csv)]})
    with pytest.raises(DataError, match=rf"{csv}:1: answer 'E'.*eval.gi_mmlu_csv"):
        gi_items([], "eval.gi", {"reasoning": [str(csv)]})
    with pytest.raises(FileNotFoundError, match=r"eval.gi_mmlu_csv: file .*missing.csv not found"):
        gi_items([], "eval.gi", {"reasoning": [str(tmp_path / "missing.csv")]})
    csv.write_text("q,a,b,c,d,A\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"1-shot needs the subject's dev split.*gi_mmlu_csv; eval.mmlu_num_fewshot: 1"):
        gi_items([], "eval.gi", {"reasoning": [str(csv)]}, mmlu_num_fewshot=1)
    with pytest.raises(DataError, match=r"config key eval.mmlu_num_fewshot: expected 0 or more examples, got -1"):
        PaperEvaluation(suites=["gi"], mmlu_num_fewshot=-1)


def test_missing_benchmark_files_name_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"eval.emobench_dir"):
        emobench_items(str(tmp_path / "nowhere"), ["en"])
    with pytest.raises(FileNotFoundError, match=r"eval.eqbench_questions"):
        eqbench_questions(str(tmp_path / "questions.json"), None)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(DataError, match=r"eval.eqbench_questions"):
        eqbench_questions(str(bad), None)


def test_real_benchmarks_load_with_limits(shared_data: Path) -> None:
    questions = eqbench_questions(str(shared_data / "eq-bench" / "eq_bench_v2_questions_171.json"), 5)
    assert questions.available == 171 and list(questions.questions) == ["1", "2", "3", "4", "5"]
    items = emobench_items(str(shared_data / "emobench"), ["en", "zh"])
    assert len(items) == 800
    limited = limit_items(items, 3)
    assert len(limited) == 3 * 2 * 2  # two tasks, two languages
    assert {(i.task, i.language) for i in limited} == {(t, lang) for t in ("EU", "EA") for lang in ("en", "zh")}
    assert limit_items(items, None) is items


def test_suite_names_are_checked() -> None:
    assert check_suites(["emobench", "gi"]) == ["gi", "emobench"]
    with pytest.raises(DataError, match=r"eval.suites: unknown suite\(s\) \['mmlu'\]"):
        check_suites(["mmlu"])
    with pytest.raises(DataError, match=r"listed twice"):
        check_suites(["gi", "gi"])
    with pytest.raises(DataError, match=r"emotion_prompt reads the items and outcomes of \['gi'\]; list them"):
        check_suites(["emotion_prompt"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"suites": ["eqbench"]}, "eval.eqbench_questions: the eqbench suite is in eval.suites"),
        ({"suites": ["emobench"]}, "eval.emobench_dir: the emobench suite is in eval.suites"),
        ({"suites": ["gi", "emotion_prompt"]}, "eval.emotion_prompt_stimuli: the emotion_prompt suite needs"),
        ({"batch_size": 0}, "eval.batch_size: expected a positive integer"),
        ({"limit": 0}, "eval.limit: expected a positive integer"),
        ({"emotion_prompt_stimuli": {"EP1": " "}}, "eval.emotion_prompt_stimuli: entry 'EP1'"),
    ],
)
def test_callback_config_errors_name_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        PaperEvaluation(**kwargs)


def test_without_suites_the_callback_loads_nothing() -> None:
    callback = PaperEvaluation()
    callback.setup(trainer=None, pl_module=None, stage="test")
    assert callback.names == [] and callback.inputs is None


def test_stimulus_goes_after_the_instruction_and_before_the_answer_cue() -> None:
    item = gi_items([GI_TEST], "data.gi_test", {})[0]
    stimulus = "This is very important to my career."
    variant = with_stimulus(item, "EP02", stimulus)
    assert variant.variant == "EP02" and variant.record.id == f"{item.record.id}#EP02"
    assert variant.answer == item.answer and variant.record.choices == item.record.choices
    prompt = PromptFormatter().format(variant.record)
    assert prompt.index(stimulus) < prompt.index(item.record.input) < prompt.index("Answer:")
    assert prompt.startswith(f"{item.record.instruction} {stimulus}")


def test_probe_items_cover_every_item_under_every_stimulus() -> None:
    items = gi_items([GI_TEST], "data.gi_test", {})
    stimuli = check_stimuli({"EP02": " This is very important to my career. ", "EP04": "Are you sure?"})
    assert stimuli["EP02"] == "This is very important to my career."
    variants = probe_items(items, stimuli)
    assert len(variants) == 2 * len(items)
    assert [v.variant for v in variants] == ["EP02"] * len(items) + ["EP04"] * len(items)
    assert len({v.record.id for v in variants}) == len(variants)


def docs_example_suite() -> types.ModuleType:
    """The example suite of docs/evaluation.md ("Adding a suite"), as a module."""
    text = (REPO / "docs" / "evaluation.md").read_text(encoding="utf-8").split("## Adding a suite", 1)[1]
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    module = types.ModuleType("ei_validation")
    exec(compile(code, "docs/evaluation.md", "exec"), module.__dict__)
    return module


def test_a_new_suite_is_one_module_and_one_registry_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    suite = docs_example_suite().EiValidation
    monkeypatch.setitem(SUITES, suite.name, suite)
    evaluation = PaperEvaluation(suites=["gi", "ei_val"], limit=2)
    assert evaluation.names == ["gi", "ei_val"]  # registry order
    trainer = Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[evaluation], default_root_dir=tmp_path
    )
    trainer.test(MoEIModule(), MoEIDataModule(max_length=128), verbose=False)
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    rows = {row[5]: row for row in report["summary"]["rows"]}
    choices = [json.loads(line) for line in (tmp_path / "choices.jsonl").read_text(encoding="utf-8").splitlines()]
    mine = [c for c in choices if c["suite"] == "ei_val"]
    assert mine and {c["task"] for c in mine} <= {r.task for r in load_records([SAMPLES_DIR / "ei" / "val.jsonl"])}
    for metric in ("acc", "acc_norm"):
        right = sum(c[metric] for c in mine)
        assert rows[f"test/ei_validation/{metric}"][:4] == ["EI validation", metric, 100 * right / len(mine), len(mine)]
        assert report["metrics"][f"test/ei_validation/{metric}"] == pytest.approx(100 * right / len(mine))
    assert "test/gi/avg" in report["metrics"]  # the shipped suites report beside it


def test_eval_imports_neither_lightning_nor_callbacks() -> None:
    """The evaluation is plain Python over a model runner; its Lightning side lives in callbacks/."""
    for path in (REPO / "moei_lightning" / "eval").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert not name.startswith(("lightning", "pytorch_lightning", "moei_lightning.callbacks")), (path, name)
