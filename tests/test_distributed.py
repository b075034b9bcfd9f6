"""Scale-out on CPUs with 2 gloo processes, each run a `python -m moei_lightning` subprocess.

DDP, FSDP (FSDP1) and FSDP2 with 2 ranks x batch 8 equal one process with batch 16; sharded runs
save adapter-only single-file checkpoints that resume under 2 and under 1 process, export like a
one-process run and reproduce their validation loss; validation that generates does not hang.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch import Callback, LightningModule, Trainer
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from moei_lightning.backbone import BackboneConfig
from moei_lightning.cli import main as cli_main
from moei_lightning.data import MoEIDataModule
from moei_lightning.export import ADAPTER_PARAMS, export_checkpoint
from moei_lightning.module import MoEIModule
from moei_lightning.molora import MoLoRAConfig
from moei_lightning.sharding import block_classes, import_class
from moei_lightning.strategies import clean_name, read_checkpoint
from tests.conftest import LLAMA_CONFIG, REPO, SAMPLES, T5_CONFIG, run_benchmark

STRATEGY = {name: str(REPO / "conf" / "strategy" / f"{name}.yaml") for name in ("ddp", "fsdp", "fsdp2")}
TWO_RANKS = ["--trainer.devices=2"]

# 2 ranks x batch 8 see the same examples per step as 1 rank x batch 16 (moei_lightning/data/sampling.py):
# round(16 * 0.25) == 2 * round(8 * 0.25), and 120 EI examples make 20 micro-batches of 6, a multiple of 2.
# No dropout, so the runs differ by float rounding only.
TRAIN = [
    "fit",
    "--config",
    LLAMA_CONFIG,  # the backbone whose digest fresh_backbone_digest takes, and the bundled samples
    "--trainer.max_steps=4",
    "--trainer.limit_val_batches=0",
    "--trainer.logger=false",
    "--data.max_train_examples=120",
    "--data.gi_ratio=0.25",
    "--model.molora.dropout=0.0",
    "--ei_metrics.stages=[]",  # per-aspect metrics are not what these tests are about
]
DIGEST = "--trainer.callbacks+=tests.test_distributed.FrozenDigest"  # after any --config that sets callbacks
ONE_RANK = ["--data.batch_size=16"]
ATOL = 1e-5  # adapters reach |w| ~ 0.13 after 4 steps; runs differ by ~5e-7


def checkpoint_every_2_steps(directory: Path) -> str:
    path = directory / "every-2.yaml"
    path.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {every_n_train_steps: 2, save_top_k: -1, filename: '{step}', save_last: true}\n"
    )
    return str(path)


class FrozenDigest(Callback):
    """At the end of fit, every rank writes a digest of the frozen tensors it trained with."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        digest = frozen_digest(pl_module, trainer.model)
        Path(trainer.default_root_dir, f"frozen-{trainer.global_rank}.sha256").write_text(digest)


