"""The command line: ``python -m moei_lightning COMMAND ...``, its first word picking what runs.

``fit``, ``validate``, ``test`` and ``predict`` run the Trainer's method of that name through a
LightningCLI (``--config conf/tiny.yaml``, ``--model.*``, ...), with omegaconf interpolation resolved
after every source is merged (``omegaconf+``), so ``--data.max_length=256`` also reaches every
``${data.max_length}`` in the YAML. Each run writes into its own directory (``runs/<id>``, or
``--run_dir``): the saved ``config.yaml``, checkpoints and the logger's files never collide between
runs. A run that continues from a checkpoint of a run directory (a resumed ``fit``, a ``test`` or
``predict`` of it) writes into that directory and the same W&B run. The other commands are tools
with their own options: ``export`` writes a checkpoint in a format other tools read, ``generate``
answers prompts with an export, and ``lm-eval`` runs lm-evaluation-harness tasks on one.

Bad input (config, data, checkpoint or adapter files) ends the run with one ``error: ...`` line and
exit status 2; ``--debug`` or ``MOEI_DEBUG=1`` shows the traceback instead. Training that diverges
exits 3; SIGTERM / SIGINT during training save a resumable checkpoint and exit 143 / 130.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
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
from moei_lightning.config_parser import FULL_PARSE_ERRORS, MoEIArgumentParser, one_line
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
# The Trainer's commands: name -> what --help says (Lightning's docstrings are cut off after their first line).
TRAINER_COMMANDS = {
    "fit": "Train the adapters; writes checkpoints, config.yaml and a summary into the run directory.",
    "validate": "Evaluate on the validation split.",
    "test": "Evaluate on the test split (and run the paper's evaluation suites listed in eval.suites).",
    "predict": "Generate a reply for every test prompt, or for --data.predict=FILE, into predictions.jsonl.",
}
# Commands beside the Trainer's: name -> what --help says about them; each is moei_lightning.<name>.main
# (or the module TOOL_MODULES names), given the rest of the command line.
TOOLS = {
    "export": "Write a checkpoint as adapters, a PEFT adapter or a save_pretrained model.",
    "generate": "Replies from an exported model to prompts from a file or standard input, as JSONL.",
    "lm-eval": "lm-evaluation-harness tasks on an exported model, routed from each request's context.",
}
TOOL_MODULES = {"lm-eval": "lm_eval_model"}  # a command whose module is not named after it


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
    """LightningCLI for one Trainer command: its own directory for every run, loggers and checkpoints in it.

    ``command`` (``fit``, ``validate``, ``test`` or ``predict``) adds that method's arguments
    (``--ckpt_path``); :meth:`run_command` runs it once the classes are built.
    """

    def __init__(self, *args: Any, command: str, **kwargs: Any) -> None:
        self.command = command
        kwargs.setdefault("parser_class", MoEIArgumentParser)
        kwargs.setdefault("save_config_callback", MoEISaveConfig)
        super().__init__(*args, run=False, **kwargs)

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
        # The command's own arguments (--ckpt_path, ...), under "<command> arguments" in --help.
        skip = self.subcommands()[self.command]
        self.command_arguments = parser.add_method_arguments(self.trainer_class, self.command, skip=skip)
        parser.groups[self.command].title = f"{self.command} arguments"

    def parse_arguments(self, parser: LightningArgumentParser, args: list[str]) -> None:
        """Parse ``args`` (the command line after the command), remembering which ``--model.*`` keys it sets."""
        self.explicit_model_keys = explicit_model_keys(args)
        self.config = parser.parse_args(args)

    def apply_checkpoint_settings(self) -> None:
        """Take the model settings from ``--ckpt_path``, except where the command line sets them.

        The checkpoint wins over config files and an explicit command-line key over the checkpoint
        (``--model.backbone.name_or_path=/other`` is honoured), but a key that decides the
        checkpoint's tensors (:data:`ADAPTER_SHAPE_KEYS`) may not differ from it at all: that is an
        error naming the keys. The file is read with ``weights_only=True``.
        """
        ckpt_path = self.config.get("ckpt_path")
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
        given = {key: self.config.get(key) for key in self.explicit_model_keys}
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
        self.config = self.parser.parse_object({"model": hparams}, self.config)
        for key, value in given.items():
            self.config[key] = value
        changed = [f"{k}={v!r}" for k, v in given.items() if k in saved and saved[k] != v]
        if changed:
            print(f"--ckpt_path {path}: the command line overrides the checkpoint's {', '.join(changed)}")

    def before_instantiate_classes(self) -> None:
        self.apply_checkpoint_settings()
        quiet_known_noise(self.command)
        config = self.config
        run_dir = resolve_run_dir(config.get("run_dir"), self.command, config.get("ckpt_path"))
        if self.command == "fit":
            lock_run_dir(run_dir)
        if self.command != "fit" and (run_dir / CONFIG_FILE).is_file():  # next to a fit: keep its config.yaml
            self.save_config_kwargs["config_filename"] = f"config-{self.command}.yaml"
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
            raise ConfigError(f"config key trainer: {one_line(str(err))}") from err
        if trainer.world_size > 1 and self.config.trainer.use_distributed_sampler:
            raise ConfigError(
                "MoEIDataModule shards batches across ranks itself; run the Trainer with "
                "use_distributed_sampler=False (YAML: trainer.use_distributed_sampler: false)"
            )
        run_dir = Path(trainer.default_root_dir)
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = str(run_dir / "checkpoints")
        use_atomic_checkpoints(trainer)
        if self.command == "fit":
            trainer.callbacks.extend([InterruptCheckpoint(), ResumableEnd()])
        if self.command == "predict":
            trainer.callbacks.append(PredictionWriter(run_dir / "predictions.jsonl"))
        return trainer

    def run_command(self) -> None:
        """Check the data before the Trainer starts (and with it a W&B run), then run the command."""
        if isinstance(self.datamodule, MoEIDataModule) and isinstance(self.model, MoEIModule):
            self.datamodule.attach(self.model.tokenizer, self.model.kind)
            self.datamodule.setup(self.command)
        start_wandb_runs(self.trainer)
        kwargs = {key: self.config_init[key] for key in self.command_arguments}
        kwargs["weights_only"] = True  # a checkpoint is data: never run code from it
        getattr(self.trainer, self.command)(self.model, datamodule=self.datamodule, **kwargs)


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
    if not checkpoint or checkpoint in LIGHTNING_CKPT_ALIASES:
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
    token = FULL_PARSE_ERRORS.set(debug)
    try:
        with _own_run_dir_env(), _errors_as_messages(debug):
            return run([a for a in argv if a != "--debug"])
    finally:
        FULL_PARSE_ERRORS.reset(token)


def run(argv: list[str]) -> MoEICLI | None:
    """Run the command ``argv`` starts with: a Trainer command through :class:`MoEICLI`, a tool through its ``main``."""
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command in TOOLS:
        importlib.import_module(f"moei_lightning.{TOOL_MODULES.get(command, command)}").main(rest)
        return None
    if command in ("-h", "--help"):
        command_parser().print_help()
        raise SystemExit(0)
    if command not in TRAINER_COMMANDS:
        given = f"{command!r} is not a command" if command else "no command given"
        raise ConfigError(f"{given}; the command line starts with one of {', '.join([*TRAINER_COMMANDS, *TOOLS])}")
    cli = MoEICLI(
        MoEIModule,
        MoEIDataModule,
        command=command,
        args=rest,
        parser_kwargs={
            "parser_mode": "omegaconf+",
            "prog": f"{PROG} {command}",
            "description": f"{TRAINER_COMMANDS[command]} {DEBUG_HELP}",
        },
        trainer_defaults={"use_distributed_sampler": False},
        save_config_kwargs={"overwrite": True},
    )
    cli.run_command()
    finish_wandb_run()
    return cli


def command_parser() -> argparse.ArgumentParser:
    """The top-level ``--help``: every command, with what it does (each command parses its own options)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=f"`{PROG} COMMAND --help` lists the options of a command."
    )
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    for name, text in {**TRAINER_COMMANDS, **TOOLS}.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


