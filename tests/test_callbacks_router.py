"""Router statistics: the sums on hand-built routing, what a tiny fit logs to W&B and to stats/router.jsonl, DDP."""

import glob
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import wandb
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import WandbLogger

from moei_lightning.backbone import BackboneConfig
from moei_lightning.callbacks import RouterStatsCallback
from moei_lightning.callbacks.routing import ALL, Layout, batch_sums, group_membership, summarise
from moei_lightning.callbacks.stats_files import ROUTER_FILE, read_rows
from moei_lightning.data import MoEIDataModule
from moei_lightning.module import MoEIModule
from moei_lightning.molora import MoLoRAConfig, RoutingRecord
from tests.conftest import LLAMA_CONFIG, one_per_task, run_cli

GROUPS = ("ei", "gi", "perception", "cognition", "expression")


def test_sums_on_hand_built_routing() -> None:
    # three examples: EI perception, GI, EI expression; tokens 0,1 -> ex 0, token 2 -> ex 1, token 3 -> ex 2
    membership = group_membership(torch.tensor([1, 0, 1]), ["perception", "knowledge", "expression"])
    gate = torch.tensor([0.0, 0.5, 0.25, 1.0])
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])
    records = {"a": RoutingRecord(gate, probs, torch.tensor([0, 0, 1, 2]), "decoder")}
    records["b"] = RoutingRecord(None, probs, torch.tensor([0, 0, 1, 2]), "decoder")  # inter: none
    layout = Layout(num_experts=2, num_bins=4)
    rows = summarise(batch_sums(records, ["a", "b", "missing"], membership, layout), ["a", "b", "missing"], layout)
    by = {(r["layer"], r["domain"], r["aspect"]): r for r in rows}
    assert {layer for layer, _, _ in by} == {"a", "b", ALL}  # a layer without records has no rows
    ei, gi = by[("a", "ei", ALL)], by[("a", "gi", ALL)]
    assert ei["tokens"] == 3 and ei["gate_mean"] == pytest.approx(0.5) and ei["usage"] == pytest.approx([5 / 6, 1 / 6])
    assert gi["tokens"] == 1 and gi["gate_mean"] == pytest.approx(0.25) and gi["usage"] == pytest.approx([0.25, 0.75])
    assert ei["gate_hist"] == {"edges": [0.0, 0.25, 0.5, 0.75, 1.0], "counts": [1, 0, 1, 1]}
    assert ei["entropy"] == pytest.approx(math.log(2) / 3)
    assert by[("a", "ei", "perception")]["tokens"] == 2 and by[("a", "ei", "expression")]["gate_mean"] == 1.0
    assert ("a", "ei", "cognition") not in by  # no cognition tokens: no row
    assert by[("b", "gi", ALL)]["gate_mean"] == 1.0  # no inter gate: adapters on every token
    pooled = by[(ALL, "ei", ALL)]
    assert pooled["tokens"] == 6 and pooled["gate_mean"] == pytest.approx(0.75)


class RecordingRun:
    """Stands in for a wandb run: keeps every ``log`` call in memory."""

    def __init__(self) -> None:
        self.logged: list[dict] = []
        self.config = SimpleNamespace(update=lambda *args, **kwargs: None)
        self.id, self.name = "memory", "memory"

    def log(self, data: dict) -> None:
        self.logged.append(dict(data))


def _tiny_module() -> MoEIModule:
    return MoEIModule(
        backbone=BackboneConfig(name_or_path="tiny-llama"),
        molora=MoLoRAConfig(num_experts=4, rank=8, dropout=0.0),
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
        warmup_steps=2,
    )


