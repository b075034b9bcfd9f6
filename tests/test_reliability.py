"""Never lose work, never take bad input silently: signals, divergence, untrusted files, clean errors.

What each test guards is listed in docs/reliability.md.
"""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from safetensors.torch import load_file, save_file

from moei_lightning import cli
from moei_lightning.backbone import BackboneConfig, load_backbone, load_tokenizer
from moei_lightning.callbacks.interrupt import InterruptCheckpoint
from moei_lightning.checkpoints import AtomicCheckpointIO, read_checkpoint_file
from moei_lightning.cli import RUN_DIR_ENV, MoEICLI
from moei_lightning.data import DataError, MoEIDataModule, load_prompts, load_records
from moei_lightning.errors import CheckpointError, CheckpointWriteError, ConfigError
from moei_lightning.export import export_checkpoint, load_checkpoint
from moei_lightning.export import main as export_main
from moei_lightning.module import MoEIModule, check_settings
from moei_lightning.molora import MoLoRAConfig, adapter_state_dict, inject_molora, load_adapter, save_adapter
from moei_lightning.molora.errors import MoLoRAError
from moei_lightning.run_lock import lock_run_dir, release_run_dirs
from moei_lightning.strategies import read_checkpoint
from tests.conftest import LLAMA_CONFIG, REPO, run_cli

FIT = ("fit", "--config", LLAMA_CONFIG, "--trainer.logger=false")  # the config's checkpoints: last.ckpt only
RECORD = {"task": "t", "domain": "ei", "aspect": "perception", "instruction": "i", "input": "x", "output": "y"}


