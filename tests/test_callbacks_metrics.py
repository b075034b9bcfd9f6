"""The one scorer's rows (known answers, percent), the validation callback on one and on two ranks."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from moei_lightning.backbone import BackboneConfig
from moei_lightning.callbacks import EiMetricsCallback, RouterStatsCallback
from moei_lightning.callbacks.stats_files import METRICS_FILE, ROUTER_FILE, read_rows
from moei_lightning.data import EiRecord, MoEIDataModule
from moei_lightning.eval.choices import ChoiceScores
from moei_lightning.eval.scorer import record_items, row_key, score_rows
from moei_lightning.eval.suite import ChoiceOutcome, OpenOutcome
from moei_lightning.eval.text_metrics import score_generations
from moei_lightning.module import MoEIModule
from moei_lightning.molora import MoLoRAConfig
from tests.conftest import ThreadWorld, one_per_task

POLARITY = ["positive", "negative", "neutral"]
REPLIES = ["i am so sorry to hear that", "that sounds really hard for you"]


def _record(i: int, task: str, domain: str, aspect: str, output: str, choices: list[str] | None) -> EiRecord:
    return EiRecord(f"{task}-{i}", task, domain, aspect, "instruction", "input", output, choices)


# (record, the model's answer)
CASES = [
    *(
        (_record(i, "polarity", "ei", "perception", target, POLARITY), pred)
        for i, (target, pred) in enumerate(
            [("positive", "positive"), ("positive", "negative"), ("negative", "negative"), ("neutral", "positive")]
        )
    ),
    (_record(0, "intensity", "ei", "perception", "low", ["low", "high"]), "low"),
    (_record(1, "intensity", "ei", "perception", "high", ["low", "high"]), "low"),
    (_record(0, "cause", "ei", "cognition", "a", ["a", "b"]), "a"),
    (_record(1, "cause", "ei", "cognition", "d", ["c", "d"]), "d"),
    *((_record(i, "reply", "ei", "expression", text, None), text) for i, text in enumerate(REPLIES)),
    (_record(0, "capitals", "gi", "knowledge", "Paris", ["Paris", "Rome"]), "Paris"),
    (_record(1, "capitals", "gi", "knowledge", "Oslo", ["Oslo", "Bern"]), "Oslo"),
    (_record(2, "capitals", "gi", "knowledge", "Lima", ["Lima", "Quito"]), "Quito"),
    (_record(0, "math", "gi", "reasoning", "4", ["3", "4"]), "3"),
]

EXPECTED_FRACTIONS = {
    "val/ei/perception/polarity/acc": 0.5,
    # positive: P 1/2 R 1/2; negative: P 1/2 R 1; neutral: never right
    "val/ei/perception/polarity/f1": (0.5 + 2 / 3 + 0.0) / 3,
    "val/ei/perception/intensity/acc": 0.5,
    "val/ei/perception/intensity/f1": (2 / 3 + 0.0) / 2,
    "val/ei/perception/acc": 3 / 6,  # pooled over the aspect's records
    "val/ei/perception/acc_norm": 3 / 6,  # one character per choice: the same answers
    "val/ei/perception/f1": (4 * (0.5 + 2 / 3) / 3 + 2 * 1 / 3) / 6,  # the tasks' macro-F1, weighted by items
    "val/ei/perception/score": 0.5,
    "val/ei/cognition/cause/acc": 1.0,
    "val/ei/cognition/cause/f1": 1.0,  # labels never seen in the data do not count
    "val/ei/cognition/acc": 1.0,
    "val/ei/expression/reply/rouge_l": 1.0,
    "val/ei/expression/reply/bleu4": 1.0,
    "val/ei/expression/reply/distinct1": 12 / 13,  # "that" twice among 13 words
    "val/ei/expression/score": 1.0,  # an open task's score is its ROUGE-L
    "val/ei/avg": (6 * 0.5 + 2 * 1.0 + 2 * 1.0) / 10,  # the aspects' scores weighted by their items
    "val/ei/acc": 5 / 8,  # every EI choice record
    "val/gi/knowledge/capitals/acc": 2 / 3,
    "val/gi/knowledge/acc": 2 / 3,
    "val/gi/reasoning/acc": 0.0,
    "val/gi/acc_norm": 2 / 4,
    "val/gi/avg": 2 / 4,
}


EXPECTED = {key: 100 * value for key, value in EXPECTED_FRACTIONS.items()}


def _rows(cases: list) -> list[dict]:
    """Outcomes whose predictions are the cases' answers, scored by the one scorer."""
    items = record_items([r for r, _ in cases])
    choice, open_ = [], []
    for item, (record, answer) in zip(items, cases):
        if record.choices:
            logprobs = [0.0 if c == answer else -9.0 for c in record.choices]
            choice.append(ChoiceOutcome(item, ChoiceScores(logprobs, [1] * len(logprobs), [1] * len(logprobs))))
        else:
            open_.append(OpenOutcome(item, answer))
    return score_rows(choice, open_)


def _values(rows: list[dict]) -> dict[str, float]:
    return {row_key("val", r): r["value"] for r in rows}


