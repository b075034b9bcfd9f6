"""The command line: ``python -m moei_lightning fit|validate|test|predict --config conf/tiny.yaml``.

A LightningCLI with omegaconf interpolation resolved after every source is merged (``omegaconf+``),
so ``--data.max_length=256`` also reaches every ``${data.max_length}`` in the YAML. Each run writes
into its own directory (``runs/<id>``, or ``--run_dir``): the saved ``config.yaml``, checkpoints and
the logger's files never collide between runs. A run that continues from a checkpoint of a run
directory (a resumed ``fit``, a ``test`` or ``predict`` of it) writes into that directory and the
same W&B run. ``export`` writes a checkpoint in a format other tools read, ``generate`` answers
prompts with an export, and ``lm-eval`` runs lm-evaluation-harness tasks on one.

Bad input (config, data, checkpoint or adapter files) ends the run with one ``error: ...`` line and
exit status 2; ``--debug`` or ``MOEI_DEBUG=1`` shows the traceback instead. Training that diverges
exits 3; SIGTERM / SIGINT during training save a resumable checkpoint and exit 143 / 130.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import typing
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, NoReturn

import yaml
from jsonargparse import ArgumentParser, Namespace, get_loader, set_parsing_settings
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moei_lightning.callbacks.interrupt import InterruptCheckpoint
from moei_lightning.callbacks.predictions import PredictionWriter
from moei_lightning.callbacks.resume import ResumableEnd
from moei_lightning.checkpoints import check_finite, read_checkpoint_file, use_atomic_checkpoints
from moei_lightning.data import SAMPLES_DIR, DataError, MoEIDataModule
from moei_lightning.errors import (
    DIVERGED_EXIT,
    USER_ERROR_EXIT,
    CheckpointError,
    CheckpointWriteError,
    ConfigError,
    TrainingDiverged,
    TrainingInterrupted,
)
from moei_lightning.export import SHARDED_METADATA
from moei_lightning.module import GRADIENT_CLIP_NORM, MoEIModule
from moei_lightning.molora.errors import MoLoRAError
from moei_lightning.run_lock import lock_run_dir, release_run_dirs

PROG = "python -m moei_lightning"
DEBUG_HELP = "An error in the input is one `error:` line; --debug (anywhere on the line) shows its traceback."
DESCRIPTION = (
    "MoEI on PyTorch Lightning: train, evaluate, export and query a frozen backbone with MoLoRA adapters. " + DEBUG_HELP
)
RUN_DIR_ENV = "MOEI_RUN_DIR"
DEBUG_ENV = "MOEI_DEBUG"
CONFIG_FILE = "config.yaml"
USER_ERRORS = (
    ConfigError,
    CheckpointError,
    CheckpointWriteError,
    DataError,
    MoLoRAError,
    FileNotFoundError,
    FileExistsError,
)
"""Exceptions that are bad input or a full disk, not bugs: one line and exit 2 (``--debug`` shows the traceback)."""

ADAPTER_SHAPE_KEYS = ("adapter", "molora.num_experts", "molora.rank", "molora.target_modules", "molora.inter")
"""Model keys that decide a checkpoint's tensors: a command line may not change them under --ckpt_path."""
LIGHTNING_CKPT_ALIASES = ("last", "best", "hpc", "registry")
_DEBUG: ContextVar[bool] = ContextVar("moei_debug", default=False)
"""``--debug`` or ``MOEI_DEBUG=1`` for this run: errors keep their traceback and the parser its full message."""
# The Trainer's commands: name -> what --help says (Lightning's docstrings are cut off after their first line).
TRAINER_COMMANDS = {
    "fit": "Train the adapters; writes checkpoints, config.yaml and a summary into the run directory.",
    "validate": "Evaluate on the validation split.",
    "test": "Evaluate on the test split (and run the paper's evaluation suites listed in eval.suites).",
    "predict": "Generate a reply for every test prompt, or for --data.predict=FILE, into predictions.jsonl.",
}
# Commands beside the Trainer's: name -> what --help says about them; each is moei_lightning.<name>.main
# (or the module TOOL_MODULES names).
TOOLS = {
    "export": "Write a checkpoint as adapters, a PEFT adapter or a save_pretrained model.",
    "generate": "Replies from an exported model to prompts from a file or standard input, as JSONL.",
    "lm-eval": "lm-evaluation-harness tasks on an exported model, routed from each request's context.",
}
TOOL_MODULES = {"lm-eval": "lm_eval_model"}  # a command whose module is not named after it