class Evil:
    """Unpickling this runs ``touch <marker>``: what a crafted checkpoint does to an unsafe loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hparams(num_experts: int = 2) -> dict:
    return {
        "backbone": {"name_or_path": "tiny-llama"},
        "adapter": "molora",
        "molora": {**MoLoRAConfig(num_experts=num_experts).to_dict()},
        "max_new_tokens": 16,
    }


# --- data ------------------------------------------------------------------------------------------


def test_jsonl_with_line_separators_inside_strings_and_a_bom_is_read(tmp_path):
    path = tmp_path / "odd.jsonl"
    lines = [json.dumps({**RECORD, "id": "a", "input": "one\u2028two\u0085three"}, ensure_ascii=False)]
    lines.append(json.dumps({**RECORD, "id": "b"}))
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n")
    records = load_records([path])
    assert [r.id for r in records] == ["a", "b"]
    assert records[0].input == "one\u2028two\u0085three"


def test_an_id_in_both_the_ei_and_gi_files_of_a_split_is_an_error(tmp_path):
    ei, gi = tmp_path / "ei.jsonl", tmp_path / "gi.jsonl"
    ei.write_text(json.dumps({**RECORD, "id": "same"}) + "\n")
    gi_record = {**RECORD, "id": "same", "domain": "gi", "aspect": "knowledge", "choices": ["y", "n"]}
    gi.write_text(json.dumps(gi_record) + "\n")
    data = MoEIDataModule(ei_val=[str(ei)], gi_val=[str(gi)])
    data.attach(load_tokenizer(BackboneConfig(name_or_path="tiny-llama")), "causal")
    with pytest.raises(DataError, match=r"gi\.jsonl:1: field 'id': duplicate id 'same', first seen at .*ei\.jsonl:1"):
        data.setup("validate")


def test_records_without_ids_in_same_named_ei_and_gi_files_do_not_collide(tmp_path):
    (tmp_path / "ei").mkdir(), (tmp_path / "gi").mkdir()
    (tmp_path / "ei" / "val.jsonl").write_text(json.dumps(RECORD) + "\n")
    gi_record = {**RECORD, "domain": "gi", "aspect": "knowledge", "choices": ["y", "n"]}
    (tmp_path / "gi" / "val.jsonl").write_text(json.dumps(gi_record) + "\n")
    data = MoEIDataModule(ei_val=[str(tmp_path / "ei")], gi_val=[str(tmp_path / "gi")])
    data.attach(load_tokenizer(BackboneConfig(name_or_path="tiny-llama")), "causal")
    data.setup("validate")
    assert [e.record.id for e in data.examples("val")] == ["ei/val:1", "gi/val:1"]


def test_prompts_are_read_from_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("How do you feel?\n\nWhat now?\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"instruction": "Name the emotion.", "input": "I won!"}) + "\n")
    records = load_prompts([tmp_path])
    assert [(r.id, r.instruction, r.input) for r in records] == [
        ("a:1", "How do you feel?", ""),
        ("a:3", "What now?", ""),
        ("b:1", "Name the emotion.", "I won!"),
    ]
    (tmp_path / "c.jsonl").write_text(json.dumps({"input": "no instruction"}) + "\n")
    with pytest.raises(DataError, match=r"c\.jsonl:1: field 'instruction' is missing"):
        load_prompts([tmp_path / "c.jsonl"])


# --- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"rank": 0}, "rank must be >= 1"),
        ({"num_experts": 4, "top_k": 5}, r"top_k must be in \[1, 4\]"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
        ({"router_temperature": 0.0}, "router_temperature must be a finite number > 0"),
        ({"router_temperature": float("nan")}, "router_temperature must be a finite number > 0"),
        ({"router_init_std": -0.1}, "router_init_std must be a finite number >= 0"),
        ({"alpha": float("nan")}, "alpha must be a finite number"),
        ({"alpha": float("inf")}, "alpha must be a finite number"),
        ({"gate_bias_init": float("nan")}, "gate_bias_init must be a finite number"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"target_modules": ""}, "target_modules is empty"),
    ],
)
def test_invalid_molora_settings_are_refused(settings, message):
    with pytest.raises(MoLoRAError, match=message):
        MoLoRAConfig(**settings)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lambda_inter", float("nan")),
        ("lambda_inter", -1.0),
        ("lambda_gi_lm", float("inf")),
        ("lambda_bal", -0.5),
        ("warmup_steps", float("nan")),
        ("warmup_steps", -1),
        ("min_lr_ratio", 1.5),
        ("max_new_tokens", 0),
        ("router_lr_scale", float("nan")),
    ],
)
def test_invalid_loss_weights_and_schedule_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"config key model.{key}: expected"):
        check_settings(**{key: value})


# --- adapter files ---------------------------------------------------------------------------------


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    model = inject_molora(load_backbone(BackboneConfig(name_or_path="tiny-llama")), MoLoRAConfig(num_experts=2))
    with torch.no_grad():
        for tensor in adapter_state_dict(model).values():
            tensor.normal_()
    return save_adapter(model, tmp_path / "good")


def test_a_failed_adapter_load_leaves_the_model_untouched_and_a_retry_works(tmp_path, adapter_dir):
    model = load_backbone(BackboneConfig(name_or_path="tiny-llama"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    config = json.loads((adapter_dir / "molora_config.json").read_text())
    config["molora"]["rank"] = 4  # the tensors were saved with rank 8
    (wrong / "molora_config.json").write_text(json.dumps(config))
    (wrong / "molora_model.safetensors").write_bytes((adapter_dir / "molora_model.safetensors").read_bytes())
    with pytest.raises(MoLoRAError, match="shape mismatches"):
        load_adapter(model, wrong)
    assert not hasattr(model, "molora_recorder")
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    load_adapter(model, adapter_dir)  # the retry with the right directory
    assert adapter_state_dict(model)


def test_bad_adapter_files_are_errors_that_name_the_file(tmp_path, adapter_dir):
    model = load_backbone(BackboneConfig(name_or_path="tiny-llama"))
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "molora_config.json").write_text('{"molora": {"rank": 8,')
    with pytest.raises(MoLoRAError, match=r"bad_json/molora_config\.json: not valid JSON"):
        load_adapter(model, bad_json)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "molora_config.json").write_text((adapter_dir / "molora_config.json").read_text())
    weights = (adapter_dir / "molora_model.safetensors").read_bytes()
    (truncated / "molora_model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(MoLoRAError, match=r"truncated/molora_model\.safetensors: not a readable safetensors file"):
        load_adapter(model, truncated)

    nan = tmp_path / "nan"
    nan.mkdir()
    (nan / "molora_config.json").write_text((adapter_dir / "molora_config.json").read_text())
    tensors = load_file(str(adapter_dir / "molora_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first].view(-1)[0] = float("nan")
    save_file(tensors, str(nan / "molora_model.safetensors"))
    with pytest.raises(MoLoRAError, match=rf"nan/molora_model\.safetensors: tensors \[{first}\] hold NaN"):
        load_adapter(model, nan)
    assert not hasattr(model, "molora_recorder")


# --- checkpoints: never unpickle code, name the file ----------------------------------------------


def test_every_checkpoint_loader_refuses_a_malicious_pickle(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Evil(marker)}}, evil)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    torch.save({"epoch": 0, "payload": Evil(marker)}, sharded / "meta.pt")

    loaders = {
        "read_checkpoint_file": lambda: read_checkpoint_file(evil),
        "export.load_checkpoint": lambda: load_checkpoint(evil),
        "export.load_checkpoint (sharded meta.pt)": lambda: load_checkpoint(sharded),
        "strategies.read_checkpoint": lambda: read_checkpoint(evil),
    }
    for name, load in loaders.items():
        with pytest.raises(CheckpointError, match="refused to load") as info:
            load()
        assert "posix.system" in str(info.value) or "system" in str(info.value), name
    for args in (
        ["export", str(evil), str(tmp_path / "out")],
        ["test", "--config", LLAMA_CONFIG, f"--ckpt_path={evil}"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*args, f"--run_dir={tmp_path}/run"] if args[0] != "export" else args)
        assert exit_info.value.code == 2
        assert "refused to load" in capsys.readouterr().err
    assert not marker.exists()


def test_truncated_or_corrupt_checkpoints_are_errors_that_name_the_file(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}, "hyper_parameters": hparams()}, good)
    data = good.read_bytes()
    for name, content in {"truncated.ckpt": data[: len(data) // 2], "empty.ckpt": b"", "junk.ckpt": b"hello"}.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=rf"{name}: not a readable checkpoint, truncated or corrupt"):
            read_checkpoint_file(tmp_path / name)


def fill_the_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every checkpoint write gets half its bytes onto the disk, then ENOSPC, as on a full disk."""
    save = torch.save

    def full(obj: object, file: object, *args: object, **kwargs: object) -> None:
        if ".ckpt" not in str(getattr(file, "name", file)):
            return save(obj, file, *args, **kwargs)
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)


