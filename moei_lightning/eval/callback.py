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
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from moei_lightning.callbacks.ei_metrics import log_rows
from moei_lightning.data import DataError
from moei_lightning.eval import emobench
from moei_lightning.eval.aggregate import build_report
from moei_lightning.eval.emobench import LANGUAGES
from moei_lightning.eval.emotion_prompt import check_stimuli
from moei_lightning.eval.eqbench import DEFAULT_MODE, MODES, SAMPLINGS, SYSTEM_MESSAGES, results_file
from moei_lightning.eval.harness import Harness, Results, Settings
from moei_lightning.eval.progress import SuiteProgress
from moei_lightning.eval.report import Report, Table
from moei_lightning.eval.scorer import score_rows
from moei_lightning.eval.suites import (
    SuiteInputs,
    check_suites,
    eibench_items,
    emobench_items,
    eqbench_questions,
    gi_items,
    limit_items,
)
from moei_lightning.sharding import root_parameters_gathered


class PaperEvaluation(Callback):
    """Evaluate like the MoEI paper when ``test`` runs: EI per aspect, GI per dimension, EQ-Bench, EmoBench.

    Args:
        suites: Suites to run, from ``eibench``, ``gi``, ``eqbench``, ``emobench``, ``emotion_prompt``.
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
        limit: For quick runs: ask only the first N items of each task (per language) and the first N
            EQ-Bench questions. The report says so; its scores are then not comparable with full runs.
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
        limit: int | None = None,
    ) -> None:
        super().__init__()
        self.names = check_suites(list(suites))
        for key, value, ok in (
            ("batch_size", batch_size, batch_size >= 1),
            ("max_new_tokens", max_new_tokens, max_new_tokens >= 1),
            (
                "eqbench_max_new_tokens",
                eqbench_max_new_tokens,
                eqbench_max_new_tokens is None or eqbench_max_new_tokens >= 1,
            ),
            ("emobench_max_new_tokens", emobench_max_new_tokens, emobench_max_new_tokens >= 1),
            ("limit", limit, limit is None or limit >= 1),
        ):
            if not ok:
                raise DataError(f"config key eval.{key}: expected a positive integer, got {value!r}")
        if mmlu_num_fewshot < 0:
            raise DataError(f"config key eval.mmlu_num_fewshot: expected 0 or more examples, got {mmlu_num_fewshot!r}")
        for suite, key, value in (
            ("eqbench", "eqbench_questions", eqbench_questions),
            ("emobench", "emobench_dir", emobench_dir),
        ):
            if suite in self.names and not value:
                raise DataError(f"config key eval.{key}: the {suite} suite is in eval.suites but {key} is not set")
        if eqbench_mode not in MODES:
            raise DataError(f"config key eval.eqbench_mode: {eqbench_mode!r} is not one of {list(MODES)}")
        for key, value, choices in (
            ("eqbench_system_message", eqbench_system_message, SYSTEM_MESSAGES),
            ("eqbench_sampling", eqbench_sampling, SAMPLINGS),
        ):
            if value not in choices:
                raise DataError(f"config key eval.{key}: {value!r} is not one of {list(choices)}")
        if emobench_protocol not in emobench.PROTOCOLS:
            raise DataError(
                f"config key eval.emobench_protocol: {emobench_protocol!r} is not one of {list(emobench.PROTOCOLS)}"
            )
        self.eqbench_mode = eqbench_mode
        self.emobench_protocol, self.emobench_max_new_tokens = emobench_protocol, emobench_max_new_tokens
        self.stimuli = check_stimuli(emotion_prompt_stimuli or {})
        if "emotion_prompt" in self.names and not self.stimuli:
            raise DataError(
                "config key eval.emotion_prompt_stimuli: the emotion_prompt suite needs at least one stimulus; "
                "conf/eval/paper.yaml lists EP01-EP11"
            )
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.eibench, self.gi = eibench, gi
        self.gi_mmlu_csv = {k: [v] if isinstance(v, str) else list(v) for k, v in (gi_mmlu_csv or {}).items()}
        self.mmlu_num_fewshot = mmlu_num_fewshot
        self.eqbench_questions = eqbench_questions
        self.eqbench_max_new_tokens = eqbench_max_new_tokens
        self.eqbench_system_message, self.eqbench_sampling = eqbench_system_message, eqbench_sampling
        self.emobench_dir, self.emobench_languages = emobench_dir, list(emobench_languages)
        self.limit = limit
        self.inputs: SuiteInputs | None = None
        self.report: Report | None = None

    @property
    def settings(self) -> Settings:
        return Settings(
            max_new_tokens=self.max_new_tokens,
            eqbench_max_new_tokens=self.eqbench_max_new_tokens,
            eqbench_mode=self.eqbench_mode,
            eqbench_system_message=self.eqbench_system_message,
            eqbench_sampling=self.eqbench_sampling,
            emobench_protocol=self.emobench_protocol,
            emobench_max_new_tokens=self.emobench_max_new_tokens,
        )

    @property
    def scores_ei_gi(self) -> bool:
        """Whether ``test`` takes its EI/GI metrics from this evaluation (``ei_metrics`` then leaves the test split)."""
        return bool({"eibench", "gi"} & set(self.names))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Read and check every input file now, before the test loop spends any time."""
        if stage == "test" and self.names:
            self.inputs = self.load_inputs(trainer.datamodule)

    def load_inputs(self, datamodule: Any) -> SuiteInputs:
        """The items of every configured suite; EI/GI paths default to the DataModule's test files."""
        inputs = SuiteInputs(self.names, stimuli=self.stimuli)
        if "eibench" in self.names:
            paths, key = self._paths(self.eibench, "eibench", datamodule, "ei_test")
            inputs.eibench = limit_items(eibench_items(paths, key), self.limit)
        if "gi" in self.names:
            paths, key = self._paths(self.gi, "gi", datamodule, "gi_test")
            inputs.gi = limit_items(gi_items(paths, key, self.gi_mmlu_csv, self.mmlu_num_fewshot), self.limit)
        if "eqbench" in self.names:
            inputs.eqbench = eqbench_questions(self.eqbench_questions, self.limit)
        if "emobench" in self.names:
            inputs.emobench = limit_items(emobench_items(self.emobench_dir, self.emobench_languages), self.limit)
        return inputs

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.names:
            return
        data = trainer.datamodule
        if getattr(data, "formatter", None) is None:
            raise DataError(
                "PaperEvaluation formats prompts with the DataModule's settings (data.prompt_template, "
                f"data.max_length), but the test ran with {'no DataModule' if data is None else type(data).__name__}; "
                "run it with MoEIDataModule"
            )
        harness = Harness.of_module(pl_module, data, self.batch_size, trainer.global_rank, trainer.world_size)
        with trainer.precision_plugin.test_step_context(), root_parameters_gathered(trainer.strategy.model):
            progress = SuiteProgress(trainer, len(self.names))
            results = harness.run(self.inputs, self.settings, progress)
        if self.scores_ei_gi:  # the same rows as the report's EI/GI tables, logged as test/ei/..., test/gi/...
            log_rows("test", score_rows(results.eibench + results.gi, results.eibench_open), trainer, pl_module)
        if not trainer.is_global_zero:
            return
        config = self.run_config(trainer, pl_module)
        self.report = build_report(self.names, results, config, self.stimuli, self.limit)
        run_dir = Path(trainer.default_root_dir)
        _, md_path = self.report.write(run_dir)
        write_outputs(results, run_dir)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                log_to_wandb(logger, self.report)
        rank_zero_info(f"Evaluation report: {md_path}\n\n{self.report.summary.to_markdown()}")

    def run_config(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """What the report's reader needs to know about the run: checkpoint, backbone, adapters, prompts, eval."""
        data = trainer.datamodule
        molora = getattr(pl_module, "molora_config", None)
        backbone = getattr(pl_module, "backbone_config", None)
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
                "suites": self.names,
                "batch_size": self.batch_size,
                "max_new_tokens": self.max_new_tokens,
                "eibench": self._paths(self.eibench, "eibench", data, "ei_test")[0],
                "gi": self._paths(self.gi, "gi", data, "gi_test")[0],
                "gi_mmlu_csv": self.gi_mmlu_csv,
                "mmlu_num_fewshot": self.mmlu_num_fewshot,
                "eqbench_questions": self.eqbench_questions,
                "eqbench_mode": self.eqbench_mode,
                "eqbench_max_new_tokens": self.eqbench_max_new_tokens,
                "eqbench_system_message": self.eqbench_system_message,
                "eqbench_sampling": self.eqbench_sampling,
                "emobench_dir": self.emobench_dir,
                "emobench_languages": self.emobench_languages,
                "emobench_protocol": self.emobench_protocol,
                "emobench_max_new_tokens": self.emobench_max_new_tokens,
                "emotion_prompt_stimuli": list(self.stimuli),
                "limit": self.limit,
            },
            "trainer": {
                "precision": str(trainer.precision),
                "strategy": type(trainer.strategy).__name__,
                "world_size": trainer.world_size,
            },
            "run_dir": str(trainer.default_root_dir),
        }

    @staticmethod
    def _paths(given: Sequence[str] | None, key: str, datamodule: Any, data_key: str) -> tuple[list[str], str]:
        if given is not None:
            return ([given] if isinstance(given, str) else list(given)), f"eval.{key}"
        paths = getattr(datamodule, "paths", None)
        if not isinstance(paths, dict) or data_key not in paths:
            raise DataError(
                f"config key eval.{key}: not set, and the DataModule has no data.{data_key} to fall back on; "
                f"set eval.{key} to the EiBench JSONL files to evaluate"
            )
        return list(paths[data_key]), f"data.{data_key}"


