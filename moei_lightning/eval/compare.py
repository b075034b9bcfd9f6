"""Put several evaluation reports side by side, like the paper's main table.

    python -m moei_lightning.eval.compare runs/base/report.json runs/moei/report.json --names Base MoEI

Each argument is a ``report.json`` or a run directory holding one. Rows are the summary measures
(EI per aspect, GI per dimension, EQ-Bench, EmoBench, the probe and the averages) in the order the
reports list them; a measure a report lacks shows as ``-``. The markdown table is printed, and also
written to ``--output`` when given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moei_lightning.eval.report import Report, load_report, markdown_table


def report_path(argument: str) -> Path:
    """The report.json an argument names: the file itself, or the one inside a run directory."""
    path = Path(argument)
    return path / "report.json" if path.is_dir() else path


def default_names(paths: list[Path]) -> list[str]:
    """Each report's run directory name; the full path where two runs share a name."""
    names = [path.parent.name or str(path) for path in paths]
    return [str(path) if names.count(name) > 1 else name for name, path in zip(names, paths)]


def compare(reports: list[Report], names: list[str]) -> str:
    """One markdown table: a row per summary measure, a column per report."""
    keys: list[tuple[str, str]] = []
    for report in reports:
        keys += [(row[0], row[1]) for row in report.summary.rows if (row[0], row[1]) not in keys]
    scores = [report.scores for report in reports]
    rows = [[suite, measure, *[s.get(f"{suite}/{measure}", "-") for s in scores]] for suite, measure in keys]
    return markdown_table(["suite", "measure", *names], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m moei_lightning.eval.compare",
        description="Print the summary scores of several evaluation reports side by side as a markdown table.",
    )
    parser.add_argument("reports", nargs="+", help="report.json files, or run directories that hold one")
    parser.add_argument("--names", nargs="+", help="a column name per report (default: the run directory names)")
    parser.add_argument("--output", help="also write the table to this file")
    args = parser.parse_args(argv)
    paths = [report_path(argument) for argument in args.reports]
    if args.names is not None and len(args.names) != len(paths):
        parser.error(f"--names gives {len(args.names)} names for {len(paths)} reports; give one per report")
    try:
        reports = [load_report(path) for path in paths]
    except FileNotFoundError as err:
        parser.exit(2, f"{parser.prog}: error: {err.filename}: no such report; run `test` with an eval config first\n")
    except ValueError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    table = compare(reports, args.names or default_names(paths))
    sys.stdout.write(table + "\n")
    if args.output:
        Path(args.output).write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
