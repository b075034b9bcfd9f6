"""`python -m moei_lightning test` with an eval config, as a user runs it: reports, W&B tables, checkpoints, DDP."""

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from moei_lightning.callbacks import PaperEvaluation
from moei_lightning.callbacks.stats_files import METRICS_FILE, read_rows
from moei_lightning.data import MoEIDataModule
from moei_lightning.module import MoEIModule
from tests.conftest import EVAL_CONFIG, LLAMA_CONFIG, REPO, T5_CONFIG, run_cli

TABLES = {"eibench", "eibench_aspects", "gi", "eqbench", "emobench", "emotion_prompt"}
SUITE_LABELS = {"EI", "GI", "EQ-Bench v2", "EmoBench", "EmotionPrompt"}


def eval_args(shared_data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "test",
        "--config",
        LLAMA_CONFIG,
        "--config",
        EVAL_CONFIG,
        f"--eval.eqbench_questions={shared_data / 'eq-bench' / 'eq_bench_v2_questions_171.json'}",
        f"--eval.emobench_dir={shared_data / 'emobench'}",
        f"--run_dir={run_dir}",
        *extra,
    ]


@pytest.mark.slow
def test_test_command_reports_every_configured_suite(shared_data: Path, tmp_path: Path) -> None:
    csv = tmp_path / "astronomy_test.csv"
    csv.write_text("Which is a planet?,Moon,Mars,Sun,Comet,B\nWhat orbits Earth?,Moon,Mars,Sun,Venus,A\n")
    run_dir = tmp_path / "run"
    mmlu = f'--eval.gi_mmlu_csv={{"knowledge": ["{csv}"]}}'
    result = run_cli(*eval_args(shared_data, run_dir, mmlu, "--eval.limit=10"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    assert {row[0] for row in report["summary"]["rows"]} == SUITE_LABELS
    assert set(report["tables"]) == TABLES
    assert report["tables"]["gi"]["rows"][0][:4] == ["astronomy", "knowledge", "MMLU CSV", 2]
    assert report["config"]["checkpoint"].startswith("none")
    # A random tiny model parses no EQ-Bench reply: counted and shown, and the run still succeeds.
    assert report["scores"]["EQ-Bench v2/parseable"] == 0
    markdown = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "0 of 10 parseable" in markdown and "first 10 of 171 questions" in markdown
    assert "10 of 10 replies could not be parsed" in markdown

    replies = run_dir / "eqbench_replies.json"
    written = json.loads(replies.read_text(encoding="utf-8"))
    assert (written["revise"], len(written["raw_results"]["1"]["raw_inference"])) == (False, 10)
    assert written["raw_results"]["1"]["attempts"] == dict.fromkeys(written["raw_results"]["1"]["raw_inference"], 3)
    questions = shared_data / "eq-bench" / "eq_bench_v2_questions_171.json"
    rescored = subprocess.run(
        [sys.executable, "-m", "moei_lightning.eval.eqbench", str(replies), "--questions", str(questions)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(rescored.stdout)["parseable"] == 0
    assert report["scores"]["EQ-Bench v2/score"] is None  # failed: under 83.33 % parseable
    # One set of numbers: the test metrics logged are the report's EI/GI rows, in percent.
    logged_rows = {r["key"]: r["value"] for r in read_rows(run_dir, METRICS_FILE) if r["stage"] == "test"}
    assert logged_rows["test/ei/avg"] == pytest.approx(report["scores"]["EI/average"])
    assert logged_rows["test/gi/avg"] == pytest.approx(report["scores"]["GI/average"])
    ei_gi = {k: v for k, v in report["metrics"].items() if k.startswith(("test/ei/", "test/gi/"))}
    assert ei_gi.pop("test/gi/mmlu") == report["scores"]["GI/MMLU"]  # lm-eval's mmlu group: no scorer row
    assert {"test/ei/avg", "test/ei/acc", "test/ei/acc_norm", "test/gi/knowledge/score"} <= set(ei_gi)
    assert ei_gi == pytest.approx({key: logged_rows[key] for key in ei_gi})  # the report's keys are the logged ones
    choices = [json.loads(line) for line in (run_dir / "choices.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {c["suite"] for c in choices} == {"eibench", "gi", "emotion_prompt"}
    assert all(len(c["loglikelihoods"]) == len(c["chars"]) and {c["acc"], c["acc_norm"]} <= {0, 1} for c in choices)
    assert len((run_dir / "emobench_replies.jsonl").read_text(encoding="utf-8").splitlines()) == 40
    assert len((run_dir / "generations.jsonl").read_text(encoding="utf-8").splitlines()) == 18

    tables = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "files" / "media" / "table" / "eval" / "*.json"))
    logged = {Path(t).name.rsplit("_", 2)[0]: json.loads(Path(t).read_text()) for t in tables}
    assert set(logged) == TABLES | {"summary"}
    assert logged["summary"]["columns"] == report["summary"]["columns"]
    assert [row[:2] for row in logged["summary"]["data"]] == [row[:2] for row in report["summary"]["rows"]]


@pytest.mark.slow
def test_a_checkpoint_is_evaluated_with_its_trained_adapters(tmp_path: Path) -> None:
    seed_everything(0)
    trainer = Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    trainer.fit(MoEIModule(), MoEIDataModule(batch_size=8, max_length=128))
    checkpoint = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(checkpoint)

    def evaluate(ckpt_path: Path | None, name: str) -> dict:
        seed_everything(0)
        callback = PaperEvaluation(suites=["gi", "emotion_prompt"], emotion_prompt_stimuli={"EP04": "Are you sure?"})
        tester = Trainer(
            accelerator="cpu",
            logger=False,
            callbacks=[callback],
            enable_progress_bar=False,
            default_root_dir=tmp_path / name,
        )
        tester.test(MoEIModule(), MoEIDataModule(max_length=128), ckpt_path=ckpt_path, verbose=False)
        return json.loads((tmp_path / name / "report.json").read_text(encoding="utf-8"))

    trained, bare = evaluate(checkpoint, "trained"), evaluate(None, "bare")
    assert trained["config"]["checkpoint"] == str(checkpoint)
    gate = "EmotionPrompt/inter gate (plain)"
    assert trained["scores"][gate] != pytest.approx(bare["scores"][gate], abs=1e-6)  # the adapters were loaded
    weights = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert weights and all("base_layer" not in key for key in weights)


STRATEGY_CONF = REPO / "conf" / "strategy"
STRATEGIES = {  # under FSDP every forward is a collective, and FSDP1 keeps the root unit's weights flat
    "ddp": ["--trainer.strategy=ddp"],
    "fsdp2": ["--config", str(STRATEGY_CONF / "fsdp2.yaml")],
    "fsdp": ["--config", str(STRATEGY_CONF / "fsdp.yaml"), "--trainer.precision=32-true"],
}


@pytest.mark.slow
def test_two_processes_give_the_one_process_report(shared_data: Path, tmp_path: Path) -> None:
    """DDP, FSDP2 and FSDP1 (where their configs exist) on two CPU processes, against one process."""
    quick = ["--eval.limit=4", "--trainer.logger=false", "--eval.suites=[eibench,gi,eqbench,emotion_prompt]"]
    quick += ["--ei_metrics.stages=[]", "--router_stats.stages=[]"]  # other callbacks, not under test here
    one = run_cli(*eval_args(shared_data, tmp_path / "one", *quick), cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    expected = json.loads((tmp_path / "one" / "report.json").read_text())["scores"]
    strategies = [s for s, args in STRATEGIES.items() if "--config" not in args or Path(args[1]).is_file()]
    for strategy in strategies:
        two_args = eval_args(shared_data, tmp_path / strategy, *quick, "--trainer.devices=2", *STRATEGIES[strategy])
        two = run_cli(*two_args, cwd=tmp_path)
        assert two.returncode == 0, (strategy, two.stderr[-3000:])
        report = json.loads((tmp_path / strategy / "report.json").read_text())
        assert report["config"]["trainer"]["world_size"] == 2
        assert report["scores"].keys() == expected.keys()
        for key, value in expected.items():
            assert report["scores"][key] == pytest.approx(value, abs=1e-4), (strategy, key)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_seq2seq_under_fsdp2_gives_the_one_process_report(tmp_path: Path) -> None:
    """T5's generate() calls the encoder outside the root's forward; under FSDP2 the root is gathered for it."""
    base = [
        "test",
        "--config",
        T5_CONFIG,
        "--config",
        EVAL_CONFIG,
    ]
    base += ["--eval.limit=2", "--eval.suites=[eibench,gi]", "--ei_metrics.stages=[]", "--router_stats.stages=[]"]
    base += ["--trainer.logger=false"]
    one = run_cli(*base, f"--run_dir={tmp_path / 'one'}", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    fsdp2 = ["--config", str(STRATEGY_CONF / "fsdp2.yaml"), "--trainer.devices=2", f"--run_dir={tmp_path / 'two'}"]
    two = run_cli(*base, *fsdp2, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    expected = json.loads((tmp_path / "one" / "report.json").read_text())["scores"]
    scores = json.loads((tmp_path / "two" / "report.json").read_text())["scores"]
    assert scores.keys() == expected.keys()
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value, abs=1e-4), key