def write_outputs(results: Results, run_dir: Path) -> None:
    """The raw model outputs beside the report: open-task generations, EmoBench replies with their parsed
    letters, and EQ-Bench replies (re-scorable)."""
    if results.eibench_open:
        with open(run_dir / "generations.jsonl", "w", encoding="utf-8") as f:
            for outcome in results.eibench_open:
                record = outcome.item.record
                line = {
                    "id": record.id,
                    "task": record.task,
                    "aspect": record.aspect,
                    "prediction": outcome.prediction,
                    "reference": record.output,
                }
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
    if results.emobench and results.emobench_protocol == "generate":
        with open(run_dir / "emobench_replies.jsonl", "w", encoding="utf-8") as f:
            for o in results.emobench:
                line = {
                    "id": o.item.id,
                    "task": o.item.task,
                    "lang": o.item.language,
                    "category": o.item.category,
                    "labels": [q.letter for q in o.item.questions],
                    "answers": o.answers,
                    "correct": o.correct,
                    "reply": o.reply,
                }
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
    if results.eqbench is not None:
        outcome = results.eqbench
        content = results_file(outcome.replies, outcome.result.mode, outcome.questions.version, outcome.attempts)
        replies = json.dumps(content, indent=2, ensure_ascii=False)
        (run_dir / "eqbench_replies.json").write_text(replies + "\n", encoding="utf-8")


def log_to_wandb(logger: WandbLogger, report: Report) -> None:
    """Every table of the report as a W&B table under ``eval/``, and the summary scores as scalars."""
    for name, table in {"summary": report.summary, **report.tables}.items():
        logger.log_table(key=f"eval/{name}", columns=table.columns, data=wandb_rows(table))
    logger.log_metrics({f"eval/{key}": value for key, value in report.metrics.items() if value is not None})


def wandb_rows(table: Table) -> list[list[Any]]:
    """Rows with every mixed-type column as text: a W&B table column holds one type."""
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in table.rows) for i in range(len(table.columns))
    ]
    return [[value if numeric[i] or value is None else str(value) for i, value in enumerate(row)] for row in table.rows]
