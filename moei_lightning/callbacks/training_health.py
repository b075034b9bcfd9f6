"""TrainingHealth: what each optimizer step did per parameter group, and a warning when training goes wrong.

Every ``log_every_n_steps`` optimizer steps it logs, per optimizer group (``experts``, ``router``,
``gate``; ``backbone`` under full fine-tuning): the learning rate, the gradient norm before clipping,
and the size of the update the step made (the norm of the parameter change, and its ratio to the
parameters' norm), next to the step's loss terms. Rows go to every logger (``train/<what>/<group>``)
and to ``stats/train.jsonl`` in the run directory.

Two failures are watched over consecutive windows of ``window`` steps (after the learning-rate
warm-up): a **loss spike**, a window whose mean training loss is above ``spike_ratio`` times the
previous window's, and a **gate that reopens on GI prompts**, a window whose mean inter gate on GI
prompts is above ``GATE_REOPENED`` after an earlier window's had fallen to ``GATE_SHUT``. Each is printed as a
warning line with its step when it happens; the fit summary's ``health`` section (``summary.json``)
carries the worst window ratio, every event and the gate's worst GI window once it had shut.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from moei_lightning.callbacks.routing import COUNT, GATE, Layout, batch_sums, group_membership
from moei_lightning.callbacks.stats_files import TRAIN_FILE, append_rows
from moei_lightning.molora import molora_layers

GATE_SHUT = 0.05
"""A mean inter gate on GI prompts at or below this is shut: GI inputs then flow through the backbone."""
GATE_REOPENED = 0.1
"""Above this, a gate that had shut has reopened; between the two it is noise around the shut state."""

_EI, _GI = 0, 1  # the ("ei", all) and ("gi", all) columns of routing.GROUPS


@dataclass
class _Window:
    """Sums over the steps of one window: training loss, and inter-gate sums and counts per domain.

    The sums stay tensors on the training device until the window closes, so no step waits for the device.
    """

    loss: torch.Tensor | float = 0.0
    steps: int = 0
    gate: torch.Tensor | list[float] = field(default_factory=lambda: [0.0] * 4)  # ei sum, ei count, gi sum, gi count


class TrainingHealth(Callback):
    """Per-group gradient norms, update sizes and learning rates; loss-spike and gate-reopening warnings.

    Args:
        log_every_n_steps: optimizer steps between logged rows; ``None`` follows
            ``trainer.log_every_n_steps``.
        window: optimizer steps per window of the spike and gate checks.
        spike_ratio: a window whose mean loss exceeds this multiple of the previous window's is a spike.
        warmup_steps: steps before the first window; ``None`` reads the learning-rate scheduler's
            warm-up (the steps until every group first reaches its peak rate), else 0.
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        window: int = 25,
        spike_ratio: float = 2.0,
        warmup_steps: int | None = None,
    ) -> None:
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"config key health.log_every_n_steps: expected >= 1 or null, got {log_every_n_steps}")
        if window < 1:
            raise ValueError(f"config key health.window: expected a positive number of steps, got {window}")
        if not (math.isfinite(spike_ratio) and spike_ratio > 1):
            raise ValueError(f"config key health.spike_ratio: expected a finite number > 1, got {spike_ratio}")
        if warmup_steps is not None and warmup_steps < 0:
            raise ValueError(f"config key health.warmup_steps: expected >= 0 or null, got {warmup_steps}")
        self.log_every_n_steps = log_every_n_steps
        self.window = window
        self.spike_ratio = spike_ratio
        self.warmup_steps = warmup_steps
        self.report: dict[str, Any] = {}
        """What the summary shows: windows, events and worst values (filled as training runs)."""
        self._snapshot: dict[str, list[torch.Tensor]] | None = None
        self._grad_norms: dict[str, float] = {}
        self._rates: dict[str, float] = {}
        self._current = _Window()
        self._start = 0
        self._layers: list[str] = []
        self._layout = Layout(1, 1)

    # ---- hooks -------------------------------------------------------------------------------------

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = self.warmup_steps if self.warmup_steps is not None else _scheduler_warmup(trainer)
        self._current = _Window()
        self.report = {
            "window": self.window,
            "spike_ratio": self.spike_ratio,
            "first_window_step": self._start,
            "windows": [],
            "spikes": [],
            "gate_reopened": [],
            "worst_loss_ratio": None,
            "gate_gi_shut_at_step": None,
            "gate_gi_worst_after_shut": None,
        }
        model = getattr(pl_module, "model", None)
        config = getattr(model, "molora_config", None)
        gated = config is not None and config.inter != "none"  # without an inter gate every input takes the adapters
        self._layers = [m.name for m in molora_layers(model).values()] if gated else []
        self._layout = Layout(config.num_experts, 1) if gated else Layout(1, 1)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        """On a logging step: gradient norms before clipping, and the parameters before the update."""
        if (trainer.global_step + 1) % self._every(trainer):
            return
        groups = _named_groups(optimizer)
        self._grad_norms = _norms(trainer, {n: [p.grad for p in ps if p.grad is not None] for n, ps in groups.items()})
        self._rates = {name: float(group["lr"]) for name, group in zip(groups, optimizer.param_groups)}
        # The backbone's own weights (adapter: full) are not copied: the copy would double the model's memory.
        self._snapshot = {
            name: [p.detach().clone() for p in params] for name, params in groups.items() if name != "backbone"
        }

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: dict[str, Any], batch_idx: int
    ) -> None:
        metrics = trainer.callback_metrics
        step = trainer.global_step
        if step > self._start and "train/loss" in metrics:
            self._add(pl_module, batch, metrics["train/loss"])
        if step > self._start and (step - self._start) % self.window == 0 and self._current.steps:
            self._close_window(trainer, step)
        if self._snapshot is not None and trainer.optimizers:
            terms = {k.removeprefix("train/"): float(v) for k, v in metrics.items() if k.startswith("train/")}
            self._log_step(trainer, terms)

    # ---- windows -----------------------------------------------------------------------------------

    def _add(self, pl_module: LightningModule, batch: dict[str, Any], loss: torch.Tensor) -> None:
        self._current.loss = self._current.loss + loss.detach().double()
        self._current.steps += 1
        if not self._layers:
            return
        membership = group_membership(batch["domain"], batch["aspect"])
        sums = batch_sums(pl_module.last_routing, self._layers, membership, self._layout).sum(0)
        gate = sums[[_EI, _GI]][:, [GATE, COUNT]].reshape(-1)
        self._current.gate = torch.as_tensor(self._current.gate, dtype=torch.float64, device=gate.device) + gate

    def _close_window(self, trainer: Trainer, step: int) -> None:
        """Every rank sums its window; rank 0's view equals every rank's, so all print the same verdict."""
        device = trainer.strategy.root_device
        current = self._current
        local = torch.cat(
            [
                torch.as_tensor(current.loss, dtype=torch.float64, device=device).reshape(1),
                torch.tensor([float(current.steps)], dtype=torch.float64, device=device),
                torch.as_tensor(current.gate, dtype=torch.float64, device=device),
            ]
        )
        total = trainer.strategy.reduce(local, reduce_op="sum").cpu().tolist()
        self._current = _Window()
        loss = total[0] / max(total[1], 1)
        gate_ei = total[2] / total[3] if total[3] else None
        gate_gi = total[4] / total[5] if total[5] else None
        windows = self.report["windows"]
        previous = windows[-1]["loss"] if windows else None
        ratio = loss / previous if previous else None
        windows.append({"end_step": step, "loss": loss, "ratio": ratio, "gate_ei": gate_ei, "gate_gi": gate_gi})
        if ratio is not None:
            worst = self.report["worst_loss_ratio"]
            self.report["worst_loss_ratio"] = ratio if worst is None else max(worst, ratio)
            if ratio > self.spike_ratio:
                self.report["spikes"].append({"step": step, "ratio": ratio})
                self._warn(
                    trainer,
                    f"loss spike at step {step}: the mean training loss of the last {self.window} "
                    f"steps is {ratio:.1f}x the previous window's ({previous:.3g} -> {loss:.3g})",
                )
        if gate_gi is not None:
            self._watch_gate(trainer, step, gate_gi)

    def _watch_gate(self, trainer: Trainer, step: int, gate_gi: float) -> None:
        report = self.report
        if report["gate_gi_shut_at_step"] is None:
            if gate_gi <= GATE_SHUT:
                report["gate_gi_shut_at_step"] = step
            return
        worst = report["gate_gi_worst_after_shut"]
        report["gate_gi_worst_after_shut"] = gate_gi if worst is None else max(worst, gate_gi)
        was_open = len(report["windows"]) > 1 and (report["windows"][-2]["gate_gi"] or 0.0) > GATE_REOPENED
        if gate_gi > GATE_REOPENED and not was_open:
            report["gate_reopened"].append({"step": step, "gate_gi": gate_gi})
            self._warn(
                trainer,
                f"the inter gate reopened on GI prompts at step {step}: mean {gate_gi:.3f} (> {GATE_REOPENED}) over "
                f"the last {self.window} steps, after it had shut (<= {GATE_SHUT}) at step "
                f"{report['gate_gi_shut_at_step']}; GI inputs reach the adapters again",
            )

    def _warn(self, trainer: Trainer, message: str) -> None:
        if trainer.is_global_zero:
            print(f"warning: {message}", flush=True)

    # ---- per-group rows ----------------------------------------------------------------------------

    def _log_step(self, trainer: Trainer, terms: dict[str, float]) -> None:
        groups = _named_groups(trainer.optimizers[0])
        snapshot, self._snapshot = self._snapshot, None
        # one difference at a time: a generator, never a second copy of the whole group
        deltas = {n: (p.detach() - old for p, old in zip(groups[n], olds)) for n, olds in snapshot.items()}
        update_norms = _norms(trainer, deltas)
        param_norms = _norms(trainer, {n: [p.detach() for p in ps] for n, ps in groups.items()})
        if not trainer.is_global_zero:
            return
        per_group = {}
        for name in groups:
            update = update_norms.get(name)
            per_group[name] = {
                "lr": self._rates.get(name),
                "grad_norm": self._grad_norms.get(name),
                "update_norm": update,
                "update_ratio": update / param_norms[name] if update is not None and param_norms[name] else None,
                "param_norm": param_norms[name],
            }
        step = trainer.global_step
        row = {"step": step, "epoch": trainer.current_epoch, "loss_terms": terms, "groups": per_group}
        append_rows(trainer.default_root_dir, TRAIN_FILE, [row])
        metrics = {
            f"train/{what}/{name}": value
            for name, values in per_group.items()
            for what, value in values.items()
            if value is not None
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _every(self, trainer: Trainer) -> int:
        return self.log_every_n_steps or trainer.log_every_n_steps

    # ---- the fit summary's section -----------------------------------------------------------------

    def summary_section(self) -> tuple[str, dict[str, Any], list[str]]:
        """``("health", report, Markdown lines)`` for the fit summary."""
        report = self.report
        if not report:
            return "health", {}, []
        worst = report["worst_loss_ratio"]
        lines = [
            f"- loss spikes (a {self.window}-step window's mean loss above {self.spike_ratio:g}x the previous one's, "
            f"from step {report['first_window_step']}): "
            + (", ".join(f"step {s['step']} ({s['ratio']:.1f}x)" for s in report["spikes"]) or "none")
            + (f"; worst window ratio {worst:.2f}" if worst is not None else ""),
        ]
        shut = report["gate_gi_shut_at_step"]
        if shut is not None:
            reopened = ", ".join(f"step {e['step']} ({e['gate_gi']:.3f})" for e in report["gate_reopened"]) or "never"
            lines.append(
                f"- inter gate on GI prompts: shut (<= {GATE_SHUT}) by step {shut}; worst window after that "
                f"{report['gate_gi_worst_after_shut'] or 0.0:.3f}; reopened: {reopened}"
            )
        elif any(w["gate_gi"] is not None for w in report["windows"]):
            lines.append(f"- inter gate on GI prompts: never shut (<= {GATE_SHUT}) during training")
        return "health", report, lines


def _scheduler_warmup(trainer: Trainer) -> int:
    """Steps until the learning rate first peaks, read from the scheduler's own schedule (0 without one)."""
    configs = getattr(trainer, "lr_scheduler_configs", None) or []
    for config in configs:
        lambdas = getattr(config.scheduler, "lr_lambdas", None)
        if lambdas:
            total = max(1, int(trainer.estimated_stepping_batches))
            return next((s for s in range(total) if lambdas[0](s) >= 1.0), 0)
    return 0


def _named_groups(optimizer: Optimizer) -> dict[str, list[torch.Tensor]]:
    """The optimizer's parameter groups by their ``name`` (``group<i>`` for an unnamed one)."""
    return {group.get("name", f"group{i}"): list(group["params"]) for i, group in enumerate(optimizer.param_groups)}


def _norms(trainer: Trainer, tensors: dict[str, Iterable[torch.Tensor]]) -> dict[str, float]:
    """The L2 norm of each list of tensors; sharded tensors (FSDP2) are summed over ranks."""
    names = list(tensors)
    local, sharded = [], False
    for name in names:
        total = torch.zeros((), dtype=torch.float64, device=trainer.strategy.root_device)
        for t in tensors[name]:
            if isinstance(t, DTensor):
                t, sharded = t.to_local(), True
            total = total + t.detach().double().pow(2).sum()
        local.append(total)
    sums = torch.stack(local) if local else torch.zeros(0, dtype=torch.float64)
    if sharded:
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
    return {name: math.sqrt(float(value)) for name, value in zip(names, sums.tolist())}