def test_a_failed_checkpoint_write_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(3)}}, path)
    io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.ones(3)}}, path)
    assert read_checkpoint_file(path)["global_step"] == 2
    fill_the_disk(monkeypatch)
    with pytest.raises(CheckpointWriteError, match=r"last\.ckpt: disk full .*the previous last\.ckpt is unchanged"):
        io.save_checkpoint({"global_step": 3, "state_dict": {"w": torch.zeros(3)}}, path)
    assert read_checkpoint_file(path)["global_step"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no partial file left behind


def test_a_full_disk_stops_fit_with_one_line(tmp_path, capsys, monkeypatch):
    fill_the_disk(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*FIT, "--trainer.max_steps=1", f"--run_dir={tmp_path}/run"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "last.ckpt: disk full" in errors[0], errors
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_a_checkpoint_holding_nan_is_refused_by_export_and_test(tmp_path, capsys):
    checkpoint = tmp_path / "nan.ckpt"
    state = {"model.model.layers.0.self_attn.q_proj.lora_A": torch.tensor([[1.0, float("nan")], [0.0, 1.0]])}
    torch.save({"state_dict": state, "hyper_parameters": hparams()}, checkpoint)
    runs = {
        "export": lambda: export_main([str(checkpoint), str(tmp_path / "out")]),
        "test": lambda: cli.main(
            ["test", "--config", LLAMA_CONFIG, f"--ckpt_path={checkpoint}", f"--run_dir={tmp_path}/r"]
        ),
    }
    for name, run in runs.items():
        with pytest.raises(SystemExit) as exit_info:
            run()
        assert exit_info.value.code == 2, name
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"{checkpoint}: this checkpoint holds non-finite values" in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_export_refuses_to_overwrite_an_existing_directory(tmp_path, capsys):
    checkpoint = tmp_path / "c.ckpt"
    state = {"model.model.layers.0.self_attn.q_proj.lora_A": torch.ones(2, 2)}
    torch.save({"state_dict": state, "hyper_parameters": hparams()}, checkpoint)
    out = tmp_path / "adapters"
    out.mkdir()
    (out / "molora_model.safetensors").write_text("another run's adapters")
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(checkpoint), str(out)])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "molora_model.safetensors").read_text() == "another run's adapters"
    export_main([str(checkpoint), str(out), "--overwrite"])
    assert json.loads((out / "molora_config.json").read_text())["molora"]["num_experts"] == 2
    export_checkpoint(checkpoint, tmp_path / "fresh")  # a new directory needs no flag