class MoEIArgumentParser(LightningArgumentParser):
    """Reads config files with a ``base:`` list; answers a misspelt key in one line, with the closest valid key."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --data.batch_siz is a misspelling, not --data.batch_size
        super().__init__(*args, **kwargs)

    def parse_path(
        self,
        path: str | os.PathLike,
        ext_vars: dict | None = None,
        env: bool | None = None,
        defaults: bool = True,
        **kwargs: Any,
    ) -> Namespace:
        """A file that lists ``base:`` files is parsed as those files with its own keys merged over them."""
        source = Path(os.fspath(path))
        if not source.is_file() or BASE_KEY not in _load_mapping(source):
            return super().parse_path(path, ext_vars=ext_vars, env=env, defaults=defaults, **kwargs)
        merged = yaml.safe_dump(resolve_bases(source), sort_keys=False, allow_unicode=True)
        return self.parse_string(merged, path=source.name, ext_vars=ext_vars, env=env, defaults=defaults, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """One ``error:`` line instead of the usage and the parser's type dump (``--debug`` keeps them)."""
        if not self.exit_on_error or _DEBUG.get():
            super().error(message, ex)
        key = misspelt_key(message)
        if key is None:
            sys.stderr.write(f"error: {describe_parse_error(message)}\n")
            raise SystemExit(USER_ERROR_EXIT)
        parser = getattr(ex, "subcommand_parser", None) or self
        closest = difflib.get_close_matches(key, valid_keys(parser), n=1, cutoff=0.6)
        hint = f"; did you mean '{closest[0]}'?" if closest else f"; `{parser.prog} --help` lists the keys"
        sys.stderr.write(f"error: unknown config key '{key}'{hint}\n")
        raise SystemExit(USER_ERROR_EXIT)


BASE_KEY = "base"
"""Top-level key of a config file: the files it builds on, relative to it, merged in order beneath it."""


def resolve_bases(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The config file at ``path`` as one mapping: its ``base:`` files first (in order), its own keys over them.

    ``base: tiny.yaml`` (or a list) names files relative to the file that lists them; they may have bases
    of their own. The result is what ``--config BASE --config FILE`` gives: see :func:`merge_configs`.
    """
    path = path.resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain[_chain.index(path) :], path))
        raise ConfigError(f"{_chain[-1]}: base: the files include each other ({cycle}); remove one of the links")
    config = _load_mapping(path)
    bases = config.pop(BASE_KEY, None)
    if bases is None:
        return config
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigError(f"{path}: base: must be a file name or a list of them, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise ConfigError(
                f"{path}: base: {base}: no such file ({base_path}); base files are relative to the file that lists them"
            )
        merged = merge_configs(merged, resolve_bases(base_path, (*_chain, path)))
    return merge_configs(merged, config)


def merge_configs(base: Any, overlay: Any) -> Any:
    """``overlay`` over ``base``: mappings merge key by key, anything else (a list too) replaces.

    A mapping with another ``class_path`` than the base's is a different object and replaces it whole,
    so a strategy file that switches FSDP2 for DDP does not inherit FSDP2's ``init_args``.
    """
    if not (isinstance(base, dict) and isinstance(overlay, dict)):
        return overlay
    if "class_path" in overlay and overlay["class_path"] != base.get("class_path"):
        return overlay
    merged = dict(base)
    for key, value in overlay.items():
        merged[key] = merge_configs(base[key], value) if key in base else value
    return merged


def _load_mapping(path: Path) -> dict[str, Any]:
    """A YAML config file's top-level mapping, read as jsonargparse reads it (``1e-4`` is a float)."""
    try:
        config = get_loader("yaml")(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_one_line(str(err))})") from err
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config file holds a mapping of keys, got {type(config).__name__}")
    return config


