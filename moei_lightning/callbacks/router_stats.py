"""RouterStatsCallback: what the inter gate and the intra router do, per adapted layer, while training.

It reads what routing produced in the module's own loss forward (``last_routing``) after each
training, validation and test batch, keeps
sums per layer and token group (:mod:`moei_lightning.callbacks.routing`), and every
``log_every_n_steps`` optimizer steps (training) or once per evaluation epoch sums them over ranks
and logs them from rank 0: scalars to every logger, histograms and usage tables to W&B loggers,
and every row to ``stats/router.jsonl`` in the run directory. The keys are listed in
``docs/monitoring.md``.

Forwards run by other callbacks (evaluation, metrics) capture their own routing and never touch
``last_routing``, so the callbacks work in any order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from moei_lightning.callbacks.routing import ALL, GROUPS, Layout, batch_sums, group_membership, group_name, summarise
from moei_lightning.callbacks.stats_files import ROUTER_FILE, append_rows
from moei_lightning.molora import molora_layers

Stage = Literal["train", "val", "test"]


class RouterStatsCallback(Callback):
    """Inter-gate distributions, expert usage and router entropy per layer, EI vs GI and per EI aspect.

    Args:
        stages: where to gather statistics: ``train`` (logged every ``log_every_n_steps`` steps,
            over all batches since the last log), ``val`` and ``test`` (logged once per epoch).
            An empty list turns the callback off.
        log_every_n_steps: training steps between logs; ``None`` follows ``trainer.log_every_n_steps``.
        num_bins: bins of the gate histograms over [0, 1].
        train_heatmaps: also log the layer x expert usage tables to W&B at every training log (they
            are always logged for validation and test; the local rows always hold the usage).
    """

    def __init__(
        self,
        stages: Sequence[Stage] = ("train", "val", "test"),
        log_every_n_steps: int | None = None,
        num_bins: int = 20,
        train_heatmaps: bool = False,
    ) -> None:
        unknown = sorted(set(stages) - {"train", "val", "test"})
        if unknown:
            raise ValueError(f"router_stats.stages: unknown stages {unknown}; use train, val and/or test")
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"router_stats.log_every_n_steps must be >= 1 or null, got {log_every_n_steps}")
        if num_bins < 1:
            raise ValueError(f"router_stats.num_bins must be >= 1, got {num_bins}")
        self.stages = set(stages)
        self.log_every_n_steps = log_every_n_steps
        self.num_bins = num_bins
        self.train_heatmaps = train_heatmaps
        self.latest: dict[str, float] = {}
        """The newest training ``ei_activation`` and ``gi_leakage`` (pooled over layers), on every rank."""
        self._layers: list[str] | None = None
        self._layout: Layout | None = None
        self._sums: dict[str, torch.Tensor | None] = {}
        self._last_train_log = -1

    def _ready(self, pl_module: LightningModule) -> bool:
        """Learn the layers once; a model without MoLoRA layers (``adapter: full``) has nothing to show."""
        if self._layers is not None:
            return bool(self._layers)
        model = getattr(pl_module, "model", None)
        if model is None or not molora_layers(model):
            rank_zero_warn("router_stats: the model has no MoLoRA adapters (adapter: full?), so no router statistics")
            self._layers = []
            return False
        self._layers = [layer.name for layer in molora_layers(model).values()]
        self._layout = Layout(model.molora_config.num_experts, self.num_bins)
        return True

    def _add(self, stage: str, pl_module: LightningModule, batch: dict[str, Any]) -> None:
        if stage not in self.stages or not self._ready(pl_module):
            return
        membership = group_membership(batch["domain"], batch["aspect"])
        sums = batch_sums(pl_module.last_routing, self._layers, membership, self._layout)
        previous = self._sums.get(stage)
        self._sums[stage] = sums if previous is None else previous + sums

    def _flush(self, stage: str, trainer: Trainer, pl_module: LightningModule) -> None:
        """Sum over ranks (every rank must call this), then log from rank 0."""
        if stage not in self.stages or not self._ready(pl_module):
            return
        sums = self._sums.pop(stage, None)
        if sums is None:  # this rank saw no batch since the last log; the others may have
            shape = (len(self._layers), len(GROUPS), self._layout.width)
            sums = torch.zeros(shape, dtype=torch.float64, device=pl_module.device)
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
        rows = summarise(sums, self._layers, self._layout)
        summary = _summary(rows, stage)
        if stage == "train":
            names = ("ei_activation", "gi_leakage")
            self.latest = {name: summary[f"router/train/{name}"] for name in names if f"router/train/{name}" in summary}
        if not trainer.is_global_zero:
            return
        step, epoch = trainer.global_step, trainer.current_epoch
        append_rows(
            trainer.default_root_dir, ROUTER_FILE, ({"stage": stage, "step": step, "epoch": epoch} | r for r in rows)
        )
        scalars = summary | _layer_scalars(rows, stage)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                with_tables = stage != "train" or self.train_heatmaps
                logger.log_metrics(scalars | _wandb_objects(rows, stage, self._layers, with_tables), step=step)
            else:
                logger.log_metrics(scalars, step=step)
            logger.save()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: dict[str, Any], batch_idx: int
    ) -> None:
        self._add("train", pl_module, batch)
        step = trainer.global_step
        every = self.log_every_n_steps or trainer.log_every_n_steps
        # Under gradient accumulation several batches end at the same step; log once, after the step.
        if step > 0 and step % every == 0 and step != self._last_train_log:
            self._last_train_log = step
            self._flush("train", trainer, pl_module)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sums.pop("val", None)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._add("val", pl_module, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._flush("val", trainer, pl_module)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sums.pop("test", None)

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._add("test", pl_module, batch)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush("test", trainer, pl_module)


def _summary(rows: list[dict[str, Any]], stage: str) -> dict[str, float]:
    """The pooled scalars: ``ei_activation`` and ``gi_leakage`` (mean gate on EI / GI tokens), entropy."""
    return _scalars([r for r in rows if r["layer"] == ALL], f"router/{stage}")


def _layer_scalars(rows: list[dict[str, Any]], stage: str) -> dict[str, float]:
    layers = dict.fromkeys(r["layer"] for r in rows if r["layer"] != ALL)
    out: dict[str, float] = {}
    for layer in layers:
        out |= _scalars([r for r in rows if r["layer"] == layer], f"router/{stage}/{layer}")
    return out


def _scalars(rows: list[dict[str, Any]], prefix: str) -> dict[str, float]:
    domains = {r["domain"]: r for r in rows if r["aspect"] == ALL}
    out = {}
    if "ei" in domains:
        out[f"{prefix}/ei_activation"] = domains["ei"]["gate_mean"]
    if "gi" in domains:
        out[f"{prefix}/gi_leakage"] = domains["gi"]["gate_mean"]
    tokens = sum(r["tokens"] for r in domains.values())
    if tokens:
        out[f"{prefix}/entropy"] = sum(r["entropy"] * r["tokens"] for r in domains.values()) / tokens
    return out


def _wandb_objects(rows: list[dict[str, Any]], stage: str, layers: list[str], with_tables: bool) -> dict[str, Any]:
    """Gate histograms per layer and group; with ``with_tables``, a layer x expert usage table per group."""
    import wandb

    out: dict[str, Any] = {}
    for r in rows:
        if r["layer"] != ALL:
            hist = r["gate_hist"]
            key = f"router/{stage}/{r['layer']}/gate/{group_name(r['domain'], r['aspect'])}"
            out[key] = wandb.Histogram(np_histogram=(hist["counts"], hist["edges"]))
    if with_tables:
        for domain, aspect in GROUPS:
            usage = {r["layer"]: r["usage"] for r in rows if (r["domain"], r["aspect"]) == (domain, aspect)}
            if not usage:
                continue
            experts = len(next(iter(usage.values())))
            columns = ["layer", *(f"expert_{k}" for k in range(experts))]
            data = [[layer, *usage[layer]] for layer in layers if layer in usage]
            out[f"router/{stage}/usage/{group_name(domain, aspect)}"] = wandb.Table(columns=columns, data=data)
    return out
