"""Rescore the reference EQ-Bench harness's recorded runs with this project's scorer.

    python benchmarks/eqbench_rescore.py EQ-Bench/results --questions EQ-Bench/data/eq_bench_v2_questions_171.json

A harness results file stores, per iteration, the answers the harness parsed from each reply
(``raw_results -> iteration -> respondent_answers -> question id -> first_pass / revised``) next
to the ``benchmark_score`` it computed from them. This script scores those same answers with
:func:`moei_lightning.eval.eqbench.score_parsed` and prints, per run, the stored and recomputed
score and parseable count. It exits 1 when a score differs by more than ``--tolerance`` (0.01)
unless the run is named with ``--expect-mismatch``.

A directory stands for every ``*_eqbench_v*_results.json`` below it. Each run is scored against
the question file of its ``eqbench_version`` (v2 when the file does not say); ``--questions``
may be given once per version, and defaults to the v2 file in the shared data folder
(``$MOEI_SHARED_DATA``, else ``../shared/data``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from moei_lightning.eval.eqbench import (
    EqBenchRun,
    Mode,
    Question,
    Version,
    load_questions,
    questions_version,
    score_parsed,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MOEI_SHARED_DATA", REPO.parent / "shared" / "data"))
DEFAULT_QUESTIONS = SHARED_DATA / "eq-bench" / "eq_bench_v2_questions_171.json"
RESULTS_GLOB = "*_eqbench_v*_results.json"
RESULTS_SUFFIX = "_eqbench_v"
TOLERANCE = 0.01

Parsed = tuple[dict[str, int], dict[str, int]]


@dataclass(frozen=True)
class Rescored:
    """One recorded run: what the harness stored next to what this project computes."""

    name: str
    mode: Mode
    stored_score: float
    score: float
    stored_parseable: float | None
    parseable: float

    @property
    def difference(self) -> float:
        return round(self.score - self.stored_score, 2)


def run_name(path: Path) -> str:
    """The run's name in the table: the file name without the harness's ``_eqbench_vN_results.json``."""
    stem = path.name.removesuffix(".json")
    return stem[: stem.rindex(RESULTS_SUFFIX)] if RESULTS_SUFFIX in stem else stem


def result_files(paths: list[Path]) -> list[Path]:
    """The files given, and every harness results file below each directory given, in name order."""
    files: list[Path] = []
    for path in paths:
        files.extend(sorted(path.rglob(RESULTS_GLOB)) if path.is_dir() else [path])
    return files


def _intensities(answers: Mapping[str, object]) -> dict[str, int]:
    return {name: int(value) for name, value in answers.items()}


def stored_answers(iteration: Mapping[str, object]) -> dict[str, Parsed]:
    """One iteration's ``respondent_answers`` as (first pass, revised) intensities per question id."""
    answers = iteration.get("respondent_answers")
    if not isinstance(answers, dict):
        raise ValueError("an iteration without 'respondent_answers'")
    return {
        qid: (_intensities(a.get("first_pass") or {}), _intensities(a.get("revised") or {}))
        for qid, a in answers.items()
    }


def stored_mode(iterations: Mapping[str, Mapping[str, Parsed]]) -> Mode:
    """The mode a run was asked in: revise when most stored answers carry a revised pass (a no-revise
    reply laid out under both headings anyway gives one too, but rarely)."""
    answers = [a for iteration in iterations.values() for a in iteration.values()]
    revised = sum(bool(a[1]) for a in answers)
    return "revise" if answers and revised * 2 > len(answers) else "no_revise"


def rescore(path: Path, questions: Mapping[Version, Mapping[str, Question]]) -> Rescored:
    """Score one harness results file's stored answers with the project's scorer."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from error
    if not isinstance(data, dict) or not isinstance(data.get("raw_results"), dict) or "benchmark_score" not in data:
        raise ValueError(f"{path}: not an EQ-Bench harness results file (no 'raw_results' or 'benchmark_score')")
    version = data.get("eqbench_version") or "v2"
    if version not in questions:
        raise ValueError(f"{path}: an EQ-Bench {version} run, but no {version} question file was given")
    try:
        iterations = {it: stored_answers(run) for it, run in data["raw_results"].items()}
    except (AttributeError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: unreadable stored answers ({error})") from error
    mode = stored_mode(iterations)
    run = EqBenchRun({it: score_parsed(a, questions[version], mode, version) for it, a in iterations.items()})
    stored_parseable = data.get("n_questions_parseable")
    return Rescored(
        name=run_name(path),
        mode=mode,
        stored_score=float(data["benchmark_score"]),
        score=run.score,
        stored_parseable=None if stored_parseable is None else float(stored_parseable),
        parseable=run.parseable,
    )


def table(rows: list[Rescored]) -> str:
    """The runs as a markdown table."""
    lines = [
        "| run | mode | stored score | recomputed | difference | parseable stored | parseable recomputed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        stored_parseable = "-" if r.stored_parseable is None else f"{r.stored_parseable:g}"
        lines.append(
            f"| {r.name} | {r.mode} | {r.stored_score:.2f} | {r.score:.2f} | {r.difference:+.2f} "
            f"| {stored_parseable} | {r.parseable:g} |"
        )
    return "\n".join(lines)


def mismatches(rows: list[Rescored], expected: set[str], tolerance: float = TOLERANCE) -> list[str]:
    """Names of the runs whose score differs by more than ``tolerance`` and that are not expected to."""
    return [r.name for r in rows if abs(r.score - r.stored_score) > tolerance + 1e-9 and r.name not in expected]


def question_sets(paths: list[Path]) -> dict[Version, dict[str, Question]]:
    """The question files by the version each holds (60 questions: v1, else v2)."""
    sets: dict[Version, dict[str, Question]] = {}
    for path in paths:
        questions = load_questions(path)
        sets[questions_version(questions)] = questions
    return sets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="harness results files or directories holding them")
    parser.add_argument(
        "--questions",
        action="append",
        type=Path,
        help=f"an EQ-Bench question file, once per version (default: {DEFAULT_QUESTIONS})",
    )
    parser.add_argument(
        "--expect-mismatch",
        action="append",
        default=[],
        metavar="NAME",
        help="a run (as named in the table) whose stored score is known not to follow from its answers",
    )
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="largest score difference that passes")
    args = parser.parse_args(argv)

    missing = [str(path) for path in args.results if not path.exists()]
    if missing:
        parser.error(f"not found: {', '.join(missing)}")
    files = result_files(args.results)
    if not files:
        parser.error("no EQ-Bench results files found")
    try:
        questions = question_sets(args.questions or [DEFAULT_QUESTIONS])
        rows = [rescore(path, questions) for path in files]
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(table(rows))
    expected = set(args.expect_mismatch)
    unknown = expected - {r.name for r in rows}
    if unknown:
        print(f"note: --expect-mismatch names no run here: {sorted(unknown)}")
    failed = mismatches(rows, expected, args.tolerance)
    within = sum(abs(r.score - r.stored_score) <= args.tolerance + 1e-9 for r in rows)
    print(f"\n{within} of {len(rows)} runs within {args.tolerance} of the stored score")
    if failed:
        print(f"unexpected mismatches: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
