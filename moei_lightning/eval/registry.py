"""The suites there are, and what the ``test`` evaluation does with all of them: load, report, write.

A new suite is one module with a :class:`~moei_lightning.eval.suite.Suite` subclass and one entry in
:data:`SUITES`, with its import (docs/evaluation.md shows one). The order of :data:`SUITES` is the order suites run in
and appear in the report.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moei_lightning.data import DataError
from moei_lightning.eval.eibench import EiBench
from moei_lightning.eval.emobench import EmoBench
from moei_lightning.eval.emotion_prompt import EmotionPrompt
from moei_lightning.eval.eqbench import EqBench
from moei_lightning.eval.gi import Gi
from moei_lightning.eval.harness import Results
from moei_lightning.eval.lm_eval_tasks import LmEval
from moei_lightning.eval.report import SUMMARY_COLUMNS, Report, Table
from moei_lightning.eval.suite import Row, Settings, Source, Suite

SUITES: dict[str, type[Suite]] = {
    EiBench.name: EiBench,
    Gi.name: Gi,
    EqBench.name: EqBench,
    EmoBench.name: EmoBench,
    EmotionPrompt.name: EmotionPrompt,
    LmEval.name: LmEval,
}


def check_suites(names: Sequence[str]) -> list[str]:
    """The suite names in their canonical order; unknown or repeated names, or a suite without the suites it
    requires, are an error."""
    unknown = [name for name in names if name not in SUITES]
    if unknown:
        raise DataError(f"config key eval.suites: unknown suite(s) {unknown}; choose from {list(SUITES)}")
    if len(set(names)) != len(names):
        raise DataError(f"config key eval.suites: a suite is listed twice in {list(names)}")
    for name in names:
        missing = [required for required in SUITES[name].requires if required not in names]
        if missing:
            raise DataError(
                f"config key eval.suites: {name} reads the items and outcomes of {missing}; list them as well"
            )
    return [name for name in SUITES if name in names]


def make_suites(settings: Settings) -> list[Suite]:
    """The listed suites, in their canonical order, after every registered suite has checked its keys."""
    names = check_suites(settings.suites)
    for suite in SUITES.values():
        suite.check(settings)
    return [SUITES[name](settings) for name in names]


def load_inputs(suites: Sequence[Suite], source: Source) -> dict[str, Any]:
    """Every suite's items by name, read and checked now, before any model call."""
    loaded: dict[str, Any] = {}
    for suite in suites:
        loaded[suite.name] = suite.load(source, loaded)
    return loaded


def suite_rows(suites: Sequence[Suite], results: Results) -> dict[str, list[Row]]:
    """Every suite's EI/GI metric rows, computed once for the logs and the report."""
    return {suite.name: suite.rows(results.outcomes[suite.name]) for suite in suites}


def build_report(
    suites: Sequence[Suite],
    results: Results,
    rows: Mapping[str, list[Row]],
    config: Mapping[str, object],
    limit: int | None = None,
) -> Report:
    """The report of ``suites``, in order; ``limit`` is the per-task cap of a quick run."""
    summary = Table(
        "Summary",
        SUMMARY_COLUMNS,
        note="Scores in percent (EQ-Bench: its 0-100 score; inter gate: 0-1). n counts items; key: the name "
        "the score is logged under.",
    )
    report = Report(summary, config=dict(config))
    if limit is not None:
        report.notes.append(
            f"Quick run (eval.limit={limit}): at most {limit} items per task and language, and the first "
            f"{limit} EQ-Bench questions; these scores are not comparable with full runs."
        )
    for suite in suites:
        suite.report(results.outcomes[suite.name], rows[suite.name], report)
    data = config.get("data")
    max_length = data.get("max_length") if isinstance(data, dict) else None
    for suite, cut in results.truncated.items():
        if cut:
            report.notes.append(
                f"{suite}: {cut} of {results.scored[suite]} scored sequences (prompt + choice) had their prompt "
                f"cut from the left to data.max_length={max_length} tokens."
            )
    return report


def write_outputs(suites: Sequence[Suite], results: Results, run_dir: Path) -> list[Path]:
    """Every suite's raw outputs beside the report (:meth:`Suite.outputs`); suites naming the same JSONL file
    share it, in suite order. Returns the files written."""
    files: dict[str, list[dict[str, Any]] | dict[str, Any]] = {}
    for suite in suites:
        for name, content in suite.outputs(results.outcomes[suite.name]).items():
            if isinstance(content, list):
                lines = files.setdefault(name, [])
                if not isinstance(lines, list):
                    raise ValueError(f"{suite.name}: {name} is a JSON object of another suite, not a JSONL file")
                lines += content
            elif name in files:
                raise ValueError(f"{suite.name}: {name} is written by another suite already")
            else:
                files[name] = content
    written = []
    for name, content in files.items():
        if not content:
            continue
        path = run_dir / name
        if isinstance(content, list):
            path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in content), encoding="utf-8")
        else:
            path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(path)
    return written