@pytest.fixture(scope="module")
def offline_fit(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One tiny fit, logged to an offline W&B run and to an in-memory W&B run at once; validation on one record
    per task (every domain and aspect, one batch)."""
    run_dir = tmp_path_factory.mktemp("offline-fit")
    val_files = one_per_task("val", run_dir)
    memory = RecordingRun()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        seed_everything(0)
        trainer = Trainer(
            accelerator="cpu",
            max_epochs=1,
            limit_train_batches=4,
            log_every_n_steps=2,
            enable_checkpointing=False,
            enable_progress_bar=False,
            logger=[WandbLogger(project="test", offline=True, save_dir=str(run_dir)), WandbLogger(experiment=memory)],
            callbacks=[RouterStatsCallback()],
            default_root_dir=run_dir,
        )
        data = MoEIDataModule(batch_size=8, gi_ratio=0.25, max_length=256, eval_batch_size=16, **val_files)
        trainer.fit(_tiny_module(), data)
        wandb.finish()
    return SimpleNamespace(run_dir=run_dir, logged=memory.logged, layers=4)


def test_fit_logs_documented_keys_with_values_in_range(offline_fit: SimpleNamespace) -> None:
    steps = {
        (entry["trainer/global_step"], "val" if any("router/val/" in k for k in entry) else "train"): entry
        for entry in offline_fit.logged
        if any(k.startswith("router/") for k in entry)
    }
    assert sorted(steps) == [(2, "train"), (4, "train"), (4, "val")]
    for (_, stage), entry in steps.items():
        for name in ("ei_activation", "gi_leakage"):
            assert 0.0 <= entry[f"router/{stage}/{name}"] <= 1.0
        assert 0.0 <= entry[f"router/{stage}/entropy"] <= math.log(4) + 1e-6
        layers = {k.split("/")[2] for k in entry if k.endswith("/gate/ei")}
        assert len(layers) == offline_fit.layers
        for layer in layers:
            assert 0.0 <= entry[f"router/{stage}/{layer}/gi_leakage"] <= 1.0
            for group in GROUPS:
                hist = entry[f"router/{stage}/{layer}/gate/{group}"]
                assert isinstance(hist, wandb.Histogram)
                assert hist.bins[0] == 0.0 and hist.bins[-1] == 1.0 and len(hist.bins) == len(hist.histogram) + 1
                assert sum(hist.histogram) > 0
        tables = {k.rsplit("/", 1)[-1]: v for k, v in entry.items() if f"router/{stage}/usage/" in k}
        assert set(tables) == (set(GROUPS) if stage == "val" else set())  # train tables are opt-in
        for table in tables.values():
            assert table.columns == ["layer", "expert_0", "expert_1", "expert_2", "expert_3"]
            assert len(table.data) == offline_fit.layers
            for row in table.data:
                assert sum(row[1:]) == pytest.approx(1.0) and all(0 <= p <= 1 for p in row[1:])


def test_offline_wandb_run_and_local_rows_match_the_logger(offline_fit: SimpleNamespace) -> None:
    wandb_files = glob.glob(str(offline_fit.run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert wandb_files and os.path.getsize(wandb_files[0]) > 0
    rows = read_rows(offline_fit.run_dir, ROUTER_FILE)
    logged = {}
    for entry in offline_fit.logged:
        logged.setdefault(entry["trainer/global_step"], {}).update(entry)
    assert {(r["stage"], r["step"]) for r in rows} == {("train", 2), ("train", 4), ("val", 4)}
    for row in rows:
        entry, stage = logged[row["step"]], row["stage"]
        group = row["domain"] if row["aspect"] == ALL else row["aspect"]
        assert sum(row["usage"]) == pytest.approx(1.0) and 0 <= row["gate_mean"] <= 1
        assert sum(row["gate_hist"]["counts"]) == row["tokens"]
        if row["layer"] == ALL:
            if row["aspect"] == ALL:
                name = "ei_activation" if row["domain"] == "ei" else "gi_leakage"
                assert entry[f"router/{stage}/{name}"] == pytest.approx(row["gate_mean"])
            continue
        hist = entry[f"router/{stage}/{row['layer']}/gate/{group}"]
        assert hist.histogram == row["gate_hist"]["counts"] and hist.bins == row["gate_hist"]["edges"]
        if row["aspect"] == ALL:
            name = "ei_activation" if row["domain"] == "ei" else "gi_leakage"
            assert entry[f"router/{stage}/{row['layer']}/{name}"] == pytest.approx(row["gate_mean"])
        if stage == "val":
            table = entry[f"router/val/usage/{group}"]
            assert dict((r[0], r[1:]) for r in table.data)[row["layer"]] == pytest.approx(row["usage"])


def _fit_rows(tmp_path: Path, name: str, *args: str) -> list[dict]:
    common = ["fit", "--config", LLAMA_CONFIG, "--trainer.max_epochs=1"]
    common += ["--trainer.limit_train_batches=4", "--trainer.log_every_n_steps=2", "--trainer.logger=false"]
    common += ["--ei_metrics.stages=[]", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]"]
    common += [f"--data.{split}=[{path}]" for split, (path,) in one_per_task("val", tmp_path).items()]
    result = run_cli(*common, *args, f"--run_dir={tmp_path / name}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_rows(tmp_path / name, ROUTER_FILE)


@pytest.mark.slow
def test_ddp_gathers_both_ranks_and_logs_once_per_step(tmp_path: Path) -> None:
    # One rank with batch 8 sees at every step the examples two ranks with batch 4 see (data/sampling.py);
    # validation: one record per task, 13 in all, split unevenly over the two ranks.
    two = _fit_rows(tmp_path, "two", "--trainer.devices=2", "--trainer.strategy=ddp", "--data.batch_size=4")
    one = _fit_rows(tmp_path, "one", "--data.batch_size=8")

    def key(row: dict) -> tuple:
        return (row["stage"], row["step"], row["layer"], row["domain"], row["aspect"])

    assert len({key(r) for r in two}) == len(two)  # rank 0 alone writes: no row twice
    assert [key(r) for r in two] == [key(r) for r in one]
    assert {(r["stage"], r["step"]) for r in two} == {("train", 2), ("train", 4), ("val", 4)}
    for a, b in zip(two, one):
        assert a["tokens"] == b["tokens"], key(a)  # every token of both ranks is counted
        assert a["gate_mean"] == pytest.approx(b["gate_mean"], abs=1e-4), key(a)


def test_callback_rejects_unknown_stage() -> None:
    with pytest.raises(ValueError, match="unknown stages \\['training'\\]"):
        RouterStatsCallback(stages=["training"])