WANDB_ANONYMOUS_WARNING = "The anonymous setting has no effect"


def start_wandb_runs(trainer: Trainer) -> None:
    """Start the W&B runs of ``trainer``'s loggers now, without W&B's warning about ``anonymous``.

    Lightning passes ``anonymous`` to ``wandb.init`` on every run and W&B warns that the setting does
    nothing: a line no user can act on. W&B writes it to standard error while the run starts, so the
    run starts here, with that one line held back.
    """
    loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
    if not loggers:
        return
    importlib.import_module("wandb")  # W&B hooks standard error's writes on import: before it is swapped
    with redirect_stderr(_WithoutLines(sys.stderr, WANDB_ANONYMOUS_WARNING)):
        for logger in loggers:
            _ = logger.experiment


class _WithoutLines:
    """``stream``, less the lines that contain ``fragment``."""

    def __init__(self, stream: Any, fragment: str) -> None:
        self.stream = stream
        self.fragment = fragment

    def write(self, text: str) -> int:
        self.stream.write("".join(line for line in text.splitlines(keepends=True) if self.fragment not in line))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


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
        key = str(getattr(err, "full_key", "") or "")
        where = f" in {key}" if key else ""
        message = str(getattr(err, "msg", err)).splitlines()[0]
        _exit(f"error: config interpolation{where}: {message}", USER_ERROR_EXIT, err, debug)
    except Exception as err:
        user_error = _find_user_error(err)
        if user_error is None:
            raise
        _exit(f"error: {one_line(str(user_error))}", USER_ERROR_EXIT, err, debug)


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
    return one_line(str(err))


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