_MISSPELT = (
    re.compile(r"Group '([\w.]+)' does not accept option '([\w.]+)'"),
    re.compile(r"unrecognized arguments: --([\w.]+)"),
    re.compile(r"does not accept option '([\w.]+)'"),
    re.compile(r"Parser key \"([\w.]+)\":.*?Option '([\w.]+)' is not accepted", re.DOTALL),
)


def misspelt_key(message: str) -> str | None:
    """The unknown key a jsonargparse error message is about, or None for other errors."""
    for pattern in _MISSPELT:
        match = pattern.search(message)
        if match:
            return ".".join(match.groups())
    return None


_PARSER_KEY = re.compile(r'Parser key "([\w.]+)":')
_VALUE = re.compile(r"(?:Given|Got) value: (.*?)(?:\. Got value: .*)?$", re.MULTILINE)
_EXPECTED = re.compile(r"Expected a (<class '(\w+)'>|typing\.Literal\[(.*?)\]|path)")
_TYPE_NAMES = {
    "int": "an integer",
    "float": "a finite number",
    "bool": "true or false",
    "str": "a string",
    "NoneType": "null",
}


def describe_parse_error(message: str) -> str:
    """A jsonargparse type or choice error as one line: the key, the value given and what is allowed.

    jsonargparse reports such errors over several lines (every type of a union tried, in Python's
    spelling); a user needs the key, the value and the allowed values or type.
    """
    keys = _PARSER_KEY.findall(message)
    missing_file = re.search(r"File does not exist: '(.*)'", message)
    if keys and missing_file:
        return f"--{keys[0]} {missing_file.group(1)}: no such file"
    if not keys:
        return _one_line(message)
    key = keys[0] if len(keys) == 1 else f"{keys[0]}.init_args.{keys[-1]}"
    value = _VALUE.search(message)
    allowed: list[str] = []
    choices: list[str] = []
    for match in _EXPECTED.finditer(message):
        if match.group(3) is not None:
            choices += [choice.strip() for choice in match.group(3).split(",")]
        else:
            allowed.append(_TYPE_NAMES.get(match.group(2), match.group(2)) if match.group(2) else "a path")
    if choices:
        allowed.insert(0, f"one of {', '.join(dict.fromkeys(choices))}")
    if len(allowed) > 1:  # a tensor's import path, tried last for a float (an optimizer's lr): not a user's choice
        allowed = [kind for kind in allowed if kind != "a path"]
    if not allowed:
        return f"config key {key}: {_one_line(message.split(':', 1)[1])}"
    got = f", got {value.group(1).strip()!r}" if value else ""
    return f"config key {key}: expected {' or '.join(dict.fromkeys(allowed))}{got}"


def valid_keys(parser: ArgumentParser) -> list[str]:
    """Every config key of ``parser``, including the fields of dataclass-typed sections (``model.molora.rank``)."""
    keys = list(parser.get_defaults().keys())
    for action in parser._actions:  # jsonargparse keeps the type of each key on its action
        for hint in typing.get_args(getattr(action, "_typehint", None)) or (getattr(action, "_typehint", None),):
            if dataclasses.is_dataclass(hint):
                keys += [f"{action.dest}.{field.name}" for field in dataclasses.fields(hint)]
    subcommands = getattr(parser, "_subcommands_action", None)  # a config file's error reaches the top parser
    for subparser in subcommands._name_parser_map.values() if subcommands is not None else ():
        keys += valid_keys(subparser)
    return list(dict.fromkeys(keys))


