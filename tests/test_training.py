"""Training behaviour a user relies on: the loss falls, the backbone never moves, resumes are exact."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from moei_lightning.backbone import BackboneConfig
from moei_lightning.data import MoEIDataModule
from moei_lightning.module import MoEIModule, inter_loss
from moei_lightning.molora import MoLoRAConfig, RoutingRecord
from tests.conftest import LLAMA_CONFIG, run_cli


class LossHistory(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, list[float]] = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: MoEIModule, outputs: dict, batch: dict, i: int) -> None:
        self.losses.setdefault(trainer.current_epoch, []).append(float(outputs["loss"]))


@pytest.mark.parametrize("preset", ["tiny-llama", pytest.param("tiny-t5", marks=pytest.mark.slow)])
def test_loss_goes_down_and_backbone_is_untouched(preset: str, tmp_path: Path) -> None:
    """Three epochs of 5 steps over 30 EI (+30 GI) records: the same records every epoch, as in a full run."""
    seed_everything(0)
    module = MoEIModule(
        backbone=BackboneConfig(name_or_path=preset),
        molora=MoLoRAConfig(num_experts=4, rank=8, dropout=0.0),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        warmup_steps=2,
    )
    module.configure_model()
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    data = MoEIDataModule(batch_size=8, gi_ratio=0.25, max_length=256, max_train_examples=30)
    history = LossHistory()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        callbacks=[history],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    assert [len(history.losses[e]) for e in (0, 1, 2)] == [5, 5, 5]
    first, last = (sum(history.losses[e]) / len(history.losses[e]) for e in (0, 2))
    assert last < first - 0.3, (first, last)  # deterministic under the seed; the drop seen is 0.78 (llama), 0.96 (t5)
    for name, param in module.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


@pytest.mark.slow
def test_resume_mid_epoch_ends_with_the_same_adapters(tmp_path: Path) -> None:
    every_4_steps = tmp_path / "checkpoint-every-4.yaml"
    every_4_steps.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {every_n_train_steps: 4, save_top_k: -1, filename: '{step}'}\n"
    )
    common = ["fit", "--config", LLAMA_CONFIG, "--config", str(every_4_steps)]
    common += ["--trainer.max_steps=8", "--trainer.logger=false", "--model.molora.dropout=0.1"]
    whole = run_cli(*common, f"--run_dir={tmp_path}/whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    # an interruption after step 4: a new process resumes from the step-4 checkpoint, mid-epoch
    resumed = run_cli(
        *common, f"--run_dir={tmp_path}/resumed", f"--ckpt_path={tmp_path}/whole/checkpoints/step=4.ckpt", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (
        torch.load(tmp_path / run / "checkpoints" / "step=8.ckpt", weights_only=False) for run in ("whole", "resumed")
    )
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][key]), key


def test_gate_loss_balances_classes_and_counts_one_decision_per_prompt() -> None:
    """Prompt routing: the gate loss is a BCE over one decision per sequence and layer, EI and GI halves."""
    seed_everything(0)
    module = MoEIModule(backbone=BackboneConfig(name_or_path="tiny-llama"), molora=MoLoRAConfig(num_experts=2))
    module.configure_model()
    data = MoEIDataModule(batch_size=8, gi_ratio=0.25, max_length=256)
    data.attach(module.tokenizer, module.kind)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    terms = module.losses(batch)
    gates = [r.gate for r in module.last_routing.values()]
    assert all(g.shape == (8,) for g in gates)  # one decision per sequence, not per token
    ei = batch["domain"].bool()
    bce = [torch.nn.functional.binary_cross_entropy(g, ei.float(), reduction="none") for g in gates]
    expected = torch.stack([0.5 * b[ei].mean() + 0.5 * b[~ei].mean() for b in bce]).mean()
    torch.testing.assert_close(terms["inter"], expected)
    module.gate_loss_balance = False
    torch.testing.assert_close(module.losses(batch)["inter"], torch.stack([b.mean() for b in bce]).mean())


def test_router_and_gate_train_in_their_own_group_at_a_scaled_rate(tmp_path: Path) -> None:
    module = MoEIModule(
        backbone=BackboneConfig(name_or_path="tiny-llama"),
        optimizer=lambda params: torch.optim.AdamW(params, lr=2e-3),
        router_lr_scale=10.0,
    )
    module.configure_model()
    trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, default_root_dir=tmp_path)
    module.trainer = trainer
    optimizer = module.configure_optimizers()["optimizer"]
    experts, router, gate = optimizer.param_groups
    assert [g["name"] for g in optimizer.param_groups] == ["experts", "router", "gate"]
    names = {id(p): n for n, p in module.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in experts["params"]} == {"lora_A", "lora_B"}
    assert {names[id(p)].rsplit(".", 2)[-2] for p in router["params"]} == {"router"}
    assert {tuple(names[id(p)].rsplit(".", 2)[-2:]) for p in gate["params"]} == {("gate", "weight"), ("gate", "bias")}
    rates = [g["initial_lr"] for g in optimizer.param_groups]
    assert rates == [2e-3, pytest.approx(2e-2), pytest.approx(2e-2)]


def test_a_backbone_module_named_gate_trains_at_the_backbone_rate_under_full_fine_tuning(tmp_path: Path) -> None:
    module = MoEIModule(
        backbone=BackboneConfig(name_or_path="tiny-llama"),
        adapter="full",
        optimizer=lambda params: torch.optim.AdamW(params, lr=2e-3),
        router_lr_scale=10.0,
    )
    module.configure_model()
    module.model.model.layers[0].mlp.gate = torch.nn.Linear(2, 2)  # a backbone module that is called `gate`
    module.trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, default_root_dir=tmp_path)
    optimizer = module.configure_optimizers()["optimizer"]
    assert [(g["name"], g["initial_lr"]) for g in optimizer.param_groups] == [("backbone", 2e-3)]


def test_a_gate_saturated_on_the_wrong_side_still_gets_its_gradient() -> None:
    logit = torch.tensor([30.0, -30.0], requires_grad=True)
    gate = torch.sigmoid(logit)
    assert gate[0].item() == 1.0  # fp32 rounds the open gate to 1: a BCE on it clamps at 100 and passes nothing
    record = RoutingRecord(gate, torch.ones(2, 1), torch.tensor([0, 1]), "decoder", gate_logit=logit)
    domain = torch.tensor([0, 1])  # a GI prompt on a wide-open gate, an EI prompt on a shut one
    loss = inter_loss([record], domain, balanced=True)
    loss.backward()
    assert loss.item() == pytest.approx(30.0)  # half of each class's BCE, 30 nats each
    assert logit.grad.tolist() == pytest.approx([0.5, -0.5])  # the full pull back, halved by the class balance
