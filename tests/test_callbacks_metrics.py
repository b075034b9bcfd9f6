"""Per-aspect EI and per-dimension GI metrics: known answers, 2 processes, and the callback in a validation run."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from moei_lightning.backbone import BackboneConfig
from moei_lightning.callbacks import EiMetricsCallback, RouterStatsCallback
from moei_lightning.callbacks.aspect_metrics import AspectMetrics, metric_key, task_specs
from moei_lightning.callbacks.stats_files import METRICS_FILE, ROUTER_FILE, read_rows
from moei_lightning.data import EiRecord, MoEIDataModule
from moei_lightning.eval.text_metrics import score_generations
from moei_lightning.module import MoEIModule
from moei_lightning.molora import MoLoRAConfig
from tests.conftest import on_two_ranks

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

EXPECTED = {
    "val/ei/perception/polarity/acc": 0.5,
    # positive: P 1/2 R 1/2; negative: P 1/2 R 1; neutral: never right
    "val/ei/perception/polarity/f1": (0.5 + 2 / 3 + 0.0) / 3,
    "val/ei/perception/intensity/acc": 0.5,
    "val/ei/perception/intensity/f1": (2 / 3 + 0.0) / 2,
    "val/ei/perception/acc": 3 / 6,  # pooled over the aspect's records
    "val/ei/perception/f1": ((0.5 + 2 / 3) / 3 + 1 / 3) / 2,  # mean of the tasks' macro-F1
    "val/ei/perception/score": 0.5,
    "val/ei/cognition/cause/acc": 1.0,
    "val/ei/cognition/cause/f1": 1.0,  # labels never seen in the data do not count
    "val/ei/cognition/acc": 1.0,
    "val/ei/expression/reply/rougeL": 1.0,
    "val/ei/expression/reply/bleu4": 1.0,
    "val/ei/expression/reply/distinct1": 12 / 13,  # "that" twice among 13 words
    "val/ei/expression/score": 1.0,  # an open task's score is its ROUGE-L
    "val/ei/avg": (0.5 + 1.0 + 1.0) / 3,
    "val/gi/knowledge/capitals/acc": 2 / 3,
    "val/gi/knowledge/acc": 2 / 3,
    "val/gi/reasoning/acc": 0.0,
    "val/gi/avg": (2 / 3 + 0.0) / 2,
}


def _score(metrics: AspectMetrics, cases: list) -> None:
    choice = [(r, p) for r, p in cases if r.choices]
    open_ = [(r, p) for r, p in cases if not r.choices]
    key = lambda r: (r.domain, r.aspect, r.task)  # noqa: E731
    metrics.update_choices([key(r) for r, _ in choice], [p for _, p in choice], [r.output for r, _ in choice])
    metrics.update_generations([key(r) for r, _ in open_], [p for _, p in open_], [r.output for r, _ in open_])


def _values(rows: list[dict]) -> dict[str, float]:
    return {metric_key("val", r): r["value"] for r in rows}


def test_known_answers_per_task_aspect_and_domain() -> None:
    metrics = AspectMetrics(task_specs([r for r, _ in CASES]))
    _score(metrics, CASES)
    rows = metrics.compute()
    values = _values(rows)
    assert {k: values[k] for k in EXPECTED} == pytest.approx(EXPECTED)
    assert {k: values[f"val/ei/expression/{k}"] for k in ("bleu4", "rouge1", "distinct2")} == pytest.approx(
        {k: score_generations(REPLIES, REPLIES)[k] for k in ("bleu4", "rouge1", "distinct2")}
    )
    assert not any(k.startswith("val/gi/") and k.endswith("/f1") for k in values)  # GI: accuracy only
    assert all(0.0 <= v <= 1.0 for v in values.values())
    counts = {metric_key("val", r): r["n"] for r in rows}
    assert counts["val/ei/perception/acc"] == 6 and counts["val/ei/expression/bleu4"] == 2
    assert counts["val/ei/avg"] == 10 and counts["val/gi/avg"] == 4


def test_task_without_records_in_the_epoch_is_left_out() -> None:
    metrics = AspectMetrics(task_specs([r for r, _ in CASES]))
    _score(metrics, [c for c in CASES if c[0].task != "math"])
    values = _values(metrics.compute())
    assert "val/gi/reasoning/acc" not in values
    assert values["val/gi/avg"] == pytest.approx(2 / 3)


def _metrics_on_rank(rank: int) -> list[dict]:
    torch.set_num_threads(1)
    metrics = AspectMetrics(task_specs([r for r, _ in CASES]))
    # Uneven shares: rank 1 gets no open record and no reasoning record at all.
    mine = [
        c for i, c in enumerate(CASES) if (c[0].choices is None or c[0].task == "math" or i % 3 == 0) == (rank == 0)
    ]
    _score(metrics, mine)
    return metrics.compute()


@pytest.mark.slow
def test_two_processes_give_the_one_process_answers(tmp_path: Path) -> None:
    one = AspectMetrics(task_specs([r for r, _ in CASES]))
    _score(one, CASES)
    expected = one.compute()
    for rows in on_two_ranks(_metrics_on_rank, tmp_path):
        assert [metric_key("val", r) for r in rows] == [metric_key("val", r) for r in expected]
        assert _values(rows) == pytest.approx(_values(expected))
        assert [r["n"] for r in rows] == [r["n"] for r in expected]


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
    # The metrics callback runs first, with forwards of its own; the router statistics must not change.
    both = _validate(
        tmp_path / "both", [EiMetricsCallback(max_new_tokens=4, choice_batch_size=64), RouterStatsCallback()]
    )
    alone = _validate(tmp_path / "alone", [RouterStatsCallback()])
    assert read_rows(tmp_path / "both", ROUTER_FILE) == read_rows(tmp_path / "alone", ROUTER_FILE)
    logged = both[0]
    for key in ("val/ei/perception/acc", "val/ei/perception/f1", "val/ei/cognition/acc", "val/ei/expression/bleu4"):
        assert 0.0 <= logged[key] <= 1.0, key
    for key in ("val/ei/expression/rougeL", "val/gi/knowledge/acc", "val/ei/avg", "val/gi/avg"):
        assert 0.0 <= logged[key] <= 1.0, key
    assert not any(k.startswith("val/ei/") for k in alone[0])
    rows = read_rows(tmp_path / "both", METRICS_FILE)
    assert {r["key"]: r["value"] for r in rows} == pytest.approx({k: v for k, v in logged.items() if k.count("/") > 1})
    # every validation record is scored once: 17 perception, 15 cognition, 18 expression records
    n = {r["key"]: r["n"] for r in rows}
    assert (n["val/ei/perception/acc"], n["val/ei/cognition/acc"], n["val/ei/expression/bleu4"]) == (17, 15, 18)