class MoEISaveConfig(SaveConfigCallback):
    """``config.yaml`` in the run directory, and the same resolved config in the W&B run's config and files.

    In the W&B run's files the config is ``lightning_config.yaml``: W&B keeps its own ``config.yaml`` there.
    """

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not loggers:
            return
        resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        path = Path(trainer.default_root_dir) / self.config_filename
        for logger in loggers:
            logger.experiment.config.update(resolved, allow_val_change=True)
            if path.is_file():  # copied, uploaded with the run (wandb.save would symlink it, and warn)
                shutil.copyfile(path, Path(logger.experiment.dir) / f"lightning_{path.name}")


class MoEICLI(LightningCLI):
    """LightningCLI that gives every run its own directory and points loggers and checkpoints into it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", MoEIArgumentParser)
        kwargs.setdefault("save_config_callback", MoEISaveConfig)
        super().__init__(*args, **kwargs)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """The Trainer's subcommands, then the other commands (``TOOLS``) so that ``--help`` lists them too."""
        super()._add_subcommands(parser, **kwargs)
        for choice in parser._subcommands_action._choices_actions:  # the list that the top-level --help prints
            choice.help = TRAINER_COMMANDS.get(choice.dest, choice.help)
        for name, subparser in self._subcommand_parsers.items():
            lightning_text = subparser.description
            subparser.description = f"{TRAINER_COMMANDS[name]} {DEBUG_HELP}"
            for group in subparser._action_groups:  # the --ckpt_path group is titled with the same cut text
                if group.title and lightning_text and group.title.startswith(lightning_text.split(".")[0]):
                    group.title = f"{name} arguments"
        for name, description in TOOLS.items():
            tool = ArgumentParser(prog=f"{PROG} {name}", description=description, add_help=False)
            parser._subcommands_action.add_subcommand(name, tool, help=f"{description} (`{PROG} {name} --help`)")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="Directory for this run's config, checkpoints and logs (default: the run directory of "
            "--ckpt_path, else runs/<timestamp>-<subcommand>).",
        )
        # Clipping on by default (trainer.gradient_clip_val: 0 turns it off): see module.GRADIENT_CLIP_NORM.
        parser.set_defaults({"trainer.gradient_clip_val": GRADIENT_CLIP_NORM})
        # Router statistics, per-aspect metrics and the progress bar for every config (docs/monitoring.md).
        from moei_lightning.callbacks import EiMetricsCallback, MoEIProgressBar, RouterStatsCallback, TrainingHealth

        parser.add_lightning_class_args(RouterStatsCallback, "router_stats")
        parser.add_lightning_class_args(TrainingHealth, "health")
        parser.add_lightning_class_args(EiMetricsCallback, "ei_metrics")
        parser.add_lightning_class_args(MoEIProgressBar, "progress_bar")
        # The paper's evaluation when `test` runs (docs/evaluation.md); it does nothing until eval.suites lists some.
        from moei_lightning.callbacks.paper_evaluation import PaperEvaluation

        parser.add_lightning_class_args(PaperEvaluation, "eval")
        # EI and GI accuracy and gates before and after every fit, printed and saved (summary.json).
        from moei_lightning.callbacks.fit_summary import FitSummary

        parser.add_lightning_class_args(FitSummary, "summary")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, remembering which ``--model.*`` keys the command line set (see :meth:`_parse_ckpt_path`)."""
        argv = sys.argv[1:] if args is None else args
        self.explicit_model_keys = explicit_model_keys(argv) if isinstance(argv, list | tuple) else []
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Take the model settings from ``--ckpt_path``, except where the command line sets them.

        Lightning puts the checkpoint's hyperparameters over the whole config, so an explicit
        ``--model.backbone.name_or_path=/other`` was silently ignored. Here the checkpoint still wins
        over config files, an explicit command-line key wins over the checkpoint, and a key that
        decides the checkpoint's tensors (:data:`ADAPTER_SHAPE_KEYS`) may not differ from it at all:
        that is an error naming the keys. The file is read with ``weights_only=True``.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or str(ckpt_path) in LIGHTNING_CKPT_ALIASES:
            return
        path = Path(ckpt_path)
        if not path.exists():
            raise FileNotFoundError(f"--ckpt_path {path}: no such file")
        if path.is_dir():
            if not (path / SHARDED_METADATA).is_file():
                raise CheckpointError(
                    f"--ckpt_path {path}: a directory, not a checkpoint (a .ckpt file, or a sharded checkpoint "
                    f"directory holding {SHARDED_METADATA}); checkpoints are in <run_dir>/checkpoints/"
                )
            return  # a sharded checkpoint directory: the strategy reads it, with the config as given
        checkpoint = read_checkpoint_file(path)
        check_finite(checkpoint, path)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        config = self.config[subcommand]
        given = {key: config.get(key) for key in self.explicit_model_keys}
        saved = _flatten({"model": hparams})
        conflicts = [
            f"{key}={given[key]!r} (checkpoint: {saved.get(key)!r})"
            for key in given
            if key.removeprefix("model.") in ADAPTER_SHAPE_KEYS and key in saved and saved[key] != given[key]
        ]
        if conflicts:
            raise ConfigError(
                f"--ckpt_path {path} was trained with other adapters than the command line asks for: "
                f"{', '.join(conflicts)}; drop these overrides (its tensors only fit the saved shape)"
            )
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        for key, value in given.items():
            self.config[subcommand][key] = value
        changed = [f"{k}={v!r}" for k, v in given.items() if k in saved and saved[k] != v]
        if changed:
            print(f"--ckpt_path {path}: the command line overrides the checkpoint's {', '.join(changed)}")

    def before_instantiate_classes(self) -> None:
        subcommand = self.subcommand or "run"
        quiet_known_noise(subcommand)
        config = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = resolve_run_dir(config.get("run_dir"), subcommand, config.get("ckpt_path"))
        if subcommand == "fit":
            lock_run_dir(run_dir)
        if subcommand != "fit" and (run_dir / CONFIG_FILE).is_file():  # next to a fit: keep its config.yaml
            self.save_config_kwargs["config_filename"] = f"config-{subcommand}.yaml"
        config.run_dir = str(run_dir)
        config.trainer.default_root_dir = str(run_dir)
        loggers = config.trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = logger.get("init_args") if isinstance(logger, Namespace) else None
            if init_args is None:
                continue
            if init_args.get("save_dir", "") in (None, ".", ""):
                init_args.save_dir = str(run_dir)  # loggers configured without a directory write into the run's
            if logger.class_path.endswith("WandbLogger") and init_args.get("id") is None:
                run_id = wandb_run_id(Path(init_args.save_dir))
                if run_id is not None:  # the run directory already has a W&B run: continue it
                    init_args.id = run_id
                    init_args.resume = init_args.get("resume") or "allow"

    def instantiate_classes(self) -> None:
        """Build the objects; a constructor's ValueError is a config error whatever wraps it."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            if isinstance(err, USER_ERRORS):
                raise
            raise ConfigError(_root_message(err)) from err

    def instantiate_trainer(self, **kwargs: object) -> object:
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except MisconfigurationException as err:  # the Trainer checks its own arguments; they are config keys
            raise ConfigError(f"config key trainer: {_one_line(str(err))}") from err
        run_dir = Path(trainer.default_root_dir)
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = str(run_dir / "checkpoints")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._wandb_init.get("anonymous") is None:
                # Lightning always passes `anonymous`, and W&B warns that the setting does nothing.
                logger._wandb_init.pop("anonymous", None)
        use_atomic_checkpoints(trainer)
        if self.subcommand == "fit":
            trainer.callbacks.extend([InterruptCheckpoint(), ResumableEnd()])
        if self.subcommand == "predict":
            trainer.callbacks.append(PredictionWriter(run_dir / "predictions.jsonl"))
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        """Validate the data before the Trainer starts (and with it a W&B run), then run."""
        if isinstance(self.datamodule, MoEIDataModule) and isinstance(self.model, MoEIModule):
            self.datamodule.attach(self.model.tokenizer, self.model.kind)
            self.datamodule.setup(subcommand)
        super()._run_subcommand(subcommand)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in self._subcommand_method_arguments[subcommand]:
            kwargs["weights_only"] = True  # a checkpoint is data: never run code from it
        return kwargs


