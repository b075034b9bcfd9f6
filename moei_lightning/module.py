"""MoEIModule: a frozen backbone with MoLoRA adapters, trained on EI data with a GI stream for routing.

    L = L_lm(EI) + lambda_gi_lm * L_lm(GI) + lambda_inter * L_inter + lambda_bal * L_balance

``L_inter`` is a binary cross-entropy that pulls the inter gate towards 1 on the real tokens of EI
examples and towards 0 on GI examples, in every adapted layer; ``L_balance`` is the Switch-style
load-balancing term on the intra router. Both read the routing recorder that the adapters write to
during the forward. ``adapter`` selects MoEI (``molora``), the LoRA baseline (``lora``: one expert,
no inter gate) or full fine-tuning (``full``).
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from moei_lightning.backbone import BackboneConfig, load_backbone, load_tokenizer, resolve_kind
from moei_lightning.eval.scoring import generate_texts, sequence_logprobs
from moei_lightning.molora import MoLoRAConfig, RoutingRecorder, inject_molora

AdapterKind = Literal["molora", "lora", "full"]


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
        optimizer: the optimizer class and its arguments; it only ever sees trainable parameters.
        warmup_steps: linear warm-up steps of the cosine schedule; a value below 1 is a fraction of
            the total training steps.
        min_lr_ratio: the cosine schedule decays to ``lr * min_lr_ratio``.
        max_new_tokens: generation length for ``predict``.
    """

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        adapter: AdapterKind = "molora",
        molora: MoLoRAConfig | None = None,
        lambda_inter: float = 1.0,
        lambda_gi_lm: float = 0.0,
        lambda_bal: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: float = 0.03,
        min_lr_ratio: float = 0.0,
        max_new_tokens: int = 64,
    ) -> None:
        super().__init__()
        if adapter not in ("molora", "lora", "full"):
            raise ValueError(f"model.adapter must be 'molora', 'lora' or 'full', got {adapter!r}")
        self.save_hyperparameters(ignore=["optimizer"])
        # load_from_checkpoint passes the saved hyperparameters back as plain dicts
        self.backbone_config = (
            BackboneConfig(**backbone) if isinstance(backbone, dict) else backbone or BackboneConfig()
        )
        molora = MoLoRAConfig.from_dict(molora) if isinstance(molora, dict) else molora or MoLoRAConfig()
        self.adapter = adapter
        self.molora_config = adapter_config(adapter, molora)
        self.lambda_inter, self.lambda_gi_lm, self.lambda_bal = lambda_inter, lambda_gi_lm, lambda_bal
        self.optimizer_factory = optimizer
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.max_new_tokens = max_new_tokens
        # The DataModule tokenises at setup, which Lightning runs before configure_model.
        self.tokenizer = load_tokenizer(self.backbone_config)
        self.kind = resolve_kind(self.backbone_config)
        self.model: nn.Module | None = None
        self.strict_loading = False  # checkpoints hold trainable tensors only; on_load_checkpoint checks them

    def configure_model(self) -> None:
        """Load the backbone here, so under sharded strategies no rank builds a full copy it does not need."""
        if self.model is not None:
            return
        model = load_backbone(self.backbone_config)
        if self.molora_config is None:
            model.requires_grad_(True)
        else:
            inject_molora(model, self.molora_config)
        self.model = model.train(self.training)  # the loader returns eval mode; Lightning switches modes from here

    @property
    def recorder(self) -> RoutingRecorder | None:
        return getattr(self.model, "molora_recorder", None)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: every trainable tensor (the adapters), never the frozen backbone."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Every loss term and their weighted sum under ``loss``."""
        logprobs, supervised = sequence_logprobs(self.model, batch, self.kind)
        token_loss = -logprobs
        is_ei = batch["domain"].bool()[:, None]
        terms = {
            "lm_ei": masked_mean(token_loss, supervised & is_ei),
            "lm_gi": masked_mean(token_loss, supervised & ~is_ei),
        }
        total = terms["lm_ei"] + self.lambda_gi_lm * terms["lm_gi"]
        if self.recorder is not None and self.recorder.records:
            gates = [r for r in self.recorder.records.values() if r.gate is not None]
            if gates:
                terms["inter"] = inter_loss(gates, batch["domain"])
                total = total + self.lambda_inter * terms["inter"]
            terms["balance"] = balance_loss(list(self.recorder.records.values()))
            total = total + self.lambda_bal * terms["balance"]
        terms["loss"] = total
        return terms

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        terms = self.losses(batch)
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, prog_bar=False, batch_size=len(batch["id"]))
        self.log("loss", terms["loss"].detach(), prog_bar=True, logger=False)
        return terms["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        terms = self.losses(batch)
        size = len(batch["id"])
        self.log_dict({f"{stage}/{k}": v for k, v in terms.items()}, sync_dist=True, batch_size=size)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, str]]:
        """Greedy generations for the prompts of the batch, with their ids and references."""
        texts = self.generate(batch["prompt"])
        return [
            {"id": i, "task": t, "aspect": a, "prediction": p, "target": r}
            for i, t, a, p, r in zip(batch["id"], batch["task"], batch["aspect"], texts, batch["target"])
        ]

    def generate(self, prompts: list[str], max_new_tokens: int | None = None) -> list[str]:
        """Greedy, deterministic continuations of ``prompts``."""
        return generate_texts(self.model, self.tokenizer, self.kind, prompts, max_new_tokens or self.max_new_tokens)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameter; check model.adapter and molora.target_modules")
        optimizer = self.optimizer_factory(params)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup_steps * total) if self.warmup_steps < 1 else int(self.warmup_steps)
        schedule = cosine_with_warmup(warmup, total, self.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in self._trainable_names()}
        checkpoint["rng_states"] = rng_states()  # adapter dropout continues its stream after a resume

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])
        if self.model is None:
            self.configure_model()
        expected, saved = self._trainable_names(), set(checkpoint["state_dict"])
        if expected != saved:
            missing, extra = sorted(expected - saved)[:8], sorted(saved - expected)[:8]
            raise ValueError(
                f"the checkpoint's tensors do not match this model's trainable tensors: missing {missing}, "
                f"unexpected {extra}; it was saved with another model.adapter, model.molora or backbone"
            )

    def _trainable_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}


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


def inter_loss(records: list, domain: torch.Tensor) -> torch.Tensor:
    """BCE between each layer's inter gate and the token's domain (1 = EI), averaged over layers."""
    with torch.autocast(device_type=domain.device.type, enabled=False):
        per_layer = [
            F.binary_cross_entropy(r.gate.float(), domain[r.example_index].float()) for r in records if r.gate.numel()
        ]
    return torch.stack(per_layer).mean()


def balance_loss(records: list) -> torch.Tensor:
    """Switch-style load balance: K * sum_k (fraction of tokens whose top expert is k) * (mean p_k).

    It is 1 for perfectly even routing and grows as the router collapses onto few experts.
    """
    per_layer = []
    for record in records:
        probs = record.probs.float()
        if probs.numel() == 0:
            continue
        experts = probs.shape[-1]
        top = F.one_hot(probs.argmax(-1), experts).float().mean(0)
        per_layer.append(experts * (top * probs.mean(0)).sum())
    return torch.stack(per_layer).mean()


def cosine_with_warmup(warmup: int, total: int, min_ratio: float) -> Any:
    """LR multiplier: linear from 0 over ``warmup`` steps, then cosine down to ``min_ratio``."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier
