"""Progress over the evaluation suites: one line per suite in a log, a task on a Rich bar, nothing off rank 0."""

import re
from types import SimpleNamespace

import pytest
import torch
from rich.progress import Progress

from moei_lightning.backbone import BackboneConfig
from moei_lightning.callbacks import PaperEvaluation
from moei_lightning.callbacks.progress import MoEIProgressBar, SuiteProgress
from moei_lightning.data import SAMPLES_DIR, Encoder, PromptFormatter
from moei_lightning.eval.eibench import eibench_items
from moei_lightning.eval.gi import gi_items
from moei_lightning.eval.harness import Harness
from moei_lightning.eval.suite import Source, Suite
from moei_lightning.module import MoEIModule
from moei_lightning.runner import ModelRunner


@pytest.fixture(scope="module")
def harness() -> Harness:
    torch.manual_seed(0)
    module = MoEIModule(backbone=BackboneConfig(name_or_path="tiny-llama"))
    module.configure_model()
    module.eval()
    encoder = Encoder(module.tokenizer, PromptFormatter(tokenizer=module.tokenizer), module.kind, 256)
    return Harness(ModelRunner(module.model, module.tokenizer, module.kind, batch_size=4), encoder)


def inputs() -> tuple[list[Suite], dict]:
    evaluation = PaperEvaluation(
        suites=["eibench", "gi", "emotion_prompt"], max_new_tokens=2, emotion_prompt_stimuli={"EP02": "Be sure."}
    )
    eibench = eibench_items([str(SAMPLES_DIR / "ei" / "test.jsonl")], "data.ei_test")
    items = [i for i in eibench if i.answer is not None][:3] + [i for i in eibench if i.answer is None][:2]
    gi = gi_items([str(SAMPLES_DIR / "gi" / "test.jsonl")], "data.gi_test", {})[:4]
    probe = evaluation.suites[2].load(Source(), {"gi": gi})
    return evaluation.suites, {"eibench": items, "gi": gi, "emotion_prompt": probe}


def trainer(bar: object, rank_zero: bool = True) -> SimpleNamespace:
    return SimpleNamespace(progress_bar_callback=bar, is_global_zero=rank_zero)


def test_a_log_gets_a_line_as_each_suite_starts_and_ends(harness: Harness, capsys: pytest.CaptureFixture) -> None:
    with torch.no_grad():
        harness.run(*inputs(), SuiteProgress(trainer(MoEIProgressBar(lines=True)), 3))
    lines = capsys.readouterr().out.splitlines()
    expected = [
        r"eval 1/3 eibench: 5 items",
        r"eval 1/3 eibench: done in 0:00:\d\d",
        r"eval 2/3 gi: 4 items",
        r"eval 2/3 gi: done in 0:00:\d\d",
        r"eval 3/3 emotion_prompt: 8 items",
        r"eval 3/3 emotion_prompt: done in 0:00:\d\d",
        r"eval: 3 suites in 0:00:\d\d",
    ]
    assert len(lines) == len(expected) and all(re.fullmatch(e, line) for e, line in zip(expected, lines)), lines


def test_a_rich_bar_gets_a_task_over_the_suites(capsys: pytest.CaptureFixture) -> None:
    bar = MoEIProgressBar(lines=False)
    bar.progress = Progress(disable=True)
    progress = SuiteProgress(trainer(bar), 2)
    progress.start("gi", 10)
    assert bar.progress.tasks[0].description == "eval gi (10 items)" and bar.progress.tasks[0].completed == 0
    progress.start("emobench", 4)
    progress.close()
    assert (bar.progress.tasks[0].completed, bar.progress.tasks[0].total) == (2, 2)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("bar", [None, MoEIProgressBar(lines=True, refresh_rate=0)])
def test_silent_without_a_bar_or_off_rank_zero(bar: object, capsys: pytest.CaptureFixture) -> None:
    for progress in (SuiteProgress(trainer(bar), 1), SuiteProgress(trainer(MoEIProgressBar(lines=True), False), 1)):
        progress.start("gi", 3)
        progress.close()
    assert capsys.readouterr().out == ""