def frozen_digest(module: torch.nn.Module, root: torch.nn.Module) -> str:
    """SHA-256 over the frozen tensors of ``module`` (``root``: its DDP/FSDP wrapper); a collective under FSDP."""
    state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True))
    frozen = {clean_name(n) for n, p in module.named_parameters() if not p.requires_grad}
    digest = hashlib.sha256()
    for name in sorted(frozen):
        tensor = state[name]
        tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_distributed(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m moei_lightning`` in its own process group, killed whole (ranks included) if it hangs."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    for key in ("MOEI_RUN_DIR", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "RANK", "WORLD_SIZE"):
        env.pop(key, None)
    command = [sys.executable, "-m", "moei_lightning", *args]
    with subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            pytest.fail(f"`{' '.join(args[:3])}` did not finish in {timeout}s (hung?):\n{err[-3000:]}")
    result = subprocess.CompletedProcess(command, process.returncode, out, err)
    assert result.returncode == 0, err[-4000:]
    return result


def adapters(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["state_dict"]


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = ATOL) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"largest difference {worst:.3g} > {atol}"


def assert_backbone_unchanged(run_dir: Path, reference: str, ranks: int = 2) -> None:
    for rank in range(ranks):
        assert (run_dir / f"frozen-{rank}.sha256").read_text() == reference, f"rank {rank} changed the backbone"


@pytest.fixture(scope="module")
def fresh_backbone_digest() -> str:
    module = MoEIModule(backbone=BackboneConfig(name_or_path="tiny-llama"), molora=MoLoRAConfig(num_experts=4))
    module.configure_model()
    return frozen_digest(module, module)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def one_process(workdir: Path) -> Path:
    """Reference: one process, batch 16, checkpoints at steps 2 and 4."""
    run_dir = workdir / "one"
    every_2 = checkpoint_every_2_steps(workdir)
    run_distributed(*TRAIN, "--config", every_2, *ONE_RANK, f"--run_dir={run_dir}", DIGEST, cwd=workdir)
    return run_dir


@pytest.fixture(scope="module")
def val_files(workdir: Path) -> list[str]:
    """An 8-example validation set (6 EI, 2 GI): with batch 1 both ranks see 4 examples, none repeated."""
    paths = []
    for domain, count in (("ei", 6), ("gi", 2)):
        lines = (SAMPLES / domain / "val.jsonl").read_text().splitlines()[:count]
        path = workdir / f"{domain}-val.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def fsdp2_run(workdir: Path, val_files: list[str]) -> Path:
    """FSDP2, 2 ranks x batch 8, checkpoints at steps 2 and 4, then validation with generation, logged to CSV."""
    run_dir = workdir / "fsdp2"
    run_distributed(
        *TRAIN,
        "--config",
        checkpoint_every_2_steps(workdir),
        "--config",
        STRATEGY["fsdp2"],
        *TWO_RANKS,
        "--trainer.limit_val_batches=null",
        "--trainer.val_check_interval=4",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={run_dir}",
        f"--data.ei_val=[{val_files[0]}]",
        f"--data.gi_val=[{val_files[1]}]",
        "--data.eval_batch_size=1",
        "--model.generate_in_eval=true",
        "--model.max_new_tokens=4",
        f"--run_dir={run_dir}",
        DIGEST,
        cwd=workdir,
    )
    return run_dir


def logged(run_dir: Path, key: str) -> float:
    (metrics,) = glob.glob(str(run_dir / "lightning_logs" / "*" / "metrics.csv"))
    with open(metrics) as file:
        values = [row[key] for row in csv.DictReader(file) if row.get(key)]
    assert values, f"{key} was not logged"
    return float(values[-1])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ddp_two_processes_equal_one_process(one_process: Path, workdir: Path, fresh_backbone_digest: str) -> None:
    run_dir = workdir / "ddp"
    run_distributed(*TRAIN, "--config", STRATEGY["ddp"], *TWO_RANKS, f"--run_dir={run_dir}", DIGEST, cwd=workdir)
    assert_close(adapters(run_dir / "checkpoints" / "last.ckpt"), adapters(one_process / "checkpoints" / "step=4.ckpt"))
    assert_backbone_unchanged(run_dir, fresh_backbone_digest)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_fsdp1_two_processes_equal_one_process(one_process: Path, workdir: Path, fresh_backbone_digest: str) -> None:
    """Lightning's FSDPStrategy refuses CPUs; the MoEI subclass runs there, wrap policy and checkpointing included."""
    run_dir = workdir / "fsdp1"
    args = ["--config", STRATEGY["fsdp"], "--trainer.precision=32-true", *TWO_RANKS, f"--run_dir={run_dir}"]
    run_distributed(*TRAIN, *args, DIGEST, cwd=workdir)
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert_close(checkpoint["state_dict"], adapters(one_process / "checkpoints" / "step=4.ckpt"))
    reference = read_checkpoint(one_process / "checkpoints" / "step=4.ckpt")["optimizer_states"][0]["state"]
    for index, state in checkpoint["optimizer_states"][0]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key], reference[index][key], atol=1e-9, rtol=1e-3)
    assert_backbone_unchanged(run_dir, fresh_backbone_digest)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_fsdp2_checkpoint_holds_adapters_only_and_reproduces_validation_loss(
    fsdp2_run: Path, one_process: Path, val_files: list[str], fresh_backbone_digest: str
) -> None:
    checkpoint_path = fsdp2_run / "checkpoints" / "last.ckpt"
    assert checkpoint_path.is_file()  # one file, not a distributed-checkpoint directory
    checkpoint = read_checkpoint(checkpoint_path)
    keys = list(checkpoint["state_dict"])
    assert keys and all(k.endswith(ADAPTER_PARAMS) and "base_layer" not in k for k in keys)
    assert all(not isinstance(v, DTensor) for v in checkpoint["state_dict"].values())
    assert_close(checkpoint["state_dict"], adapters(one_process / "checkpoints" / "step=4.ckpt"))
    assert_backbone_unchanged(fsdp2_run, fresh_backbone_digest)

    hparams = dict(checkpoint["hyper_parameters"])  # the run's settings, loss weights included
    hparams.pop("_instantiator", None)  # LightningCLI's entry, not an argument (as cli.py drops it)
    module = MoEIModule(**hparams)
    data = MoEIDataModule(ei_val=[val_files[0]], gi_val=[val_files[1]], eval_batch_size=1, max_length=256)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(module, data, ckpt_path=str(checkpoint_path), verbose=False)
    assert metrics["val/loss"] == pytest.approx(logged(fsdp2_run, "val/loss"), rel=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_validation_generates_under_fsdp2_without_hanging(fsdp2_run: Path) -> None:
    """The causal model generated in validation after training (the fixture's run has a timeout)."""
    assert 0.0 <= logged(fsdp2_run, "val/exact_match") <= 100.0  # percent


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_encoder_decoder_generates_under_fsdp2_before_any_training(workdir: Path) -> None:
    """T5's generate() calls the encoder outside the root's forward, here before any training forward."""
    result = run_distributed(
        "validate",
        "--config",
        T5_CONFIG,
        "--config",
        STRATEGY["fsdp2"],
        *TWO_RANKS,
        "--trainer.logger=false",
        "--trainer.limit_val_batches=2",
        "--data.eval_batch_size=3",
        "--model.generate_in_eval=true",
        "--model.max_new_tokens=4",
        "--ei_metrics.stages=[]",
        f"--run_dir={workdir / 't5-validate'}",
        cwd=workdir,
        timeout=240,
    )
    assert "val/exact_match" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sharded_checkpoint_resumes_under_two_and_one_process(
    fsdp2_run: Path, one_process: Path, workdir: Path
) -> None:
    step2 = str(fsdp2_run / "checkpoints" / "step=2.ckpt")
    two = workdir / "resume-2"
    run_distributed(
        *TRAIN, "--config", STRATEGY["fsdp2"], *TWO_RANKS, f"--ckpt_path={step2}", f"--run_dir={two}", cwd=workdir
    )
    resumed = read_checkpoint(two / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 4
    assert_close(resumed["state_dict"], adapters(fsdp2_run / "checkpoints" / "step=4.ckpt"), atol=1e-6)

    one = workdir / "resume-1"
    run_distributed(*TRAIN, *ONE_RANK, f"--ckpt_path={step2}", f"--run_dir={one}", cwd=workdir)
    resumed = read_checkpoint(one / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 4
    assert_close(resumed["state_dict"], adapters(one_process / "checkpoints" / "step=4.ckpt"))


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_export_from_sharded_run_matches_one_process_export(fsdp2_run: Path, one_process: Path, tmp_path: Path) -> None:
    exported = {}
    for name, run_dir in (("sharded", fsdp2_run), ("one", one_process)):
        exported[name] = tmp_path / name
        cli_main(["export", str(run_dir / "checkpoints" / "last.ckpt"), str(exported[name])])
    configs = [json.loads((exported[n] / "molora_config.json").read_text()) for n in ("sharded", "one")]
    assert configs[0] == configs[1]  # the checkpoint each came from is in moei_export.json, not here
    tensors = [load_file(str(exported[n] / "molora_model.safetensors")) for n in ("sharded", "one")]
    assert_close(*tensors)


@pytest.mark.slow
def test_export_reads_a_lightning_sharded_checkpoint_directory(one_process: Path, tmp_path: Path) -> None:
    """Lightning's own ModelParallelStrategy saves a directory of shards; export reads its adapters only."""
    checkpoint = read_checkpoint(one_process / "checkpoints" / "last.ckpt")
    sharded = tmp_path / "sharded.ckpt"
    state = {
        "state_dict": {**checkpoint.pop("state_dict"), "model.lm_head.weight": torch.zeros(3, 2)},
        "optimizer_0": {"step": torch.zeros(1)},
    }
    checkpoint.pop("optimizer_states")
    dcp.save(state, checkpoint_id=str(sharded), no_dist=True)
    torch.save(checkpoint, sharded / "meta.pt")
    from_dir = export_checkpoint(sharded, tmp_path / "from-dir")
    from_file = export_checkpoint(one_process / "checkpoints" / "last.ckpt", tmp_path / "from-file")
    a, b = (load_file(str(d / "molora_model.safetensors")) for d in (from_dir, from_file))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_activation_checkpointing_counts_routing_once() -> None:
    """Recomputed blocks overwrite their own routing records, so losses and adapter gradients do not change."""
    data = MoEIDataModule(batch_size=4, gi_ratio=0.25, max_length=128)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = MoEIModule(
            backbone=BackboneConfig(name_or_path="tiny-llama", gradient_checkpointing=checkpointing),
            molora=MoLoRAConfig(num_experts=2, rank=4, dropout=0.0),
        )
        module.configure_model()
        module.train()
        if not results:
            data.attach(module.tokenizer, module.kind)
            data.setup("fit")
            batch = next(iter(data.train_dataloader()))
        with torch.no_grad():  # a non-zero B, so every adapter tensor gets a gradient
            for name, param in module.named_parameters():
                if name.endswith("lora_B"):
                    param.normal_(std=0.02)
        terms, loss = module.objective(batch)
        loss.backward()
        assert len(module.last_routing) == 2 * 2  # q_proj and v_proj in each of the 2 layers, once each
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
        active = any(getattr(m, "gradient_checkpointing", False) for m in module.model.modules())
        results.append(({k: v.detach() for k, v in terms.items()}, grads, active))
    (plain, plain_grads, off), (checkpointed, checkpointed_grads, on) = results
    assert not off and on
    torch.testing.assert_close(checkpointed, plain)
    torch.testing.assert_close(checkpointed_grads, plain_grads)


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp2", "ddp"])
def test_strategy_configs_compose_onto_a_model_config(strategy: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            [
                "fit",
                "--config",
                str(REPO / "conf" / "llama2-13b.yaml"),
                "--config",
                STRATEGY[strategy],
                "--print_config",
            ]
        )
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    expected = {
        "fsdp": "moei_lightning.strategies.MoEIFSDPStrategy",
        "fsdp2": "moei_lightning.strategies.MoEIFSDP2Strategy",
        "ddp": "lightning.pytorch.strategies.DDPStrategy",
    }[strategy]
    assert f"class_path: {expected}" in printed
    if strategy == "fsdp":
        assert "- transformers.models.llama.modeling_llama.LlamaDecoderLayer" in printed
        assert "precision: bf16-mixed" in printed


@pytest.mark.parametrize("config", ["llama2-7b", "llama2-13b", "flan-t5-xl", "flan-t5-xxl"])
def test_large_model_configs_use_fsdp2(config: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(REPO / "conf" / f"{config}.yaml"), "--print_config"])
    assert "class_path: moei_lightning.strategies.MoEIFSDP2Strategy" in capsys.readouterr().out


def test_block_classes_come_from_the_model_or_from_class_paths() -> None:
    module = MoEIModule(backbone=BackboneConfig(name_or_path="tiny-t5"), molora=MoLoRAConfig(num_experts=2))
    module.configure_model()
    (t5_block,) = block_classes(module)  # found inside the LightningModule
    assert t5_block.__name__ == "T5Block"
    path = "transformers.models.llama.modeling_llama.LlamaDecoderLayer"
    assert block_classes(module, [path]) == (import_class(path),)
    with pytest.raises(ValueError, match="cannot be imported"):
        import_class("transformers.models.llama.modeling_llama.LlamaDecoderLayr")
    with pytest.raises(ValueError, match=r"not a torch\.nn\.Module"):
        import_class("transformers.LlamaConfig")


def test_sharded_strategies_explain_a_checkpoint_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="export"):
        read_checkpoint(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scale_benchmark_runs_on_cpu(tmp_path: Path) -> None:
    """The GPU benchmark's --smoke mode: every variant, both checkpointing settings, on a tiny model."""
    result = run_benchmark("scale_throughput", "--device", "cpu", "--smoke", cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "tokens/s" not in line]
    assert [row.split("|")[1:3] for row in rows] == [
        [" frozen ", " - "],
        [" lora ", " off "],
        [" lora ", " on "],
        [" moei ", " off "],
        [" moei ", " on "],
    ]
