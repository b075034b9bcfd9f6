"""``PaperEvaluation``: the paper's evaluation as a Lightning callback that runs with ``test``.

``python -m moei_lightning test --config conf/llama2-13b.yaml --config conf/eval/paper.yaml --ckpt_path CKPT``
evaluates a checkpoint (or, without ``--ckpt_path``, the backbone itself: fresh adapters leave its
output unchanged) on the suites of the ``eval:`` section, then writes ``report.json`` and
``report.md`` into the run directory and logs the same tables to W&B. Prompts are formatted with
the DataModule's settings (``data.prompt_template``, ``data.use_chat_template``, ``data.max_length``),
so the model is asked the way it was trained. Input files are read at ``setup``, before the test
loop, so a wrong path fails in seconds rather than after it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from moei_lightning.callbacks.ei_metrics import log_rows
from moei_lightning.callbacks.progress import SuiteProgress
from moei_lightning.data import DataError
from moei_lightning.eval import emobench
from moei_lightning.eval.emobench import LANGUAGES
from moei_lightning.eval.eqbench import DEFAULT_MODE
from moei_lightning.eval.harness import Harness
from moei_lightning.eval.registry import build_report, load_inputs, make_suites, suite_rows, write_outputs
from moei_lightning.eval.report import STAGE, Report, Table
from moei_lightning.eval.scorer import row_key
from moei_lightning.eval.suite import Settings, Source
from moei_lightning.sharding import root_parameters_gathered


class PaperEvaluation(Callback):
    """Evaluate like the MoEI paper when ``test`` runs: EI per aspect, GI per dimension, EQ-Bench, EmoBench.

    Args:
        suites: Suites to run, from ``eibench``, ``gi``, ``eqbench``, ``emobench``, ``emotion_prompt``, ``lm_eval``.
            Empty: the callback does nothing.
        batch_size: Sequences per forward pass or generate call, per device.
        max_new_tokens: Greedy generation length for open EiBench tasks.
        eibench: EiBench JSONL files or folders with the EI test records; None uses ``data.ei_test``.
        gi: GI JSONL files or folders (records with ``choices``); None uses ``data.gi_test``.
        gi_mmlu_csv: MMLU-style CSV files (question, A, B, C, D, answer) by GI dimension, e.g.
            ``{knowledge: [mmlu/high_school_geography_test.csv]}``; asked and scored as lm-eval's ``mmlu``.
        mmlu_num_fewshot: Solved examples before each MMLU question: the first N rows of the subject's
            ``<subject>_dev.csv``, beside the file or in ``../dev/`` (lm-eval's ``--num_fewshot``).
        eqbench_questions: The EQ-Bench questions file (``eq_bench_v2_questions_171.json``; a
            60-question file is v1, as the reference harness decides, and is scored as v1).
        eqbench_mode: ``no_revise`` (one set of scores; the reference harness's default since v2.1)
            or ``revise`` (first pass, critique, revised scores).
        eqbench_max_new_tokens: Reply length for EQ-Bench; null: the reference harness's, 60 tokens
            for ``no_revise`` and 600 for ``revise``.
        eqbench_system_message: ``harness`` (the reference harness's: "Answer the questions." with a
            Llama-2 chat template, else "You are an expert in emotional analysis.") or ``none``.
        eqbench_sampling: ``harness`` (only the temperature is set; the model's generation config
            keeps its top-k and top-p) or ``plain`` (top-k and top-p turned off).
        emobench_dir: Folder holding EmoBench's ``EU.jsonl`` and ``EA.jsonl``.
        emobench_languages: EmoBench languages to ask: ``en``, ``zh`` or both.
        emobench_protocol: ``generate`` (the published protocol: the reference's prompts, letter answers
            parsed from the reply, an unparseable reply wrong) or ``loglikelihood`` (each question as
            multiple choice by log-likelihood).
        emobench_max_new_tokens: Reply length for the ``generate`` protocol (the reference's 50).
        emotion_prompt_stimuli: Stimulus id -> sentence, appended to every GI prompt by the
            ``emotion_prompt`` suite (Li et al. 2023; ``conf/eval/paper.yaml`` lists EP01-EP11).
        lm_eval_tasks: lm-evaluation-harness tasks and groups for the ``lm_eval`` suite, a list or one
            comma-separated string (lm-eval's ``--tasks``), run on the model in memory with lm-eval's own
            prompts, metrics and aggregation (needs the ``lm-eval`` extra).
        lm_eval_include_path: A folder of further lm-eval task YAMLs (lm-eval's ``--include_path``).
        lm_eval_num_fewshot: lm-eval's ``--num_fewshot`` for every task; null: each task's own.
        limit: For quick runs: ask only the first N items of each task (per language), the first N
            EQ-Bench questions and the first N documents of each lm-eval task. The report says so; its
            scores are then not comparable with full runs.
    """

    def __init__(
        self,
        suites: Sequence[str] = (),
        batch_size: int = 8,
        max_new_tokens: int = 128,
        eibench: Sequence[str] | None = None,
        gi: Sequence[str] | None = None,
        gi_mmlu_csv: Mapping[str, Sequence[str]] | None = None,
        mmlu_num_fewshot: int = 0,
        eqbench_questions: str | None = None,
        eqbench_mode: str = DEFAULT_MODE,
        eqbench_max_new_tokens: int | None = None,
        eqbench_system_message: str = "harness",
        eqbench_sampling: str = "harness",
        emobench_dir: str | None = None,
        emobench_languages: Sequence[str] = LANGUAGES,
        emobench_protocol: str = emobench.DEFAULT_PROTOCOL,
        emobench_max_new_tokens: int = emobench.MAX_NEW_TOKENS,
        emotion_prompt_stimuli: Mapping[str, str] | None = None,
        lm_eval_tasks: str | Sequence[str] = (),
        lm_eval_include_path: str | None = None,
        lm_eval_num_fewshot: int | None = None,
        limit: int | None = None,
    ) -> None:
        super().__init__()
        arguments = locals()  # every argument is an eval.* setting of the same name
        self.settings = Settings(**{f.name: arguments[f.name] for f in dataclasses.fields(Settings)})
        self.suites = make_suites(self.settings)
        self.names = [suite.name for suite in self.suites]
        self.inputs: dict[str, Any] | None = None
        self.report: Report | None = None

    @property
    def scores_ei_gi(self) -> bool:
        """Whether ``test`` takes its EI/GI metrics from this evaluation (``ei_metrics`` then leaves the test split)."""
        return bool({"eibench", "gi"} & set(self.names))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Read and check every input file now, before the test loop spends any time."""
        if stage == "test" and self.suites:
            self.inputs = load_inputs(self.suites, self.source(trainer.datamodule))

    @staticmethod
    def source(datamodule: Any) -> Source:
        """The DataModule's split files, where EiBench and GI read when ``eval.eibench`` / ``eval.gi`` are unset."""
        paths = getattr(datamodule, "paths", None)
        return Source(paths if isinstance(paths, dict) else {})

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.suites:
            return
        data = trainer.datamodule
        if getattr(data, "formatter", None) is None:
            raise DataError(
                "PaperEvaluation formats prompts with the DataModule's settings (data.prompt_template, "
                f"data.max_length), but the test ran with {'no DataModule' if data is None else type(data).__name__}; "
                "run it with MoEIDataModule"
            )
        harness = Harness.of_module(pl_module, data, self.settings.batch_size, trainer.global_rank, trainer.world_size)
        with trainer.precision_plugin.test_step_context(), root_parameters_gathered(trainer.strategy.model):
            results = harness.run(self.suites, self.inputs, SuiteProgress(trainer, len(self.suites)))
        # The EI/GI rows of the report's tables, logged under the report's keys: test/ei/..., test/gi/...
        rows = suite_rows(self.suites, results)
        logged = [row for part in rows.values() for row in part]
        if logged:
            log_rows(STAGE, logged, trainer, pl_module)
        if not trainer.is_global_zero:
            return
        self.report = build_report(self.suites, results, rows, self.run_config(trainer, pl_module), self.settings.limit)
        run_dir = Path(trainer.default_root_dir)
        _, md_path = self.report.write(run_dir)
        write_outputs(self.suites, results, run_dir)
        keys = {row_key(STAGE, row) for row in logged}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                log_to_wandb(logger, self.report, keys)
        rank_zero_info(f"Evaluation report: {md_path}\n\n{self.report.summary.to_markdown()}")

    def run_config(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """What the report's reader needs to know about the run: checkpoint, backbone, adapters, prompts, eval."""
        data = trainer.datamodule
        molora = getattr(pl_module, "molora_config", None)
        backbone = getattr(pl_module, "backbone_config", None)
        source = self.source(data)
        settings = dataclasses.asdict(self.settings)
        return {
            "checkpoint": str(trainer.ckpt_path or "none: the backbone as loaded (fresh adapters leave it unchanged)"),
            "backbone": dataclasses.asdict(backbone) if dataclasses.is_dataclass(backbone) else {},
            "kind": pl_module.kind,
            "adapter": getattr(pl_module, "adapter", None),
            "molora": dataclasses.asdict(molora) if dataclasses.is_dataclass(molora) else None,
            "data": {
                "max_length": data.max_length,
                "prompt_template": data.prompt_template,
                "system_prompt": data.system_prompt,
                "chat_template": data.formatter.uses_chat,
            },
            "eval": {
                **settings,
                "suites": self.names,
                "eibench": source.paths(self.settings.eibench, "eibench", "ei_test")[0],
                "gi": source.paths(self.settings.gi, "gi", "gi_test")[0],
                "emotion_prompt_stimuli": [str(k) for k in self.settings.emotion_prompt_stimuli],
            },
            "trainer": {
                "precision": str(trainer.precision),
                "strategy": type(trainer.strategy).__name__,
                "world_size": trainer.world_size,
            },
            "run_dir": str(trainer.default_root_dir),
        }


def log_to_wandb(logger: WandbLogger, report: Report, logged: Collection[str] = ()) -> None:
    """Every table of the report as a W&B table under ``eval/``, and the summary scores as scalars under their
    keys (``test/...``), but for the keys in ``logged``, which the module has logged already."""
    for name, table in {"summary": report.summary, **report.tables}.items():
        logger.log_table(key=f"eval/{name}", columns=table.columns, data=wandb_rows(table))
    scalars = {key: value for key, value in report.metrics.items() if value is not None and key not in logged}
    if scalars:
        logger.log_metrics(scalars)


def wandb_rows(table: Table) -> list[list[Any]]:
    """Rows with every mixed-type column as text: a W&B table column holds one type."""
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in table.rows) for i in range(len(table.columns))
    ]
    return [[value if numeric[i] or value is None else str(value) for i, value in enumerate(row)] for row in table.rows]
