"""The command line: ``python -m moei_lightning fit|validate|test|predict --config conf/tiny.yaml``.

A LightningCLI with omegaconf interpolation resolved after every source is merged (``omegaconf+``),
so ``--data.max_length=256`` also reaches every ``${data.max_length}`` in the YAML. Each run writes
into its own directory (``runs/<id>``, or ``--run_dir``): the saved ``config.yaml``, checkpoints and
the logger's files never collide between runs. ``export`` writes a checkpoint in a format other
tools read, and ``generate`` answers prompts with an export.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from moei_lightning.data import DataError, MoEIDataModule
from moei_lightning.module import MoEIModule

RUN_DIR_ENV = "MOEI_RUN_DIR"
# Commands beside the Trainer's: name -> what --help says about them; each is moei_lightning.<name>.main.
TOOLS = {
    "export": "Write a checkpoint as adapters, a PEFT adapter or a save_pretrained model.",
    "generate": "Replies from an exported model to prompts from a file or standard input, as JSONL.",
}


class MoEICLI(LightningCLI):
    """LightningCLI that gives every run its own directory and points loggers and checkpoints into it."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="Directory for this run's config, checkpoints and logs (default: runs/<timestamp>-<subcommand>).",
        )
        # Router statistics, per-aspect metrics and the progress bar for every config (docs/monitoring.md).
        from moei_lightning.callbacks import EiMetricsCallback, MoEIProgressBar, RouterStatsCallback

        parser.add_lightning_class_args(RouterStatsCallback, "router_stats")
        parser.add_lightning_class_args(EiMetricsCallback, "ei_metrics")
        parser.add_lightning_class_args(MoEIProgressBar, "progress_bar")
        # The paper's evaluation when `test` runs (docs/evaluation.md); it does nothing until eval.suites lists some.
        from moei_lightning.eval.callback import PaperEvaluation

        parser.add_lightning_class_args(PaperEvaluation, "eval")
        # EI and GI accuracy and gates before and after every fit, printed and saved (summary.json).
        from moei_lightning.eval.fit_summary import FitSummary

        parser.add_lightning_class_args(FitSummary, "summary")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = resolve_run_dir(config.get("run_dir"), self.subcommand or "run")
        config.run_dir = str(run_dir)
        config.trainer.default_root_dir = str(run_dir)
        loggers = config.trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = logger.get("init_args") if isinstance(logger, Namespace) else None
            if init_args is not None and init_args.get("save_dir", "") in (None, ".", ""):
                init_args.save_dir = str(run_dir)  # loggers configured without a directory write into the run's

    def instantiate_trainer(self, **kwargs: object) -> object:
        trainer = super().instantiate_trainer(**kwargs)
        run_dir = Path(trainer.default_root_dir)
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = str(run_dir / "checkpoints")
        return trainer


def resolve_run_dir(requested: str | None, subcommand: str) -> Path:
    """The run directory, shared by every process of the run.

    Processes that Lightning launches for DDP inherit it through ``MOEI_RUN_DIR``; under torchrun
    or SLURM the launcher's job id names it, since all ranks start at once.
    """
    if requested:
        run_dir = Path(requested)
    elif os.environ.get(RUN_DIR_ENV):
        run_dir = Path(os.environ[RUN_DIR_ENV])
    else:
        job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "none")
        stamp = time.strftime("%Y%m%d-%H%M%S") if job == "none" else f"job{job}"
        run_dir = Path("runs") / f"{stamp}-{subcommand}"
        if job == "none" and run_dir.exists():
            run_dir = run_dir.with_name(f"{run_dir.name}-{os.getpid()}")
    os.environ[RUN_DIR_ENV] = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def main(args: list[str] | None = None) -> MoEICLI | None:
    """Entry point of ``python -m moei_lightning`` and the ``moei-lightning`` script."""
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in TOOLS:
        module = importlib.import_module(f"moei_lightning.{argv[0]}")
        module.main(argv[1:])
        return None
    # YAML files write ${data.batch_size}, not the subcommand-relative ${..data.batch_size}.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    try:
        return MoEICLI(
            MoEIModule,
            MoEIDataModule,
            args=args,
            parser_kwargs={"parser_mode": "omegaconf+"},
            trainer_defaults={"use_distributed_sampler": False},
            save_config_kwargs={"overwrite": True},
        )
    except (DataError, FileNotFoundError) as err:  # bad input files: the message says where, no stack trace
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
