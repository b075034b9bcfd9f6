"""lm-evaluation-harness through MoEILM, on a local task: HFLM's numbers for a merged LoRA, the project's scorer's
numbers for MoEI (routed from each request's context), the `lm-eval` command's table and results file, and the
`lm_eval` suite of `test` (one process and two ranks)."""

import json
from pathlib import Path

import lightning
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'moei_lightning[lm-eval]')")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import moei_lightning  # noqa: E402
from moei_lightning.backbone import BackboneConfig, load_backbone, load_tokenizer  # noqa: E402
from moei_lightning.callbacks import PaperEvaluation  # noqa: E402
from moei_lightning.cli import main  # noqa: E402
from moei_lightning.data import DataError, EiRecord, Encoder, PromptFormatter  # noqa: E402
from moei_lightning.eval.choices import choice_loglikelihoods  # noqa: E402
from moei_lightning.eval.registry import load_inputs  # noqa: E402
from moei_lightning.eval.suite import Source  # noqa: E402
from moei_lightning.export import export_checkpoint  # noqa: E402
from moei_lightning.lm_eval_model import MoEILM  # noqa: E402
from moei_lightning.runner import generate_texts  # noqa: E402
from tests.conftest import LLAMA_CONFIG, ThreadWorld  # noqa: E402
from tests.test_eval_harness import tiny_harness  # noqa: E402
from tests.test_export import make_checkpoint  # noqa: E402