def test_known_answers_per_task_aspect_and_domain_in_percent() -> None:
    rows = _rows(CASES)
    values = _values(rows)
    assert {k: values[k] for k in EXPECTED} == pytest.approx(EXPECTED)
    assert {k: values[f"val/ei/expression/{k}"] for k in ("bleu4", "rouge1", "distinct2")} == pytest.approx(
        {k: score_generations(REPLIES, REPLIES)[k] for k in ("bleu4", "rouge1", "distinct2")}
    )
    assert not any(k.startswith("val/gi/") and k.endswith("/f1") for k in values)  # GI: accuracy only
    assert all(0.0 <= v <= 100.0 + 1e-9 for v in values.values())
    assert all(k == k.lower() for k in values)  # snake_case keys
    counts = {row_key("val", r): r["n"] for r in rows}
    assert counts["val/ei/perception/acc"] == 6 and counts["val/ei/expression/bleu4"] == 2
    assert counts["val/ei/avg"] == 10 and counts["val/gi/avg"] == 4


def test_task_without_records_is_left_out() -> None:
    values = _values(_rows([c for c in CASES if c[0].task != "math"]))
    assert "val/gi/reasoning/acc" not in values
    assert values["val/gi/avg"] == pytest.approx(100 * 2 / 3)


def _module(val_files: dict[str, list[str]]) -> tuple[MoEIModule, MoEIDataModule]:
    torch.manual_seed(0)
    module = MoEIModule(backbone=BackboneConfig(name_or_path="tiny-llama"), molora=MoLoRAConfig(num_experts=4, rank=8))
    module.configure_model()
    module.eval()
    datamodule = MoEIDataModule(max_length=256, eval_batch_size=16, **val_files)
    datamodule.attach(module.tokenizer, module.kind)
    datamodule.setup("validate")
    return module, datamodule


def test_callback_sharded_path_gives_the_one_process_rows_with_equal_calls(tmp_path: Path) -> None:
    """Two ranks (threads sharing an all-gather) split the forwards evenly and both get the one-rank rows."""
    val_files = one_per_task("val", tmp_path)
    module, datamodule = _module(val_files)
    assert len(datamodule.examples("val")) == 13
    callback = EiMetricsCallback(max_new_tokens=4, choice_batch_size=8, generation_batch_size=2)
    callback.setup(type("T", (), {"datamodule": datamodule, "callbacks": []})(), module, "validate")
    single = callback.score(module, datamodule, "val", 0, 1, lambda obj, world_size: [obj])

    world = ThreadWorld(2)
    modules = [_module(val_files)[0] for _ in range(2)]
    calls = [0, 0]
    for rank, m in enumerate(modules):
        m.model.register_forward_hook(lambda *_, rank=rank: calls.__setitem__(rank, calls[rank] + 1))
    sharded = world.run(lambda rank: callback.score(modules[rank], datamodule, "val", rank, 2, world.gather_for(rank)))
    assert calls[0] == calls[1] > 0
    for rows in sharded:
        assert [row_key("val", r) for r in rows] == [row_key("val", r) for r in single]
        assert _values(rows) == pytest.approx(_values(single), abs=1e-6)
        assert [r["n"] for r in rows] == [r["n"] for r in single]


def _validate(tmp_path: Path, callbacks: list) -> list[dict[str, float]]:
    torch.manual_seed(0)
    module = MoEIModule(backbone=BackboneConfig(name_or_path="tiny-llama"), molora=MoLoRAConfig(num_experts=4, rank=8))
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )
    return trainer.validate(module, MoEIDataModule(max_length=256, eval_batch_size=16), verbose=False)


@pytest.mark.slow
def test_callback_logs_metrics_and_keeps_the_routing_for_router_stats(tmp_path: Path) -> None:
    both = _validate(
        tmp_path / "both", [EiMetricsCallback(max_new_tokens=4, choice_batch_size=64), RouterStatsCallback()]
    )
    alone = _validate(tmp_path / "alone", [RouterStatsCallback()])
    assert read_rows(tmp_path / "both", ROUTER_FILE) == read_rows(tmp_path / "alone", ROUTER_FILE)
    logged = both[0]
    for key in ("val/ei/perception/acc", "val/ei/perception/f1", "val/ei/cognition/acc", "val/ei/expression/bleu4"):
        assert 0.0 <= logged[key] <= 100.0, key
    for key in ("val/ei/expression/rouge_l", "val/gi/knowledge/acc", "val/ei/avg", "val/gi/avg"):
        assert 0.0 <= logged[key] <= 100.0, key
    assert not any(k.startswith("val/ei/") for k in alone[0])
    rows = read_rows(tmp_path / "both", METRICS_FILE)
    assert {r["key"]: r["value"] for r in rows} == pytest.approx({k: v for k, v in logged.items() if k.count("/") > 1})
    # every validation record is scored once: 17 perception, 15 cognition, 18 expression records
    n = {r["key"]: r["n"] for r in rows}
    assert (n["val/ei/perception/acc"], n["val/ei/cognition/acc"], n["val/ei/expression/bleu4"]) == (17, 15, 18)
