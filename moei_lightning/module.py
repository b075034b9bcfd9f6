"""MoEIModule: a frozen backbone with MoLoRA adapters, trained on EI data with a GI stream for routing.

    L = L_lm(EI) + lambda_gi_lm * L_lm(GI) + lambda_inter * L_inter + lambda_bal * L_balance

``L_inter`` is a binary cross-entropy that pulls the inter gate towards 1 on the real tokens of EI
examples and towards 0 on GI examples, in every adapted layer; ``L_balance`` is the Switch-style
load-balancing term on the intra router. Both read what routing produced in that forward, captured
with :func:`moei_lightning.molora.routing` and kept as ``last_routing`` for the routing monitors.
``adapter`` selects MoEI (``molora``), the LoRA baseline (``lora``: one expert, no inter gate) or full
fine-tuning (``full``).

Under data parallelism (DDP, FSDP, FSDP2) every logged term stays this rank's own mean, but the
loss that backward sees is normalised by the token counts of all ranks, so the gradient that DDP
averages is exactly the gradient of one process over the whole global batch (see
:meth:`MoEIModule.objective`).
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.optim import Optimizer
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from moei_lightning.backbone import BackboneConfig, backbone_skeleton, load_backbone, load_tokenizer, resolve_kind
from moei_lightning.errors import CheckpointError, ConfigError, TrainingDiverged
from moei_lightning.molora import MoLoRAConfig, RoutingRecord, inject_molora, parameter_roles, routing
from moei_lightning.ranks import local_map
from moei_lightning.runner import generate_texts, sequence_logprobs
from moei_lightning.sharding import gathered_root, shard_model
from moei_lightning.strategies import clean_name

AdapterKind = Literal["molora", "lora", "full"]
# The defaults of the dataclass-typed arguments, as instances so that --print_config and a run's
# config.yaml list every field (None would hide them); MoEIModule works on copies.
DEFAULT_BACKBONE = BackboneConfig()
DEFAULT_MOLORA = MoLoRAConfig()


class MoEIModule(LightningModule):
    """The model side of MoEI: backbone, adapters, losses and optimizer.

    Args:
        backbone: which pretrained model to load (a hub id, a local directory or a tiny preset).
        adapter: ``molora`` (MoEI), ``lora`` (K=1, no inter gate: the LoRA baseline) or ``full``
            (every backbone weight trains, no adapters).
        molora: the MoLoRA expert bank; for ``lora`` only rank, alpha, dropout and target_modules
            are used.
        lambda_inter: weight of the inter-gate loss (EI tokens to the adapters, GI to the backbone).
        lambda_gi_lm: weight of the language-modelling loss on GI examples (0: GI data only teaches
            routing).
        lambda_bal: weight of the intra-router load-balancing loss.
        gate_loss_balance: weigh EI and GI decisions equally in the inter-gate loss (each class's mean,
            halved), whatever the batch's mix; otherwise every decision counts once, and the EI
            majority pulls undecided gates open.
        router_lr_scale: the intra router trains at ``lr * router_lr_scale`` (its own optimizer group).
            At the adapters' rate its softmax stays soft while the experts learn; a fast router turns
            one-hot within tens of steps and freezes an early, seed-dependent split of the tasks
            over the experts (docs/synthetic.md, "Training health").
        gate_lr_scale: the inter gate trains at ``lr * gate_lr_scale`` (its own optimizer group): it must
            end near 0 on GI, which the adapters' rate is too slow to reach in a short run.
        optimizer: the optimizer class and its arguments; it only ever sees trainable parameters.
        warmup_steps: linear warm-up steps of the cosine schedule; a value below 1 is a fraction of
            the total training steps.
        min_lr_ratio: the cosine schedule decays to ``lr * min_lr_ratio``.
        max_new_tokens: generation length for ``predict`` and ``generate_in_eval``.
        generate_in_eval: also generate a greedy reply to every validation and test prompt and log
            ``val/exact_match`` / ``test/exact_match`` (percent) against the target. Under FSDP every rank takes
            part in every decoding step (see :meth:`generate`).
    """

    def __init__(
        self,
        backbone: BackboneConfig = DEFAULT_BACKBONE,
        adapter: AdapterKind = "molora",
        molora: MoLoRAConfig = DEFAULT_MOLORA,
        lambda_inter: float = 1.0,
        lambda_gi_lm: float = 0.0,
        lambda_bal: float = 0.0,
        gate_loss_balance: bool = True,
        router_lr_scale: float = 1.0,
        gate_lr_scale: float = 10.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: float = 0.03,
        min_lr_ratio: float = 0.0,
        max_new_tokens: int = 64,
        generate_in_eval: bool = False,
    ) -> None:
        super().__init__()
        if adapter not in ("molora", "lora", "full"):
            raise ConfigError(f"model.adapter must be 'molora', 'lora' or 'full', got {adapter!r}")
        check_settings(
            lambda_inter=lambda_inter,
            lambda_gi_lm=lambda_gi_lm,
            lambda_bal=lambda_bal,
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
            max_new_tokens=max_new_tokens,
            router_lr_scale=router_lr_scale,
            gate_lr_scale=gate_lr_scale,
        )
        check_optimizer(optimizer)
        self.save_hyperparameters(ignore=["optimizer"])
        for key in ("backbone", "molora"):  # checkpoints hold plain values only (read with weights_only=True)
            if dataclasses.is_dataclass(self.hparams.get(key)):
                self.hparams[key] = dataclasses.asdict(self.hparams[key])
        # load_from_checkpoint passes the saved hyperparameters back as plain dicts (None in older checkpoints)
        if isinstance(backbone, dict):
            backbone = BackboneConfig(**backbone)
        self.backbone_config = dataclasses.replace(backbone or DEFAULT_BACKBONE)
        molora = MoLoRAConfig.from_dict(molora) if isinstance(molora, dict) else molora
        molora = dataclasses.replace(molora or DEFAULT_MOLORA)
        self.adapter = adapter
        self.molora_config = adapter_config(adapter, molora)
        self.lambda_inter, self.lambda_gi_lm, self.lambda_bal = lambda_inter, lambda_gi_lm, lambda_bal
        self.gate_loss_balance, self.router_lr_scale = gate_loss_balance, router_lr_scale
        self.gate_lr_scale = gate_lr_scale
        self.optimizer_factory = optimizer
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.max_new_tokens = max_new_tokens
        self.generate_in_eval = generate_in_eval
        # The DataModule tokenises at setup, which Lightning runs before configure_model.
        self.tokenizer = load_tokenizer(self.backbone_config)
        self.kind = resolve_kind(self.backbone_config)
        self.model: nn.Module | None = None
        # What routing produced in the latest loss forward, per adapted layer: the routing monitors read it.
        self.last_routing: dict[str, RoutingRecord] = {}
        self.strict_loading = False  # checkpoints hold trainable tensors only; on_load_checkpoint checks them

    def configure_model(self) -> None:
        """Load the backbone here, so under sharded strategies no rank builds a full copy it does not need.

        Under ``ModelParallelStrategy`` (FSDP2) the model is built on the meta device, sharded block by
        block and filled from rank 0. Otherwise a GPU rank reads the weights straight onto its device.
        """
        if self.model is not None:
            return
        mesh = self.device_mesh
        if mesh is None:
            model = self._with_adapters(load_backbone(self.backbone_config, device=self._load_device()))
        else:
            model = self._sharded(mesh)
        self.model = model.train(self.training)  # the loader returns eval mode; Lightning switches modes from here

    def _with_adapters(self, model: nn.Module) -> nn.Module:
        if self.molora_config is None:
            model.requires_grad_(True)
        else:
            inject_molora(model, self.molora_config)
        return model

    def _running_trainer(self) -> Trainer | None:
        """The Trainer this module runs under, or None outside one (where ``self.trainer`` raises)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    def _load_device(self) -> torch.device | None:
        """The GPU this rank trains on, if any; the CPU copy is skipped by loading straight onto it."""
        trainer = self._running_trainer()
        device = trainer.strategy.root_device if trainer is not None else None
        return device if device is not None and device.type != "cpu" else None

    def _sharded(self, mesh: DeviceMesh) -> nn.Module:
        """The backbone and adapters with ``fully_shard`` on each decoder block, then the root."""
        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "MoEI shards with FSDP2 only and has no tensor-parallel plan; use "
                "moei_lightning.strategies.MoEIFSDP2Strategy (conf/strategy/fsdp2.yaml) or tensor_parallel_size: 1"
            )
        strategy = self.trainer.strategy
        return shard_model(
            build=lambda: self._with_adapters(load_backbone(self.backbone_config)),
            skeleton=lambda: self._with_adapters(backbone_skeleton(self.backbone_config)),
            mesh=mesh["data_parallel"] if "data_parallel" in names else mesh,
            device=strategy.root_device,
            layer_classes=getattr(strategy, "layer_classes", None),
            reshard_after_forward=getattr(strategy, "reshard_after_forward", True),
        )

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: every trainable tensor (the adapters), never the frozen backbone."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Every loss term (this rank's means) and their weighted sum under ``loss``."""
        return self.objective(batch)[0]

    def objective(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The loss terms, and the loss to backpropagate through.

        With one process the two losses are the same tensor. With ``W`` data-parallel ranks each token
        mean is rescaled by ``W * n_rank / n_all`` (``n``: the tokens it averages over, summed over ranks
        with one all-reduce), which turns DDP's average of the ranks' gradients into the gradient of the
        mean over every token of the global batch: the same update as one process with ``W`` times the
        batch. The load-balancing term is a product of means and stays per rank.
        """
        with routing(self.model) as capture:
            logprobs, supervised = sequence_logprobs(self.model, batch, self.kind)
        self.last_routing = capture.records
        token_loss = -logprobs
        is_ei = batch["domain"].bool()[:, None]
        masks = {"lm_ei": supervised & is_ei, "lm_gi": supervised & ~is_ei}
        terms = {name: masked_mean(token_loss, mask) for name, mask in masks.items()}
        records = list(capture.records.values())
        gates = [r for r in records if r.gate_logit is not None and r.gate_logit.numel()]
        self._check_gates(gates)  # a NaN gate would crash the BCE (a device assert on CUDA) with no hint why
        counts = {name: mask.sum() for name, mask in masks.items()}
        for record in gates:
            counts.update(gate_counts(record, batch["domain"], self.gate_loss_balance))
        scale = self._data_parallel_scales(counts)

        def combine(weights: dict[str, torch.Tensor] | None) -> torch.Tensor:
            w = weights or {}
            total = w.get("lm_ei", 1) * terms["lm_ei"] + self.lambda_gi_lm * w.get("lm_gi", 1) * terms["lm_gi"]
            if gates:
                total = total + self.lambda_inter * inter_loss(gates, batch["domain"], self.gate_loss_balance, w)
            if records:
                total = total + self.lambda_bal * terms["balance"]
            return total

        if gates:
            terms["inter"] = inter_loss(gates, batch["domain"], self.gate_loss_balance)
        if records:
            terms["balance"] = balance_loss(records)
        terms["loss"] = combine(None)
        return terms, terms["loss"] if scale is None else combine(scale)

    def _data_parallel_scales(self, counts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """``W * n_rank / n_all`` per token count, or None with one process or outside training."""
        trainer = self._running_trainer()
        if trainer is None or trainer.world_size == 1 or not self.training:
            return None
        local = torch.stack([c.float() for c in counts.values()])
        total = local.clone()
        dist.all_reduce(total)
        scales = (local * trainer.world_size / total.clamp_min(1)).detach()
        return dict(zip(counts, scales))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        terms, loss = self.objective(batch)
        self._check_terms(terms, batch_idx)
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, prog_bar=False, batch_size=len(batch["id"]))
        self.log("loss", terms["loss"].detach(), prog_bar=True, logger=False)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        replies = self.generate(batch["prompt"]) if self.generate_in_eval else None
        terms = self.losses(batch)
        if replies is not None:
            hits = [normalise(r) == normalise(t) for r, t in zip(replies, batch["target"])]
            terms["exact_match"] = torch.tensor(100.0 * sum(hits) / len(hits), device=terms["loss"].device)
        size = len(batch["id"])
        self.log_dict({f"{stage}/{k}": v for k, v in terms.items()}, sync_dist=True, batch_size=size)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, str]]:
        """Greedy generations for the prompts of the batch, with their ids, prompts and references."""
        texts = self.generate(batch["prompt"])
        fields = zip(batch["id"], batch["task"], batch["aspect"], batch["prompt"], texts, batch["target"])
        return [
            {"id": i, "task": t, "aspect": a, "prompt": q, "prediction": p, "target": r} for i, t, a, q, p, r in fields
        ]

    def generate(self, prompts: list[str], max_new_tokens: int | None = None) -> list[str]:
        """Greedy, deterministic continuations of ``prompts``.

        Under FSDP every decoding step all-gathers weights, so every rank must run the same number of
        forwards: ranks pad their prompt lists to the longest one (the padding's replies are
        dropped) and generate with ``synced_gpus``, which keeps a rank that has finished stepping
        until all have. Every rank must call this, as the validation, test and predict steps do.
        Under FSDP1 call it from inside those steps (the root unit's weights are gathered there);
        under FSDP2 the root's weights are gathered here.
        """
        max_new_tokens = max_new_tokens or self.max_new_tokens
        if not self._is_sharded():
            return generate_texts(self.model, self.tokenizer, self.kind, prompts, max_new_tokens)

        def run(padded: list[str]) -> list[str]:
            return generate_texts(self.model, self.tokenizer, self.kind, padded, max_new_tokens, synced_gpus=True)

        with gathered_root(self.model):
            return local_map(run, prompts, "", self.device)

    def _is_sharded(self) -> bool:
        """Whether a forward is a collective: FSDP2 shards the model, or FSDP1 wraps the module."""
        trainer = self._running_trainer()
        if trainer is None or trainer.world_size == 1:
            return False
        return isinstance(self.model, FSDPModule) or isinstance(trainer.model, FullyShardedDataParallel)

    def configure_gradient_clipping(
        self, optimizer: Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Under FSDP1 the root unit clips (Lightning's FSDP precision plugin cannot); elsewhere as usual."""
        root = self.trainer.model
        if isinstance(root, FullyShardedDataParallel) and gradient_clip_val and gradient_clip_algorithm != "value":
            root.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The trainable parameters by role: ``experts``, ``router``, ``gate`` (MoLoRA) or ``backbone`` (full).

        The adapter layers declare their parameters' roles, so a backbone module that happens to be
        called ``gate`` or ``router`` never trains at the routing rate.
        """
        roles = parameter_roles(self.model)
        groups: dict[str, list[nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                groups.setdefault(roles.get(name, "backbone"), []).append(p)
        return groups

    def configure_optimizers(self) -> dict[str, Any]:
        """One optimizer group per parameter role; the router and the gate train at their own multiple of ``lr``."""
        groups = self.parameter_groups()
        if not groups:
            raise ValueError("the model has no trainable parameter; check model.adapter and molora.target_modules")
        optimizer = self.optimizer_factory([{"params": params, "name": role} for role, params in groups.items()])
        scales = {"router": self.router_lr_scale, "gate": self.gate_lr_scale}
        for group in optimizer.param_groups:
            group["lr"] *= scales.get(group["name"], 1.0)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup_steps * total) if self.warmup_steps < 1 else int(self.warmup_steps)
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup, num_training_steps=total, min_lr_rate=self.min_lr_ratio
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _where(self) -> str:
        if self._running_trainer() is None:
            return "this forward"
        return f"step {self.global_step} (epoch {self.current_epoch})"

    def _check_gates(self, gates: list) -> None:
        """Stop on a non-finite inter-gate logit, naming the layer."""
        if not gates:
            return
        sums = torch.stack([r.gate_logit.detach().float().sum() for r in gates])
        if bool(torch.isfinite(sums).all()):
            return
        names = {id(record): name for name, record in self.last_routing.items()}
        layer = next(names.get(id(r), "?") for r, total in zip(gates, sums.tolist()) if not math.isfinite(total))
        raise TrainingDiverged(
            f"training diverged at {self._where()}: the inter gate of {layer} is NaN, so loss term 'inter' "
            f"cannot be computed; {DIVERGENCE_HINT}"
        )

    def _check_terms(self, terms: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Stop on a non-finite loss term before backward, naming the step and the term."""
        values = torch.stack([t.detach().float() for t in terms.values()])
        if bool(torch.isfinite(values).all()):
            return
        shown = {name: float(v) for name, v in zip(terms, values.tolist())}
        bad = next((n for n, v in shown.items() if not math.isfinite(v) and n != "loss"), "loss")
        listing = ", ".join(f"{name}={v:.4g}" for name, v in shown.items())
        raise TrainingDiverged(
            f"training diverged at {self._where()}, batch {batch_idx}: loss term '{bad}' is {shown[bad]} "
            f"({listing}); {DIVERGENCE_HINT}"
        )

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Stop before a non-finite gradient reaches the weights (fp16's loss scaler skips those steps itself)."""
        if str(self.trainer.precision).startswith("16"):
            return
        named = [(n, p.grad) for n, p in self.named_parameters() if p.requires_grad and p.grad is not None]
        if not named:
            return
        finite = torch.stack([torch.isfinite(g).all() for _, g in named])
        if bool(finite.all()):
            return
        name = next(clean_name(n) for (n, _), ok in zip(named, finite.tolist()) if not ok)
        raise TrainingDiverged(
            f"training diverged at {self._where()}: the gradient of {name} is not finite; {DIVERGENCE_HINT}"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in self._trainable_names()}
        bad = sorted(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not v.isfinite().all())
        if bad:  # never replace a good checkpoint with a diverged one
            raise TrainingDiverged(
                f"refusing to save a checkpoint at {self._where()}: tensors {bad[:4]} hold NaN or infinite values; "
                f"{DIVERGENCE_HINT}"
            )
        checkpoint["rng_states"] = rng_states()  # adapter dropout continues its stream after a resume
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            per_rank: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(per_rank, checkpoint["rng_states"])  # only rank 0 writes the file
            checkpoint["rng_states_per_rank"] = per_rank

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        per_rank = checkpoint.get("rng_states_per_rank")
        if per_rank and dist.is_available() and dist.is_initialized() and dist.get_world_size() == len(per_rank):
            set_rng_states(per_rank[dist.get_rank()])  # same world size: each rank continues its own stream
        elif "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])
        if self.model is None:
            self.configure_model()
        shapes, saved = self._trainable_shapes(), checkpoint["state_dict"]
        trainer = self._running_trainer()
        where = f"--ckpt_path {trainer.ckpt_path}: " if trainer is not None else ""
        if shapes.keys() != saved.keys():
            missing, extra = sorted(shapes.keys() - saved.keys())[:8], sorted(saved.keys() - shapes.keys())[:8]
            raise CheckpointError(
                f"{where}the checkpoint's tensors do not match this model's trainable tensors: missing {missing}, "
                f"unexpected {extra}; it was saved with another model.adapter, model.molora or backbone"
            )
        wrong = [
            f"{name} {tuple(saved[name].shape)} (model: {shape})"
            for name, shape in shapes.items()
            if tuple(saved[name].shape) != shape
        ]
        if wrong:
            raise CheckpointError(
                f"{where}{len(wrong)} tensors have other shapes than this model's, e.g. {wrong[0]}; it was saved "
                "with another model.molora (num_experts, rank) or backbone: set those to the checkpoint's values"
            )

    def _trainable_names(self) -> set[str]:
        return set(self._trainable_shapes())

    def _trainable_shapes(self) -> dict[str, tuple[int, ...]]:
        return {clean_name(name): tuple(p.shape) for name, p in self.named_parameters() if p.requires_grad}


GRADIENT_CLIP_NORM = 1.0
"""The CLI's default ``trainer.gradient_clip_val`` (global L2 norm). A batch whose prompts sit on the
wrong side of a confident inter gate sends a large gate-loss gradient through the layers below it;
unclipped, such batches moved what the experts had learned (on the tiny default, clipping raised the
validation EI gain from +31 to +46 points over three seeds: docs/synthetic.md, "Training health")."""

DIVERGENCE_HINT = (
    "no checkpoint was written after this, so the last one saved is intact; lower the learning rate "
    "(model.optimizer.init_args.lr), check model.molora.alpha and the lambda_* weights, or resume from that checkpoint"
)


def check_optimizer(optimizer: OptimizerCallable) -> None:
    """Build the optimizer once on a stand-in parameter: a bad argument fails at start, not after the logger began."""
    try:
        optimizer([nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise ConfigError(f"config key model.optimizer.init_args: the optimizer refuses them: {err}") from err


def check_settings(**settings: float) -> None:
    """Loss weights and schedule settings: finite, and in their range, or a ConfigError naming the key."""
    ranges = {
        "lambda_inter": (0, math.inf, "a finite number >= 0"),
        "lambda_gi_lm": (0, math.inf, "a finite number >= 0"),
        "lambda_bal": (0, math.inf, "a finite number >= 0"),
        "warmup_steps": (0, math.inf, "a finite number >= 0 (below 1: a fraction of all steps)"),
        "min_lr_ratio": (0, 1, "a number in [0, 1]"),
        "max_new_tokens": (1, math.inf, "a positive integer"),
        "router_lr_scale": (0, math.inf, "a finite number >= 0"),
        "gate_lr_scale": (0, math.inf, "a finite number >= 0"),
    }
    for key, value in settings.items():
        low, high, expected = ranges[key]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and low <= value <= high):
            raise ConfigError(f"config key model.{key}: expected {expected}, got {value!r}")


def rng_states() -> dict[str, Any]:
    """The random states that adapter dropout and data code draw from."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def adapter_config(adapter: AdapterKind, molora: MoLoRAConfig) -> MoLoRAConfig | None:
    """The MoLoRA settings an adapter kind implies: ``lora`` is one expert with no router or gate."""
    if adapter == "full":
        return None
    if adapter == "lora":
        return dataclasses.replace(molora, num_experts=1, inter="none", top_k=None, routing="token")
    return molora


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked entries; zero (still in the graph) when there are none."""
    return (values * mask).sum() / mask.sum().clamp_min(1)


def gate_counts(record: Any, domain: torch.Tensor, balanced: bool) -> dict[str, torch.Tensor]:
    """How many decisions each mean of :func:`inter_loss` averages over, keyed as its ``scales``."""
    if not balanced:
        return {record.stream: torch.tensor(record.gate_logit.numel(), device=domain.device)}
    ei = domain[record.example_index].bool()
    return {f"{record.stream}:ei": ei.sum(), f"{record.stream}:gi": (~ei).sum()}


def inter_loss(
    records: list, domain: torch.Tensor, balanced: bool = False, scales: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """BCE between each layer's inter gate and its decisions' domain (1 = EI), averaged over layers.

    It is computed from the gate's logit: above a logit of ~17 fp32 rounds the sigmoid to exactly 1,
    where a BCE on the probability clamps at 100 and passes no gradient, so a layer whose gate had
    opened wide on GI inputs could never shut again.

    A decision is a token (token routing) or a sequence (prompt routing). ``balanced`` averages the
    EI and the GI decisions apart and takes half of each. ``scales`` multiplies each mean by a factor
    per key of :func:`gate_counts` (the data-parallel correction).
    """
    scales = scales or {}
    per_layer = []
    with torch.autocast(device_type=domain.device.type, enabled=False):
        for r in records:
            if not r.gate_logit.numel():
                continue
            target = domain[r.example_index].float()
            bce = F.binary_cross_entropy_with_logits(r.gate_logit.float(), target, reduction="none")
            if balanced:
                ei = target.bool()
                per_layer.append(
                    0.5 * scales.get(f"{r.stream}:ei", 1) * masked_mean(bce, ei)
                    + 0.5 * scales.get(f"{r.stream}:gi", 1) * masked_mean(bce, ~ei)
                )
            else:
                per_layer.append(scales.get(r.stream, 1) * bce.mean())
    return torch.stack(per_layer).mean()


def normalise(text: str) -> str:
    """Case and spacing do not count against an exact match."""
    return " ".join(text.lower().split())


def balance_loss(records: list) -> torch.Tensor:
    """Switch-style load balance: K * sum_k (fraction of tokens whose top expert is k) * (mean p_k).

    It is 1 for perfectly even routing and grows as the router collapses onto few experts.
    """
    per_layer = []
    for record in records:
        if record.num_experts == 1:  # one expert takes every token: exactly 1, without reading the record
            per_layer.append(torch.ones((), device=record.device))
            continue
        probs = record.probs.float()
        if probs.numel() == 0:
            continue
        experts = probs.shape[-1]
        top = F.one_hot(probs.argmax(-1), experts).float().mean(0)
        per_layer.append(experts * (top * probs.mean(0)).sum())
    return torch.stack(per_layer).mean()