# --- export directories are data: no code from them ------------------------------------------------

EVIL_MODULE = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"


def hf_export_dir(directory: Path, **info: object) -> Path:
    """A ``--format hf`` export of the tiny preset, as ``export`` writes it, with ``info`` over its moei_export.json."""
    config = BackboneConfig(name_or_path="tiny-llama")
    load_backbone(config).save_pretrained(directory)
    load_tokenizer(config).save_pretrained(directory)
    export = {"format": "hf", "adapter": "lora", "kind": "causal", "backbone": {"name_or_path": "tiny-llama"}}
    (directory / "moei_export.json").write_text(json.dumps({**export, **info}))
    return directory


def test_an_export_directory_never_makes_its_own_code_run(tmp_path, capsys):
    marker = tmp_path / "ran-remote-code"
    directory = hf_export_dir(tmp_path / "export", backbone={"name_or_path": "tiny-llama", "trust_remote_code": True})
    (directory / "evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (directory / "config.json").write_text(json.dumps(config))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How do you feel?\n")

    from moei_lightning import from_pretrained

    from_pretrained(directory)
    cli.main(["generate", "--adapter", str(directory), "--prompts", str(prompts), "--max_new_tokens", "2"])
    assert json.loads(capsys.readouterr().out)["prompt"] == "How do you feel?"
    assert not marker.exists()


def test_an_export_with_pickled_weights_is_refused_in_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    directory = hf_export_dir(tmp_path / "export")
    weights = next(directory.glob("*.safetensors"))
    torch.save({"model.embed_tokens.weight": Evil(marker)}, directory / "pytorch_model.bin")
    weights.unlink()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How do you feel?\n")
    capsys.readouterr()  # save_pretrained's progress
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--adapter", str(directory), "--prompts", str(prompts)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "pytorch_model.bin: refused to load" in err and "weights_only" not in err
    (directory / "moei_export.json").unlink()  # the same directory as a backbone to train
    with pytest.raises(CheckpointError, match="refused to load a pickled weights file"):
        load_backbone(BackboneConfig(name_or_path=str(directory)))
    assert not marker.exists()


