"""The command line as a user runs it: subprocess fits, the files they leave, and config errors."""

import glob
import os
from pathlib import Path

import pytest
import torch

from moei_lightning.backbone import BackboneConfig, load_backbone
from moei_lightning.cli import RUN_DIR_ENV, MoEICLI, resolve_run_dir
from moei_lightning.data import MoEIDataModule
from moei_lightning.export import ADAPTER_PARAMS
from moei_lightning.module import MoEIModule
from moei_lightning.molora import load_adapter
from tests.conftest import REPO, run_cli


@pytest.mark.slow
@pytest.mark.parametrize("config", ["tiny.yaml", "tiny-t5.yaml"])
def test_fit_leaves_adapter_checkpoint_config_and_offline_wandb_run(config: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(
        "fit",
        "--config",
        str(REPO / "conf" / config),
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=1",
        f"--run_dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "config.yaml").is_file()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    keys = list(checkpoint["state_dict"])
    assert keys and all(k.endswith(ADAPTER_PARAMS) and "base_layer" not in k for k in keys)
    backbone = load_backbone(BackboneConfig(name_or_path=checkpoint["hyper_parameters"]["backbone"]["name_or_path"]))
    assert not set(keys) & {f"model.{name}" for name, _ in backbone.named_parameters()}
    wandb_files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert wandb_files and os.path.getsize(wandb_files[0]) > 0

    exported = run_cli("export", str(run_dir / "checkpoints" / "last.ckpt"), str(tmp_path / "adapter"), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    model = load_adapter(backbone, tmp_path / "adapter")
    for key, tensor in checkpoint["state_dict"].items():
        assert torch.equal(model.get_parameter(key.removeprefix("model.")), tensor)


def test_runs_get_their_own_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    printed = run_cli("fit", "--config", str(REPO / "conf" / "tiny.yaml"), "--print_config", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    assert not (tmp_path / "runs").exists()  # printing the config starts no run
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    first = resolve_run_dir(None, "fit")
    assert resolve_run_dir(None, "fit") == first  # a DDP worker inherits its launcher's directory
    monkeypatch.delenv(RUN_DIR_ENV)
    second = resolve_run_dir(None, "fit")  # a new run in the same second
    assert second != first and first.is_dir() and second.is_dir()


@pytest.mark.parametrize("mode", ["omegaconf", "omegaconf+"])
def test_command_line_override_reaches_interpolations(mode: str, tmp_path: Path) -> None:
    args = ["--config", str(REPO / "conf" / "tiny.yaml"), "--seed_everything=7", f"--run_dir={tmp_path}"]
    cli = MoEICLI(MoEIModule, MoEIDataModule, run=False, args=args, parser_kwargs={"parser_mode": mode})
    assert cli.config.seed_everything == 7
    # omegaconf resolves ${seed_everything} when the file is read, before the override;
    # omegaconf+ (what python -m moei_lightning uses) resolves after merging every source.
    assert cli.config.data.seed == (7 if mode == "omegaconf+" else 42)
    assert cli.datamodule.seed == cli.config.data.seed


def test_bad_config_key_names_the_key(tmp_path: Path) -> None:
    result = run_cli("fit", "--config", str(REPO / "conf" / "tiny.yaml"), "--model.lambda_intr=1", cwd=tmp_path)
    assert result.returncode != 0
    assert "unrecognized arguments: --model.lambda_intr=1" in result.stderr
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  lambda_intr: 1\n")
    result = run_cli("fit", "--config", str(REPO / "conf" / "tiny.yaml"), "--config", str(typo), cwd=tmp_path)
    assert result.returncode != 0
    assert "does not accept option 'model.lambda_intr'" in result.stderr


def test_bad_data_file_is_a_clean_file_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    good = '{"task": "t", "domain": "ei", "aspect": "perception", "instruction": "i", "input": "x", "output": "y"}'
    bad.write_text(good + "\n" + good.replace("perception", "telepathy") + "\n")
    result = run_cli(
        "fit",
        "--config",
        str(REPO / "conf" / "tiny.yaml"),
        f"--data.ei_train=[{bad}]",
        f"--run_dir={tmp_path}/r",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert f"{bad}:2" in result.stderr and "aspect" in result.stderr
    assert "Traceback" not in result.stderr
