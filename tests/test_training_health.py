"""Training health: per-group rows a short fit writes, and the spike and gate-reopening rules with their steps."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from moei_lightning.backbone import BackboneConfig
from moei_lightning.callbacks import TrainingHealth
from moei_lightning.callbacks.stats_files import TRAIN_FILE, read_rows
from moei_lightning.callbacks.training_health import GATE_REOPENED, GATE_SHUT, _Window
from moei_lightning.data import MoEIDataModule
from moei_lightning.module import MoEIModule
from moei_lightning.molora import MoLoRAConfig
from tests.conftest import one_per_task


def test_a_short_fit_logs_every_group_and_the_summary_section(tmp_path: Path) -> None:
    seed_everything(0)
    health = TrainingHealth(log_every_n_steps=2, window=2, warmup_steps=0)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=6,
        log_every_n_steps=50,
        enable_checkpointing=False,
        enable_progress_bar=False,
        logger=False,
        callbacks=[health],
        default_root_dir=tmp_path,
    )
    module = MoEIModule(
        backbone=BackboneConfig(name_or_path="tiny-llama"),
        molora=MoLoRAConfig(num_experts=4, rank=8, dropout=0.0),
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
        router_lr_scale=10.0,
        warmup_steps=0,
    )
    data = MoEIDataModule(batch_size=8, gi_ratio=0.25, max_length=256, **one_per_task("val", tmp_path))
    trainer.fit(module, data)

    rows = read_rows(tmp_path, TRAIN_FILE)
    assert [r["step"] for r in rows] == [2, 4, 6]  # the callback's own interval, not the Trainer's
    for row in rows:
        assert set(row["groups"]) == {"experts", "router", "gate"}
        assert {"loss", "lm_ei", "inter"} <= set(row["loss_terms"])
        groups = row["groups"]
        assert groups["router"]["lr"] == pytest.approx(10 * groups["experts"]["lr"])
        for values in groups.values():
            assert math.isfinite(values["grad_norm"]) and values["grad_norm"] > 0
            assert 0 < values["update_norm"] < values["param_norm"]
    # Adam's first step moves every weight by about lr: the update norm is lr * sqrt(#weights)
    first = rows[0]["groups"]["gate"]
    assert first["update_norm"] < 2 * first["lr"] * math.sqrt(sum(p.numel() for p in module.parameter_groups()["gate"]))

    key, section, lines = health.summary_section()
    assert key == "health" and [w["end_step"] for w in section["windows"]] == [2, 4, 6]
    assert section["worst_loss_ratio"] == max(w["ratio"] for w in section["windows"][1:])
    assert all(0.0 <= w["gate_gi"] <= 1.0 for w in section["windows"])
    assert lines and lines[0].startswith("- loss spikes")


class _OneRank:
    """What the window rules need from a Trainer with one process."""

    is_global_zero = True
    strategy = SimpleNamespace(root_device=torch.device("cpu"), reduce=lambda tensor, reduce_op: tensor)


def _windows(health: TrainingHealth, values: list[tuple[float, float]]) -> None:
    """Close one window per (mean loss, mean GI gate), of 10 steps and 10 GI decisions each."""
    for i, (loss, gate_gi) in enumerate(values, start=1):
        health._current = _Window(loss=10 * loss, steps=10, gate=[10.0, 10.0, 10 * gate_gi, 10.0])
        health._close_window(_OneRank(), step=10 * i)


def _fresh() -> TrainingHealth:
    health = TrainingHealth(window=10, warmup_steps=0)
    health.report = {"windows": [], "spikes": [], "gate_reopened": [], "worst_loss_ratio": None}
    health.report |= {"gate_gi_shut_at_step": None, "gate_gi_worst_after_shut": None, "first_window_step": 0}
    return health


def test_a_window_above_twice_the_previous_one_is_a_spike_with_its_step(capsys: pytest.CaptureFixture) -> None:
    health = _fresh()
    _windows(health, [(2.0, 0.4), (1.0, 0.3), (1.9, 0.3), (4.0, 0.3), (1.0, 0.3)])
    assert health.report["spikes"] == [{"step": 40, "ratio": pytest.approx(4.0 / 1.9)}]
    assert health.report["worst_loss_ratio"] == pytest.approx(4.0 / 1.9)
    assert "warning: loss spike at step 40" in capsys.readouterr().out


def test_a_gate_that_reopens_on_gi_after_it_had_shut_is_reported_once_per_reopening(
    capsys: pytest.CaptureFixture,
) -> None:
    health = _fresh()
    # shut at step 30; 0.07 is noise around the shut state; reopened at 60 (and still open at 70), again at 100
    gates = [0.5, 0.2, GATE_SHUT, 0.07, 0.01, 0.12, 0.2, 0.02, GATE_REOPENED, 0.15]
    _windows(health, [(1.0, g) for g in gates])
    assert health.report["gate_gi_shut_at_step"] == 30
    assert [e["step"] for e in health.report["gate_reopened"]] == [60, 100]
    assert health.report["gate_gi_worst_after_shut"] == pytest.approx(0.2)
    out = capsys.readouterr().out
    assert "reopened on GI prompts at step 60" in out and "at step 100" in out and "at step 70" not in out
    lines = health.summary_section()[2]
    assert "reopened: step 60 (0.120), step 100 (0.150)" in lines[1]