# --- the command line: one line per user error, --ckpt_path overrides, run directories --------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.molora.rank=0", "rank must be >= 1"),
        ("--model.molora.top_k=9", "top_k must be in"),
        ("--model.molora.dropout=1.5", "dropout must be in"),
        ("--model.molora.router_temperature=0", "router_temperature must be"),
        ("--model.molora.router_init_std=-1", "router_init_std must be"),
        ("--model.molora.target_modules=[]", "target_modules is empty"),
        ("--model.molora.alpha=.nan", "alpha must be a finite number"),
        ("--model.lambda_inter=-1", "model.lambda_inter: expected"),
        ("--model.warmup_steps=.nan", "model.warmup_steps: expected"),
        ("--data.seed=${nope}", "config interpolation in data.seed: Interpolation key 'nope' not found"),
        ("--run_dir={tmp}/a_file/run", "cannot create it"),
    ],
)
def test_config_errors_are_one_line_and_exit_2(override, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", LLAMA_CONFIG, override.replace("{tmp}", str(tmp_path)), "--trainer.logger=false"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert RUN_DIR_ENV not in os.environ  # a run's directory does not leak into the next main() of the process


def test_lightnings_distributed_sampler_is_refused_under_data_parallelism(tmp_path, capsys):
    """The DataModule shards batches across ranks itself; Lightning's sampler would shard them again."""
    args = ["fit", "--config", LLAMA_CONFIG, "--trainer.logger=false", f"--run_dir={tmp_path}/run"]
    args += ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.use_distributed_sampler=true"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2 and "(YAML: trainer.use_distributed_sampler: false)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.molora.rank=abc", "config key model.molora.rank: expected an integer, got 'abc'"),
        ("--data.batch_size=1.5", "config key data.batch_size: expected an integer, got '1.5'"),
        ("--config=/no/such.yaml", "--config /no/such.yaml: no such file"),
        ("--model.molora.alpha=inf", "config key model.molora.alpha: expected a finite number, got 'inf'"),
        ("--model.lambda_inter=nan", "config key model.lambda_inter: expected a finite number, got 'nan'"),
        ("--model.adapter=bogus", "config key model.adapter: expected one of 'molora', 'lora', 'full', got 'bogus'"),
        ("--model.molora.routing=bogus", "config key model.molora.routing: expected one of 'token', 'prompt', got"),
        ("--model.molora.inter=bogus", "config key model.molora.inter: expected one of 'gate', 'slot', 'none', got"),
        ("--model.backbone.dtype=bogus", "config key model.backbone.dtype: expected one of 'float32', 'bfloat16'"),
        ("--model.optimizer.init_args.lr=abc", "config key model.optimizer.init_args.lr: expected a finite number"),
    ],
)
def test_type_and_choice_errors_are_one_line_naming_key_value_and_allowed(override, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", LLAMA_CONFIG, override, "--trainer.logger=false"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message}" or (err.startswith(f"error: {message}") and len(err.splitlines()) == 1), err
    with pytest.raises(SystemExit):
        cli.main(["fit", "--config", LLAMA_CONFIG, override, "--debug"])
    assert "usage:" in capsys.readouterr().err  # --debug keeps the parser's whole report


def test_bad_trainer_and_optimizer_values_stop_before_the_wandb_run_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cases = {
        "--model.optimizer.init_args.lr=-1": "config key model.optimizer.init_args: the optimizer refuses them: "
        "Invalid learning rate: -1.0",
        "--trainer.max_steps=-5": "config key trainer: `max_steps` must be a non-negative integer or -1",
    }
    for override, message in cases.items():
        run = tmp_path / override.split("=")[0].strip("-")
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["fit", "--config", LLAMA_CONFIG, override, f"--run_dir={run}"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err
        assert not (run / "wandb").exists()


def k2_checkpoint_without_hparams(path: Path) -> Path:
    """The trainable tensors of a K=2 MoLoRA on tiny-llama, saved without the hyperparameters that say K=2."""
    module = MoEIModule(backbone=BackboneConfig(name_or_path="tiny-llama"), molora=MoLoRAConfig(num_experts=2))
    module.configure_model()
    state = {k: v for k, v in module.state_dict().items() if k in module._trainable_names()}
    torch.save({"state_dict": state, "pytorch-lightning_version": lightning.__version__}, path)
    return path


def test_a_ckpt_path_that_does_not_fit_the_model_is_one_line(tmp_path, capsys):
    checkpoint = k2_checkpoint_without_hparams(tmp_path / "k2.ckpt")
    not_a_checkpoint = tmp_path / "some_dir"
    not_a_checkpoint.mkdir()
    cases = {
        str(not_a_checkpoint): f"--ckpt_path {not_a_checkpoint}: a directory, not a checkpoint",
        str(checkpoint): f"--ckpt_path {checkpoint}: 12 tensors have other shapes than this model's",
    }
    for ckpt_path, message in cases.items():
        args = ["test", "--config", LLAMA_CONFIG, "--model.molora.num_experts=4", "--trainer.logger=false"]
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*args, f"--ckpt_path={ckpt_path}", f"--run_dir={tmp_path}/run"])
        assert exit_info.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {message}"), errors