def resolve_run_dir(requested: str | None, subcommand: str, checkpoint: str | None = None) -> Path:
    """The run directory, shared by every process of the run.

    A checkpoint inside a run directory (``<run>/checkpoints/*.ckpt`` next to ``<run>/config.yaml``)
    names it: resuming, testing or predicting continues that run's directory. Processes that
    Lightning launches for DDP inherit the directory through ``MOEI_RUN_DIR``; under torchrun or
    SLURM the launcher's job id names a new one, since all ranks start at once.
    """
    owner = checkpoint_run_dir(checkpoint)
    if requested:
        run_dir = Path(requested)
    elif os.environ.get(RUN_DIR_ENV):
        run_dir = Path(os.environ[RUN_DIR_ENV])
    elif owner is not None:
        run_dir = owner
    else:
        job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "none")
        stamp = time.strftime("%Y%m%d-%H%M%S") if job == "none" else f"job{job}"
        run_dir = Path("runs") / f"{stamp}-{subcommand}"
        if job == "none" and run_dir.exists():
            run_dir = run_dir.with_name(f"{run_dir.name}-{os.getpid()}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"run_dir {run_dir}: cannot create it ({err.strerror}); choose another --run_dir") from err
    try:  # a read-only directory (permissions, a read-only mount) fails here, not at the first checkpoint
        tempfile.TemporaryFile(dir=run_dir).close()
    except OSError as err:
        message = f"run_dir {run_dir}: cannot write into it ({err.strerror}); choose another --run_dir"
        raise ConfigError(message) from err
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


def checkpoint_run_dir(checkpoint: str | None) -> Path | None:
    """The run directory a checkpoint was written into, if it is one (``<run>/checkpoints/<file>``)."""
    if not checkpoint or checkpoint in ("last", "best", "hpc", "registry"):
        return None
    parent = Path(checkpoint).parent
    if parent.name == "checkpoints" and (parent.parent / CONFIG_FILE).is_file():
        return parent.parent
    return None


def wandb_run_id(save_dir: Path) -> str | None:
    """The id of the newest W&B run under ``save_dir/wandb`` (``[offline-]run-<time>-<id>`` folders)."""
    runs = sorted(
        (path.name.partition("run-")[2], path.name) for path in (save_dir / "wandb").glob("*run-*-*") if path.is_dir()
    )
    return runs[-1][1].rsplit("-", 1)[1] if runs else None


_NOISE = (
    "💡 Tip: For seamless cloud logging",  # an advertisement, on every run
    "Loading `train_dataloader` to estimate number of stepping batches",  # how, not what
)


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_known_noise(subcommand: str) -> None:
    """Drop Lightning's and PyTorch's lines that say nothing about this run."""
    fragments = _NOISE if subcommand == "fit" else (*_NOISE, "`Trainer(val_check_interval=")
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where rank_zero_info writes
    for existing in [f for f in logger.filters if isinstance(f, _DropMessages)]:
        logger.removeFilter(existing)
    logger.addFilter(_DropMessages(fragments))
    # Lightning's own pytree helper calls a torch API that torch has deprecated; nothing a user can change.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def register_resolvers() -> None:
    """``${samples:synthetic/ei/train.jsonl}`` in a config names a bundled sample file wherever the package is."""
    if not OmegaConf.has_resolver("samples"):
        # omegaconf 2.4 deprecates register_new_resolver for register_resolver (in 2.3 the legacy API)
        new_api = hasattr(OmegaConf, "legacy_register_resolver")
        register = OmegaConf.register_resolver if new_api else OmegaConf.register_new_resolver
        register("samples", lambda path: str(SAMPLES_DIR / path))


def main(args: list[str] | None = None) -> MoEICLI | None:
    """Entry point of ``python -m moei_lightning`` and the ``moei-lightning`` script.

    ``--debug`` (anywhere) or ``MOEI_DEBUG=1`` lets errors keep their traceback.
    """
    register_resolvers()
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if args is None:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself when given no args
    token = _DEBUG.set(debug)
    try:
        return _run(args, argv, debug)
    finally:
        _DEBUG.reset(token)


def _run(args: list[str] | None, argv: list[str], debug: bool) -> MoEICLI | None:
    with _own_run_dir_env(), _errors_as_messages(debug):
        if argv and argv[0] in TOOLS:
            module = importlib.import_module(f"moei_lightning.{TOOL_MODULES.get(argv[0], argv[0])}")
            module.main(argv[1:])
            return None
        # YAML files write ${data.batch_size}, not the subcommand-relative ${..data.batch_size}.
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        cli = MoEICLI(
            MoEIModule,
            MoEIDataModule,
            args=args if args is None else argv,
            parser_kwargs={"parser_mode": "omegaconf+", "prog": PROG, "description": DESCRIPTION},
            trainer_defaults={"use_distributed_sampler": False},
            save_config_kwargs={"overwrite": True},
        )
        finish_wandb_run()
        return cli
    return None


def finish_wandb_run() -> None:
    """End this run's W&B run now, while standard error is still the process's own.

    Left to W&B's exit hook, its closing lines go to standard output with terminal colour codes even
    when that is a log file; ``wandb.finish()`` writes them to standard error, plain unless it is a terminal.
    """
    wandb = sys.modules.get("wandb")  # never imported: no run to end
    if wandb is not None and wandb.run is not None:
        wandb.finish()


@contextmanager
def _own_run_dir_env() -> Iterator[None]:
    """``MOEI_RUN_DIR`` and the run directory's lock are this run's; a later run in this process picks its own."""
    before = os.environ.get(RUN_DIR_ENV)
    try:
        yield
    finally:
        release_run_dirs()
        if before is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = before


@contextmanager
def _errors_as_messages(debug: bool) -> Iterator[None]:
    """Bad input, divergence and signals end the process with one line and a meaningful exit status."""
    try:
        yield
    except TrainingInterrupted as err:
        _exit(f"interrupted: {err}", err.exit_code, err, debug)
    except SIGTERMException as err:
        _exit("interrupted: SIGTERM received before training could save a checkpoint", 143, err, debug)
    except TrainingDiverged as err:
        _exit(f"error: {err}", DIVERGED_EXIT, err, debug)
    except OmegaConfBaseException as err:
        key = str(getattr(err, "full_key", "") or "").partition(".")[2]  # without the subcommand
        where = f" in {key}" if key else ""
        message = str(getattr(err, "msg", err)).splitlines()[0]
        _exit(f"error: config interpolation{where}: {message}", USER_ERROR_EXIT, err, debug)
    except Exception as err:
        user_error = _find_user_error(err)
        if user_error is None:
            raise
        _exit(f"error: {_one_line(str(user_error))}", USER_ERROR_EXIT, err, debug)


def _exit(message: str, code: int, err: BaseException, debug: bool) -> None:
    if debug:
        raise err
    print(message, file=sys.stderr)
    raise SystemExit(code) from None


def _find_user_error(err: BaseException) -> BaseException | None:
    """``err`` or the cause it wraps, if that is bad input (Lightning and jsonargparse wrap errors)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, USER_ERRORS):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _root_message(err: BaseException) -> str:
    """The innermost cause's message: jsonargparse wraps a constructor's error in several layers."""
    while err.__cause__ is not None:
        err = err.__cause__
    return _one_line(str(err))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def explicit_model_keys(argv: list[str] | tuple[str, ...]) -> list[str]:
    """The ``model.*`` keys set on the command line (``--model.a.b=v`` or ``--model.a.b v``)."""
    keys = []
    for token in argv:
        if isinstance(token, str) and token.startswith("--model."):
            keys.append(token[2:].split("=", 1)[0])
    return keys


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        flat[name] = value
    return flat