TASK = "moei_local_mc"
QUESTIONS = [
    ("What do you feel when a friend remembers your birthday?", ["joy", "anger", "fear", "disgust"], 0),
    ("Which city is the capital of France?", ["Paris", "Berlin", "Madrid", "a small village"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten", "four"], 1),
    ("The sky on a clear day is usually", ["green", "blue", "red", "completely black"], 1),
    ("Someone shouts at you for no reason. You feel", ["happy", "calm", "upset", "sleepy"], 2),
    ("Water freezes at", ["100 degrees", "50 degrees", "0 degrees Celsius", "-40 degrees"], 2),
]


def write_task(directory: Path, prompts: list[str]) -> Path:
    """A multiple-choice task over a local JSONL file: each doc's `prompt` is the context, lm-eval's default
    target delimiter (" ") joins it to each choice, and acc / acc_norm are lm-eval's own."""
    directory.mkdir()
    data = directory / "data.jsonl"
    with data.open("w") as out:
        for prompt, (_, choices, answer) in zip(prompts, QUESTIONS):
            out.write(json.dumps({"prompt": prompt, "choices": choices, "answer": answer}) + "\n")
    (directory / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: prompt\n"
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return directory


def evaluate(model: object, tasks: Path) -> tuple[dict[str, float], list[list[float]]]:
    """lm-eval's simple_evaluate: the task's acc and acc_norm, and every doc's choice log-likelihoods."""
    results = lm_eval.simple_evaluate(
        model=model, tasks=[TASK], task_manager=TaskManager(include_path=str(tasks)), log_samples=True
    )
    metrics = results["results"][TASK]
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return {m: metrics[f"{m},none"] for m in ("acc", "acc_norm")}, [[r[0][0] for r in s["resps"]] for s in samples]


def max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-t5"])
def test_lora_scores_as_hflm_on_the_merged_model(preset: str, tmp_path: Path) -> None:
    path, _ = make_checkpoint(tmp_path, "lora", preset)
    adapter = export_checkpoint(path, tmp_path / "moei", "moei")
    merged = export_checkpoint(path, tmp_path / "merged", "merged")
    tasks = write_task(tmp_path / "tasks", [f"Question: {q}\nAnswer:" for q, _, _ in QUESTIONS])
    ours, theirs = MoEILM(adapter=str(adapter), batch_size=4), HFLM(pretrained=str(merged), device="cpu", batch_size=4)
    (our_metrics, our_logprobs), (their_metrics, their_logprobs) = evaluate(ours, tasks), evaluate(theirs, tasks)
    assert our_metrics == their_metrics == {"tiny-llama": {"acc": 1 / 6, "acc_norm": 1 / 6},
                                            "tiny-t5": {"acc": 2 / 6, "acc_norm": 1 / 6}}[preset]  # fmt: skip
    assert max_difference(our_logprobs, their_logprobs) < 1e-4  # measured: 7.6e-6 to 1.5e-5 (merged float32 weights)
    assert len(our_logprobs) == 6 and all(len(row) == 4 for row in our_logprobs)
    documents = [Instance("loglikelihood_rolling", {}, (f"{q} {c[a]}.",), i) for i, (q, c, a) in enumerate(QUESTIONS)]
    rolling = [ours.loglikelihood_rolling(documents), theirs.loglikelihood_rolling(documents)]
    assert max_difference(*([r] for r in rolling)) < 1e-4  # measured: 3.1e-5 of about -170


def test_moei_scores_as_the_projects_scorer_routed_from_the_context(tmp_path: Path) -> None:
    path, _ = make_checkpoint(tmp_path, "molora")
    adapter = export_checkpoint(path, tmp_path / "moei", "moei")
    loaded = moei_lightning.from_pretrained(adapter)
    settings = loaded.prompt
    formatter = PromptFormatter(
        settings["prompt_template"], settings.get("system_prompt"), settings["use_chat_template"], loaded.tokenizer
    )
    records = [
        EiRecord(f"q{i}", "local", "gi", "knowledge", question, "", choices[answer], choices)
        for i, (question, choices, answer) in enumerate(QUESTIONS)
    ]
    prompts = [formatter.format(record) for record in records]  # the run's prompts, chat template included
    tasks = write_task(tmp_path / "tasks", prompts)
    scores = choice_loglikelihoods(loaded.model, Encoder(loaded.tokenizer, formatter, loaded.kind, 512), records)
    expected = {
        "acc": sum(s.predicted_unnormalised == q[2] for s, q in zip(scores, QUESTIONS)) / 6,
        "acc_norm": sum(s.predicted == q[2] for s, q in zip(scores, QUESTIONS)) / 6,
    }
    ours, our_logprobs = evaluate(MoEILM(adapter=str(adapter), batch_size=3), tasks)
    assert ours == expected == {"acc": 2 / 6, "acc_norm": 2 / 6}
    assert max_difference(our_logprobs, [s.logprobs for s in scores]) < 1e-5  # measured: 1.9e-6
    # HFLM alone routes each request from its whole sequence, continuation included: other numbers
    _, whole_sequence = evaluate(HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=3), tasks)
    assert max_difference(whole_sequence, [s.logprobs for s in scores]) > 0.05  # measured: 0.082


def test_generate_until_replies_as_the_projects_generation(tmp_path: Path) -> None:
    adapter = export_checkpoint(make_checkpoint(tmp_path, "molora")[0], tmp_path / "moei")
    lm = MoEILM(adapter=str(adapter), batch_size=2)
    prompts = ["How do you feel today?", "Name the emotion: I lost my keys again and again!"]
    requests = [
        Instance("generate_until", {}, (prompt, {"until": ["<never>"], "max_gen_toks": 8, "do_sample": False}), i)
        for i, prompt in enumerate(prompts)
    ]
    replies = [reply.strip() for reply in lm.generate_until(requests)]
    assert replies == generate_texts(lm.model, lm.tokenizer, "causal", prompts, max_new_tokens=8)
    assert all(replies)


def test_backbone_only_scores_as_hflm_on_the_backbone(tmp_path: Path) -> None:
    path, _ = make_checkpoint(tmp_path, "molora")
    tasks = write_task(tmp_path / "tasks", [f"Question: {q}\nAnswer:" for q, _, _ in QUESTIONS])
    config = BackboneConfig(name_or_path="tiny-llama")
    hflm = HFLM(pretrained=load_backbone(config).eval(), tokenizer=load_tokenizer(config))
    theirs, their_logprobs = evaluate(hflm, tasks)
    for fmt in ("moei", "hf"):
        adapter = export_checkpoint(path, tmp_path / fmt, fmt)
        ours, our_logprobs = evaluate(MoEILM(adapter=str(adapter), adapters=False), tasks)
        assert ours == theirs
        assert max_difference(our_logprobs, their_logprobs) < 1e-5
    merged = export_checkpoint(make_checkpoint(tmp_path, "lora")[0], tmp_path / "merged", "merged")
    with pytest.raises(ValueError, match="lora adapters merged into the weights"):
        MoEILM(adapter=str(merged), adapters=False)


def test_command_prints_lm_evals_table_and_writes_its_results(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, _ = make_checkpoint(tmp_path, "molora")
    adapter = export_checkpoint(path, tmp_path / "moei", "moei")
    tasks = write_task(tmp_path / "tasks", [f"Question: {q}\nAnswer:" for q, _, _ in QUESTIONS])
    expected, _ = evaluate(MoEILM(adapter=str(adapter)), tasks)
    out = tmp_path / "out"
    main(["lm-eval", "--adapter", str(adapter), "--tasks", TASK, "--include_path", str(tasks),
          "--output_path", str(out), "--batch_size", "2", "--limit", "6"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "|acc_norm|" in printed.replace(" ", "") and TASK in printed
    (results_file,) = out.rglob("results_*.json")
    written = json.loads(results_file.read_text())["results"][TASK]
    assert {m: written[f"{m},none"] for m in ("acc", "acc_norm")} == expected


def test_command_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    adapter = export_checkpoint(make_checkpoint(tmp_path, "molora")[0], tmp_path / "moei")
    for directory, message in ((tmp_path, f"error: {tmp_path} is not a directory written by"),
                               (adapter, f"error: Tasks not found: {TASK}")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(["lm-eval", "--adapter", str(directory), "--tasks", TASK, "--include_path", str(tmp_path)])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(message)


def test_the_test_command_runs_lm_eval_tasks_on_the_checkpoint(tmp_path: Path) -> None:
    path, _ = make_checkpoint(tmp_path, "molora")
    adapter = export_checkpoint(path, tmp_path / "moei", "moei")
    tasks = write_task(tmp_path / "tasks", [f"Question: {q}\nAnswer:" for q, _, _ in QUESTIONS])
    expected, _ = evaluate(MoEILM(adapter=str(adapter), batch_size=4), tasks)
    assert expected == {"acc": 1 / 6, "acc_norm": 1 / 6}
    torch.save({**torch.load(path), "pytorch-lightning_version": lightning.__version__}, path)  # as `fit` saves it
    run = tmp_path / "run"
    main(["test", "--config", LLAMA_CONFIG, f"--ckpt_path={path}", f"--run_dir={run}", "--trainer.logger=false",
          "--eval.suites=[lm_eval]", f"--eval.lm_eval_tasks={TASK}", f"--eval.lm_eval_include_path={tasks}",
          "--eval.batch_size=4"])  # fmt: skip
    report = json.loads((run / "report.json").read_text(encoding="utf-8"))
    for metric, value in expected.items():
        assert report["metrics"][f"test/lm_eval/{TASK}/{metric}"] == value  # lm-eval's number, in its unit
    assert [row[0] for row in report["tables"]["lm_eval"]["rows"]] == [TASK, TASK]
    written = json.loads((run / "lm_eval_results.json").read_text(encoding="utf-8"))
    assert {m: written["results"][TASK][f"{m},none"] for m in expected} == expected  # lm-eval's own file
    assert written["n-samples"][TASK]["effective"] == 6 and "lm_eval" in report["config"]["eval"]["suites"]


def test_two_ranks_share_the_requests_and_get_the_one_process_results(tmp_path: Path) -> None:
    tasks = write_task(tmp_path / "tasks", [f"Question: {q}\nAnswer:" for q, _, _ in QUESTIONS])
    evaluation = PaperEvaluation(suites=["lm_eval"], lm_eval_tasks=TASK, lm_eval_include_path=str(tasks))
    (suite,) = evaluation.suites
    single = suite.run(tiny_harness("tiny-llama"), load_inputs([suite], Source())["lm_eval"], {})

    world = ThreadWorld(2)
    harnesses = [tiny_harness("tiny-llama", rank=r, world_size=2, gather=world.gather_for(r)) for r in range(2)]
    calls = [0, 0]
    for rank, harness in enumerate(harnesses):
        harness.runner.model.register_forward_hook(lambda *_, rank=rank: calls.__setitem__(rank, calls[rank] + 1))
    inputs = [load_inputs([suite], Source())["lm_eval"] for _ in range(2)]
    outputs = world.run(lambda rank: suite.run(harnesses[rank], inputs[rank], {}))
    assert calls == [4, 4]  # 24 requests, 12 per rank in batches of 3: the one process runs 8 forwards
    for output in outputs:
        assert output["results"][TASK] == pytest.approx(single["results"][TASK])


def test_lm_eval_settings_errors_name_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"eval.lm_eval_tasks: set to \['arc_easy'\], but lm_eval is not in eval.su"):
        PaperEvaluation(suites=["gi"], lm_eval_tasks="arc_easy")
    with pytest.raises(DataError, match=r"eval.lm_eval_tasks: the lm_eval suite is in eval.suites but lm_eval_tasks"):
        PaperEvaluation(suites=["lm_eval"])
    with pytest.raises(DataError, match=r"eval.lm_eval_include_path: .* is not a folder of lm-eval task YAMLs"):
        PaperEvaluation(suites=["lm_eval"], lm_eval_tasks=TASK, lm_eval_include_path=str(tmp_path / "none"))
    tasks = write_task(tmp_path / "tasks", [q for q, _, _ in QUESTIONS])
    evaluation = PaperEvaluation(
        suites=["lm_eval"], lm_eval_tasks=f"{TASK}, no_such_task", lm_eval_include_path=str(tasks)
    )
    with pytest.raises(DataError, match=r"eval.lm_eval_tasks: lm-eval has no task \['no_such_task'\]"):
        load_inputs(evaluation.suites, Source())
    (tasks / "data.jsonl").unlink()  # a task whose data is gone fails when test starts, not after the other suites
    evaluation = PaperEvaluation(suites=["lm_eval"], lm_eval_tasks=TASK, lm_eval_include_path=str(tasks))
    with pytest.raises(DataError, match=r"eval.lm_eval_tasks: lm-eval could not load \['moei_local_mc'\]"):
        load_inputs(evaluation.suites, Source())