def test_a_read_only_run_dir_is_one_line(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    if os.geteuid() == 0:  # root writes into any directory: what a read-only filesystem answers instead

        def read_only(*args: object, **kwargs: object) -> None:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(cli.tempfile, "TemporaryFile", read_only)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*FIT, f"--run_dir={run}"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"error: run_dir {run}: cannot write into it" in errors[0], errors


def test_generate_output_naming_a_directory_is_one_line(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How do you feel?\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--adapter", str(tmp_path), "--prompts", str(prompts), "--output", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: --output {tmp_path} is a directory; give the path of a file to write\n"


def test_a_template_word_outside_a_vocabulary_without_unknown_token_is_named(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from moei_lightning.data.encode import Encoder
    from moei_lightning.data.prompts import PromptFormatter

    words = Tokenizer(models.WordLevel({word: i for i, word in enumerate(["</s>", "a", "Answer:"])}))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>")
    assert tokenizer.unk_token is None
    message = r"data\.prompt_template: the word 'Options:' of the template is not in the vocabulary"
    with pytest.raises(DataError, match=message):
        Encoder(tokenizer, PromptFormatter(tokenizer=tokenizer), "causal", 64)
    Encoder(tokenizer, PromptFormatter("{instruction}\n\nAnswer:", tokenizer=tokenizer), "causal", 64)


@pytest.mark.slow
def test_a_fit_logged_to_wandb_writes_no_colour_codes_into_a_log_file(tmp_path):
    log = tmp_path / "fit.log"
    with log.open("w") as out:  # stdout and stderr both a file, as under SLURM or `> fit.log 2>&1`
        env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
        for key in (RUN_DIR_ENV, "WANDB_SILENT"):  # W&B's closing lines are what this checks
            env.pop(key, None)
        command = [sys.executable, "-m", "moei_lightning", *FIT[:-1], "--trainer.max_steps=1"]
        result = subprocess.run([*command, f"--run_dir={tmp_path}/run"], stdout=out, stderr=out, env=env, timeout=600)
    text = log.read_text()
    assert result.returncode == 0, text[-2000:]
    assert "wandb sync" in text and "\x1b[" not in text, text[-1000:]


def test_a_second_fit_into_a_busy_run_dir_is_refused_and_a_crash_frees_it(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    hold = f"from moei_lightning.run_lock import lock_run_dir; lock_run_dir({str(run)!r}); print('locked', flush=True)"
    holder = subprocess.Popen(  # a fit's first process, as far as the lock goes
        [sys.executable, "-c", f"{hold}; import time; time.sleep(600)"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*FIT, f"--run_dir={run}"])
        assert exit_info.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"run_dir {run} is in use by another fit (process {holder.pid})" in errors[0]
    finally:
        holder.kill()  # SIGKILL: no cleanup runs
        holder.wait()
    lock_run_dir(run)  # the kernel released the dead process's lock
    release_run_dirs()


def test_unmatched_target_modules_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", LLAMA_CONFIG, "--model.molora.target_modules=[nope]", "--trainer.logger=false"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: molora.target_modules entries ['nope'] match no linear layer" in err
    with pytest.raises(MoLoRAError):
        cli.main([*args, "--debug"])
    monkeypatch.setenv("MOEI_DEBUG", "1")
    with pytest.raises(MoLoRAError):
        cli.main(args)


def test_bad_data_stops_before_the_wandb_run_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**RECORD, "aspect": "telepathy"}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", LLAMA_CONFIG, f"--data.ei_train=[{bad}]", f"--run_dir={tmp_path}/run"])
    assert exit_info.value.code == 2 and "bad.jsonl:1" in capsys.readouterr().err
    assert not (tmp_path / "run" / "wandb").exists()


@pytest.fixture
def saved_hparams_checkpoint(tmp_path) -> Path:
    """A checkpoint file with the hyperparameters of a K=2 run (enough for the CLI's --ckpt_path parsing)."""
    path = tmp_path / "k2.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": hparams(num_experts=2)}, path)
    return path


def test_ckpt_path_with_a_conflicting_adapter_override_is_an_error(saved_hparams_checkpoint, tmp_path, capsys):
    for override in ("--model.molora.num_experts=4", "--model.adapter=lora", "--model.molora.rank=4"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["test", "--config", LLAMA_CONFIG, f"--ckpt_path={saved_hparams_checkpoint}", override])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        key = override[2:].split("=")[0]
        assert "was trained with other adapters than the command line asks for" in err and key in err, err


def test_ckpt_path_honours_other_explicit_overrides(saved_hparams_checkpoint, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(MoEICLI, "run_command", lambda self: seen.update(config=self.config))
    args = ["test", "--config", LLAMA_CONFIG, f"--ckpt_path={saved_hparams_checkpoint}", f"--run_dir={tmp_path}/r"]
    cli.main([*args, "--model.max_new_tokens=3", "--model.molora.num_experts=2"])
    config = seen["config"]
    assert config.model.max_new_tokens == 3  # the command line wins over the checkpoint's 16
    assert config.model.molora.num_experts == 2  # the checkpoint wins over the config file's 8
    cli.main(args)
    assert seen["config"].model.max_new_tokens == 16 and seen["config"].model.molora.num_experts == 2


def test_predict_writes_predictions_jsonl_from_a_prompt_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How would you comfort a friend who failed an exam?\nName one emotion.\n")
    run_dir = tmp_path / "run"
    cli.main(
        [
            "predict",
            "--config",
            LLAMA_CONFIG,
            f"--data.predict={prompts}",
            "--model.max_new_tokens=4",
            "--trainer.logger=false",
            f"--run_dir={run_dir}",
        ]
    )
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["prompts:1", "prompts:2"]
    assert all(set(r) == {"id", "task", "aspect", "prompt", "prediction", "target"} for r in rows)
    assert "comfort a friend" in rows[0]["prompt"] and isinstance(rows[0]["prediction"], str)


# --- processes: signals and divergence ------------------------------------------------------------

EVERY_2_STEPS = (
    "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
    "      init_args: {every_n_train_steps: 2, save_top_k: -1, filename: '{step}', save_last: true}\n"
)


def fit_args(tmp_path: Path, *extra: str) -> list[str]:
    config = tmp_path / "every-2.yaml"
    config.write_text(EVERY_2_STEPS)
    args = ["fit", "--config", LLAMA_CONFIG, "--config", str(config)]
    return [*args, "--trainer.logger=false", "--model.molora.dropout=0.1"]


def callback_arg(class_path: str, **init_args: int) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": class_path, "init_args": init_args})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    tmp_path = tmp_path_factory.mktemp("whole")
    result = run_cli(*fit_args(tmp_path), "--trainer.max_steps=6", f"--run_dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return torch.load(tmp_path / "run" / "checkpoints" / "step=6.ckpt", weights_only=True)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_that_resumes_bit_exactly(signum, uninterrupted, tmp_path):
    run = tmp_path / "run"
    signalled = run_cli(
        *fit_args(tmp_path),
        "--trainer.max_steps=6",
        callback_arg("tests.conftest.SignalAtStep", step=3, signum=int(signum)),
        f"--run_dir={run}",
        cwd=tmp_path,
    )
    assert signalled.returncode == 128 + signum, signalled.stderr[-2000:]
    last = run / "checkpoints" / "last.ckpt"
    assert f"interrupted: {signal.Signals(signum).name} received: stopped after step 3" in signalled.stderr
    assert f"resume with --ckpt_path {last}" in signalled.stderr
    assert read_checkpoint_file(last)["global_step"] == 3

    resumed = run_cli(
        *fit_args(tmp_path), "--trainer.max_steps=6", f"--ckpt_path={last}", f"--run_dir={run}2", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = read_checkpoint_file(Path(f"{run}2") / "checkpoints" / "step=6.ckpt")["state_dict"]
    assert final.keys() == uninterrupted.keys()
    for key, tensor in uninterrupted.items():
        assert torch.equal(final[key], tensor), key


def test_under_slurm_requeue_a_signal_saves_the_next_hpc_checkpoint(tmp_path, monkeypatch):
    """The checkpoint a requeued job of the same id resumes from by itself: one above the highest there."""
    (tmp_path / "hpc_ckpt_2.ckpt").touch()
    for key in ("SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)

    def saved_to(environment: SLURMEnvironment | None) -> Path:
        strategy = SimpleNamespace(cluster_environment=environment)
        trainer = SimpleNamespace(strategy=strategy, default_root_dir=str(tmp_path), callbacks=[])
        return Path(InterruptCheckpoint()._checkpoint_path(trainer))

    assert saved_to(SLURMEnvironment()) == tmp_path / "hpc_ckpt_3.ckpt"
    assert saved_to(SLURMEnvironment(auto_requeue=False)) == tmp_path / "checkpoints" / "last.ckpt"
    assert saved_to(None) == tmp_path / "checkpoints" / "last.ckpt"  # one device, no SLURM
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert saved_to(None) == tmp_path / "hpc_ckpt_3.ckpt"  # one device under SLURM: Lightning requeues it


@pytest.mark.slow
def test_divergence_stops_with_the_step_and_term_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    result = run_cli(
        *fit_args(tmp_path),
        "--trainer.max_steps=6",
        callback_arg("tests.conftest.PoisonAtStep", step=3),
        f"--run_dir={run}",
        cwd=tmp_path,
    )
    assert result.returncode == 3, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged at step 3 (epoch 0)" in errors[0], errors
    # the NaN adapter makes the next layers' inter gates NaN, caught before their cross-entropy
    assert "the inter gate of model.layers.1." in errors[0] and "loss term 'inter'" in errors[0], errors
    assert "Traceback" not in result.stderr
    saved = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert saved == ["last.ckpt", "step=2.ckpt"]
    last = read_checkpoint_file(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())


@pytest.mark.slow
def test_a_resumed_fit_keeps_its_newest_state_in_last_ckpt(tmp_path):
    run = tmp_path / "run"
    stop = callback_arg("tests.conftest.SignalAtStep", step=2, signum=int(signal.SIGTERM))
    interrupted = run_cli(*FIT, "--trainer.max_steps=4", stop, f"--run_dir={run}", cwd=tmp_path)
    assert interrupted.returncode == 143, interrupted.stderr[-2000:]
    last = run / "checkpoints" / "last.ckpt"
    resumed = run_cli(*FIT, "--trainer.max_steps=4", f"--ckpt_path={last}", cwd=tmp_path)  # into the same run
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert read_checkpoint_file(last)["global_step"] == 4


@pytest.mark.slow
def test_a_finished_run_resumed_with_more_steps_trains_them(tmp_path):
    run = tmp_path / "run"
    finished = run_cli(*FIT, "--trainer.max_steps=2", f"--run_dir={run}", cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-2000:]
    last = run / "checkpoints" / "last.ckpt"
    before = read_checkpoint_file(last)
    assert (before["global_step"], before["epoch"]) == (2, 0)  # 2 of the epoch's batches: not a finished epoch
    more = run_cli(*FIT, "--trainer.max_steps=4", f"--ckpt_path={last}", cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-2000:]
    after = read_checkpoint_file(last)
    assert after["global_step"] == 4
    assert any(not torch.equal(after["state_dict"][k], v) for k, v in before["state_dict"].items())
