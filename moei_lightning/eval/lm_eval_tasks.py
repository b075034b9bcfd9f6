"""The ``lm_eval`` suite: lm-evaluation-harness tasks on the model under test, with lm-eval's own prompts,
metrics and aggregation.

``eval.suites: [lm_eval]`` with ``eval.lm_eval_tasks: [mmlu, arc_challenge]`` runs lm-eval's
``simple_evaluate`` on the checkpoint in memory through :class:`~moei_lightning.lm_eval_model.MoEILM`
(requests routed from their context, as the ``lm-eval`` command does), shared out over the ranks by the
model runner. ``eval.lm_eval_include_path`` adds a folder of task YAMLs (lm-eval's ``--include_path``),
``eval.lm_eval_num_fewshot`` is lm-eval's ``--num_fewshot``, ``eval.limit`` its ``--limit`` and
``eval.batch_size`` its ``--batch_size``. The report has one summary row per task and metric, in lm-eval's
own units (accuracies as fractions, BLEU 0-100, perplexities as they are: no unit is guessed), logged as
``test/lm_eval/<task>/<metric>`` (``/<filter>`` after it for a filter other than ``none``), and
``lm_eval_results.json`` holds lm-eval's own results, as its ``--output_path`` writes them.
lm-eval is an optional extra (``pip install 'moei_lightning[lm-eval]'``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moei_lightning.data import DataError
from moei_lightning.eval.report import STAGE, Report, Table, metric_key
from moei_lightning.eval.suite import Row, Settings, Source, Suite

if TYPE_CHECKING:
    from moei_lightning.eval.harness import Harness

INSTALL = "pip install 'moei_lightning[lm-eval]'"
RESULTS_FILE = "lm_eval_results.json"
TABLE_COLUMNS = ["task", "version", "filter", "n-shot", "metric", "value", "stderr", "n"]


@dataclass(frozen=True)
class Tasks:
    """The task names asked for, checked against lm-eval's index, and the index itself."""

    names: list[str]
    task_manager: Any


class LmEval(Suite):
    """lm-evaluation-harness tasks (``eval.lm_eval_tasks``) through the project's lm-eval model class."""

    name = "lm_eval"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.require("lm_eval_tasks")

    @classmethod
    def check(cls, settings: Settings) -> None:
        if settings.lm_eval_tasks and cls.name not in settings.suites:
            raise DataError(
                f"config key eval.lm_eval_tasks: set to {list(settings.lm_eval_tasks)}, but {cls.name} is not in "
                f"eval.suites, so no task would run; add {cls.name} to eval.suites"
            )
        path = settings.lm_eval_include_path
        if path is not None and not Path(path).is_dir():
            raise DataError(f"config key eval.lm_eval_include_path: {path} is not a folder of lm-eval task YAMLs")

    def load(self, source: Source, loaded: Mapping[str, Any]) -> Tasks:
        """lm-eval's task index (with ``eval.lm_eval_include_path``); a task it does not know, or whose data does not
        load, is an error now rather than after the suites before it (the data loads again, from its cache, to run)."""
        try:
            from lm_eval.tasks import TaskManager, get_task_dict
        except ImportError as err:
            raise DataError(f"config key eval.suites: {self.name} needs lm-evaluation-harness; {INSTALL}") from err
        manager = TaskManager(include_path=self.settings.lm_eval_include_path)
        names = list(self.settings.lm_eval_tasks)
        known = set(manager.match_tasks(names))
        missing = [name for name in names if name not in known]
        if missing:
            where = f" or in {self.settings.lm_eval_include_path}" if self.settings.lm_eval_include_path else ""
            raise DataError(
                f"config key eval.lm_eval_tasks: lm-eval has no task {missing} among its own{where}; "
                "`lm-eval ls tasks` lists them, and eval.lm_eval_include_path adds a folder of task YAMLs"
            )
        with _task_errors(names):
            get_task_dict(names, manager)
        return Tasks(names, manager)

    def count(self, items: Tasks) -> int:
        return len(items.names)

    def run(self, harness: Harness, items: Tasks, done: Mapping[str, Any]) -> dict[str, Any]:
        """lm-eval's ``simple_evaluate`` on the model in memory: its results dict, the same on every rank."""
        import lm_eval

        from moei_lightning.lm_eval_model import MoEILM

        with _task_errors(items.names):
            results = lm_eval.simple_evaluate(
                model=MoEILM(runner=harness.runner),
                tasks=items.names,
                num_fewshot=self.settings.lm_eval_num_fewshot,
                limit=self.settings.limit,
                task_manager=items.task_manager,
                log_samples=False,
            )
        return json.loads(json.dumps(results, default=_plain))

    def report(self, outcomes: dict[str, Any], rows: list[Row], report: Report) -> None:
        table = Table(
            "lm-evaluation-harness",
            TABLE_COLUMNS,
            note="lm-eval's own numbers for its tasks and groups, in its own units as its table prints them "
            f"(accuracies as fractions); its full results are in {RESULTS_FILE}.",
        )
        for task, metrics in outcomes["results"].items():
            n = outcomes.get("n-samples", {}).get(task, {}).get("effective")
            shots = outcomes.get("n-shot", {}).get(task)
            version = outcomes.get("versions", {}).get(task)
            for name, value in metrics.items():
                metric, _, filter_name = name.partition(",")
                if not filter_name or "_stderr" in metric or not isinstance(value, int | float):
                    continue
                stderr = metrics.get(f"{metric}_stderr,{filter_name}")
                parts = [metric] if filter_name == "none" else [metric, filter_name]
                note = f"lm-eval's {metric}" + ("" if shots is None else f", {shots}-shot") + ", in lm-eval's unit"
                report.add(
                    f"lm-eval/{task}", "/".join(parts), value, n, note, metric_key(STAGE, self.name, task, *parts)
                )
                stderr = stderr if isinstance(stderr, int | float) else None
                table.rows.append([task, version, filter_name, shots, metric, value, stderr, n])
        report.tables[self.name] = table
        if self.settings.limit is not None:
            report.notes.append(
                f"lm-eval: the first {self.settings.limit} documents of each task (eval.limit, lm-eval's --limit); "
                "its scores are not comparable with full runs"
            )

    def outputs(self, outcomes: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {RESULTS_FILE: outcomes}


@contextmanager
def _task_errors(names: list[str]) -> Iterator[None]:
    """A task's missing data, unreachable dataset or bad option as an error naming the config key."""
    try:
        yield
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        hint = (
            "; the Hugging Face hub is not reachable: download the dataset beforehand or point the task's "
            "dataset_path / dataset_kwargs at local files"
            if isinstance(err, ConnectionError)
            else ""
        )
        raise DataError(f"config key eval.lm_eval_tasks: lm-eval could not load {names}: {err}{hint}") from err


def _plain(value: object) -> object:
    """What JSON cannot hold as lm-eval writes it: sets as lists, anything else as its text."""
    return sorted(value, key=str) if isinstance(value, set) else str(value)
