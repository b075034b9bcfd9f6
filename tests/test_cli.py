"""The command line: subprocess fits as a user runs them and the files they leave; config errors and help
in-process (``main(args)`` parses, exits and prints exactly as the process does)."""

import glob
import inspect
import os
from pathlib import Path

import pytest
import torch
import yaml

from moei_lightning.backbone import BackboneConfig, load_backbone
from moei_lightning.cli import RUN_DIR_ENV, MoEICLI, MoEISaveConfig, main, register_resolvers, resolve_run_dir
from moei_lightning.data import MoEIDataModule
from moei_lightning.export import ADAPTER_PARAMS
from moei_lightning.module import MoEIModule
from moei_lightning.molora import load_adapter
from tests.conftest import LLAMA_CONFIG, T5_CONFIG, run_cli


def exit_code(args: list[str]) -> int | str | None:
    """``python -m moei_lightning ARGS`` in this process: the exit status it ends with."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


@pytest.mark.slow
@pytest.mark.parametrize("config", [LLAMA_CONFIG, T5_CONFIG], ids=["llama", "t5"])
def test_fit_leaves_adapter_checkpoint_config_and_offline_wandb_run(config: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(
        "fit",
        "--config",
        config,
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

    main(["export", str(run_dir / "checkpoints" / "last.ckpt"), str(tmp_path / "adapter")])
    model = load_adapter(backbone, tmp_path / "adapter")
    for key, tensor in checkpoint["state_dict"].items():
        assert torch.equal(model.get_parameter(key.removeprefix("model.")), tensor)


def test_runs_get_their_own_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    assert exit_code(["fit", "--config", LLAMA_CONFIG, "--print_config"]) in (0, None)
    assert "seed_everything:" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()  # printing the config starts no run
    assert RUN_DIR_ENV not in os.environ
    first = resolve_run_dir(None, "fit")
    assert resolve_run_dir(None, "fit") == first  # a DDP worker inherits its launcher's directory
    monkeypatch.delenv(RUN_DIR_ENV)
    second = resolve_run_dir(None, "fit")  # a new run in the same second
    assert second != first and first.is_dir() and second.is_dir()


@pytest.mark.parametrize("mode", ["omegaconf", "omegaconf+"])
def test_command_line_override_reaches_interpolations(mode: str, tmp_path: Path) -> None:
    args = ["--config", LLAMA_CONFIG, "--seed_everything=7", f"--run_dir={tmp_path}"]
    register_resolvers()  # what main() does first: the file names its data with ${samples:...}
    cli = MoEICLI(MoEIModule, MoEIDataModule, command="validate", args=args, parser_kwargs={"parser_mode": mode})
    assert cli.config.seed_everything == 7
    # omegaconf resolves ${seed_everything} when the file is read, before the override;
    # omegaconf+ (what python -m moei_lightning uses) resolves after merging every source.
    assert cli.config.data.seed == (7 if mode == "omegaconf+" else 42)
    assert cli.datamodule.seed == cli.config.data.seed


def test_bad_config_key_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert exit_code(["fit", "--config", LLAMA_CONFIG, "--model.lambda_intr=1"]) == 2
    assert "unknown config key 'model.lambda_intr'; did you mean 'model.lambda_inter'?" in capsys.readouterr().err
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  lambda_intr: 1\n")
    assert exit_code(["fit", "--config", LLAMA_CONFIG, "--config", str(typo)]) == 2
    assert "unknown config key 'model.lambda_intr'; did you mean 'model.lambda_inter'?" in capsys.readouterr().err
    assert exit_code(["fit", "--config", LLAMA_CONFIG, "--model.molora.num_expert=2"]) == 2
    hint = "error: unknown config key 'model.molora.num_expert'; did you mean 'model.molora.num_experts'?"
    assert capsys.readouterr().err.strip().splitlines() == [hint]


def test_bad_data_file_is_a_clean_file_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.jsonl"
    good = '{"task": "t", "domain": "ei", "aspect": "perception", "instruction": "i", "input": "x", "output": "y"}'
    bad.write_text(good + "\n" + good.replace("perception", "telepathy") + "\n")
    args = ["fit", "--config", LLAMA_CONFIG, f"--data.ei_train=[{bad}]", "--trainer.logger=false"]
    assert exit_code([*args, f"--run_dir={tmp_path}/r"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "aspect" in err
    assert "Traceback" not in err


def wandb_runs(run_dir: Path) -> list[str]:
    """The ids of the offline W&B runs in a run directory, oldest first."""
    return [p.name.rsplit("-", 1)[1] for p in sorted((run_dir / "wandb").glob("offline-run-*"))]


@pytest.mark.slow
def test_resume_test_continue_the_run_directory_and_wandb_run_with_progress_lines(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = ["--config", LLAMA_CONFIG, "--trainer.limit_train_batches=2"]
    common += ["--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
    common += ["--progress_bar.lines_every_n_steps=1"]
    first = run_cli("fit", *common, "--trainer.max_epochs=1", f"--run_dir={run_dir}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    # stdout is a pipe here, as in a SLURM log: progress comes as lines, not as a redrawn bar
    assert "train 1/2 (epoch 1/1, step 1)" in first.stdout and "train 2/2 (epoch 1/1, step 2)" in first.stdout
    assert "validate 1/1" in first.stdout
    output = first.stdout + first.stderr
    for noise in ("litlogger", "anonymous setting", "LeafSpec", "estimate number of stepping batches"):
        assert noise not in output, noise
    (original,) = wandb_runs(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"

    resumed = run_cli("fit", *common, "--trainer.max_epochs=2", f"--ckpt_path={last}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (tmp_path / "runs").exists()  # no new run directory
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    tested = run_cli("test", *common, f"--ckpt_path={last}", cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert not (tmp_path / "runs").exists()
    assert "val_check_interval" not in tested.stdout + tested.stderr
    assert wandb_runs(run_dir) == [original] * 3  # one W&B run, continued twice
    assert (run_dir / "config.yaml").is_file() and (run_dir / "config-test.yaml").is_file()
    newest = sorted((run_dir / "wandb").glob("offline-run-*"))[-1]
    assert (newest / "files" / "lightning_config-test.yaml").read_text() == (run_dir / "config-test.yaml").read_text()


def test_wandb_run_config_holds_the_whole_resolved_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = ["--config", LLAMA_CONFIG, f"--run_dir={tmp_path}"]
    args.append("--model.optimizer.init_args.lr=0.01")
    register_resolvers()
    cli = MoEICLI(
        MoEIModule, MoEIDataModule, command="validate", args=args, parser_kwargs={"parser_mode": "omegaconf+"}
    )
    (tmp_path / "config.yaml").write_text("seed_everything: 42\n")
    MoEISaveConfig(cli.parser, cli.config).save_config(cli.trainer, cli.model, "fit")
    experiment = cli.trainer.logger.experiment
    try:
        config = experiment.config.as_dict()
        assert config["model"]["optimizer"]["init_args"]["lr"] == 0.01
        in_file = yaml.safe_load(Path(LLAMA_CONFIG).read_text())
        assert config["trainer"]["max_epochs"] == in_file["trainer"]["max_epochs"]  # from the file
        template = inspect.signature(MoEIDataModule).parameters["prompt_template"].default
        assert "prompt_template" not in in_file["data"] and config["data"]["prompt_template"] == template  # the code's
        assert (Path(experiment.dir) / "lightning_config.yaml").read_text() == "seed_everything: 42\n"
    finally:
        experiment.finish()


@pytest.mark.slow
def test_misspelt_key_is_one_line_with_the_closest_key(tmp_path: Path) -> None:
    """The whole stderr of the process, imports included, is that one line."""
    result = run_cli("fit", "--config", LLAMA_CONFIG, "--model.molora.num_expert=2", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown config key 'model.molora.num_expert'; did you mean 'model.molora.num_experts'?"
    ]


def test_help_names_the_program_and_every_command(capsys: pytest.CaptureFixture) -> None:
    assert exit_code(["--help"]) in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m moei_lightning")
    for command in ("fit", "validate", "test", "predict", "export", "generate", "lm-eval"):
        assert f"\n    {command} " in out, command
    assert "--debug" in out


def test_the_command_comes_first(capsys: pytest.CaptureFixture) -> None:
    assert exit_code(["--config", LLAMA_CONFIG, "fit"]) == 2
    known = "the command line starts with one of fit, validate, test, predict, export, generate, lm-eval"
    assert capsys.readouterr().err == f"error: '--config' is not a command; {known}\n"
    assert exit_code([]) == 2
    assert capsys.readouterr().err == f"error: no command given; {known}\n"


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict", "export", "generate"])
def test_every_command_help_is_whole_sentences_of_plain_text(command: str, capsys: pytest.CaptureFixture) -> None:
    assert exit_code([command, "--help"]) in (0, None)
    out = capsys.readouterr().out
    description = " ".join(out.split("\n\n")[1].split())  # the paragraph after the usage
    assert description.endswith(".") and "``" not in description, description
    assert "make sure you never run on your" not in out and "This will call the model" not in out
    if command not in ("export", "generate"):  # those two have no traceback to show
        assert "--debug" in description
