"""What the analysis notebooks read, and how: run paths as the user typed them, run results with n and 95% intervals.

Jupyter starts a kernel in the notebook's folder, but a user who types
``MOEI_NOTEBOOK_RUN=runs/<id> jupyter lab notebooks/router_analysis.ipynb`` means ``runs/<id>`` from
where they launched it. Relative paths are therefore tried from the launch directory (``PWD``, which
the kernel inherits from the shell), then from the kernel's working directory, then from the
repository root when the kernel runs in ``notebooks/``. Nothing here writes anything.

:func:`run_results` reads what a run reports about EI and GI: ``report.json`` (``test`` with the
paper evaluation, ``eval:`` section) and ``summary.json`` (the ``summary`` callback at the end of
``fit``), as rows with a score in percent, the number of items ``n`` and, for accuracies, a Wilson
95% interval.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from moei_lightning.callbacks.stats_files import STATS_DIR

REPORT_FILE = "report.json"
SUMMARY_FILE = "summary.json"
RESULT_FILES = (REPORT_FILE, SUMMARY_FILE)
Z_95 = 1.959964
_ACCURACY = re.compile(r"\bacc(uracy|_norm)?\b")  # a summary row whose measure or note names an accuracy


def base_dirs() -> list[Path]:
    """Where a relative path may be meant from: the launch directory, the working directory, the repository root."""
    dirs = [Path(os.environ["PWD"])] if os.environ.get("PWD") else []
    cwd = Path.cwd()
    dirs.append(cwd)
    if cwd.name == "notebooks":
        dirs.append(cwd.parent)
    return list(dict.fromkeys(d.resolve() for d in dirs))


def resolve(text: str, what: str) -> Path:
    """The existing path ``text`` names, absolute or relative to one of :func:`base_dirs`; else an error."""
    path = Path(text).expanduser()
    tried = [path] if path.is_absolute() else [base / path for base in base_dirs()]
    for candidate in tried:
        if candidate.exists():
            return candidate.resolve()
    raise FileNotFoundError(f"{what}={text!r}: no such directory; tried {', '.join(str(t) for t in tried)}")


def output_dir(text: str) -> Path:
    """Where to write what ``text`` names: absolute, or relative to the launch directory (not created here)."""
    path = Path(text).expanduser()
    return path if path.is_absolute() else base_dirs()[0] / path


def runs_root() -> Path | None:
    """The first ``runs/`` folder found from :func:`base_dirs`, or None."""
    return next((base / "runs" for base in base_dirs() if (base / "runs").is_dir()), None)


def runs_from_env(variable: str) -> list[Path] | None:
    """The run directories in ``$variable`` (separated by ``os.pathsep``), resolved; None when it is unset."""
    given = os.environ.get(variable)
    if not given:
        return None
    return [resolve(part, variable) for part in given.split(os.pathsep) if part]


def stats_rows(run: Path, file_name: str, writer: str) -> list[dict[str, Any]]:
    """The rows of ``<run>/stats/<file_name>``; when there are none, an error that says what the run holds and why."""
    path = run / STATS_DIR / file_name
    if path.is_file():
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if rows:
            return rows
    held = sorted(p.name + ("/" if p.is_dir() else "") for p in run.iterdir()) if run.is_dir() else []
    state = "is empty" if path.is_file() else "does not exist"
    raise FileNotFoundError(
        f"{path} {state}, so this run has no statistics to show (the run holds: {', '.join(held) or 'nothing'}). "
        f"The {writer} callback writes it during fit, validate and test; it is off when its `stages` are [], "
        "and a run stopped before its first log has none yet. Point the notebook at another run."
    )


def wilson(percent: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy (percent) over ``n`` items, in percent."""
    p = percent / 100.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def result_sources(run: Path) -> list[str]:
    """The result files ``run`` holds, of :data:`RESULT_FILES`."""
    return [name for name in RESULT_FILES if (run / name).is_file()]


def run_results(run: Path, source: str | None = None, split: str | None = None) -> list[dict[str, Any]]:
    """A run's EI/GI numbers as rows: suite, measure, score (percent), n, ci_low, ci_high, source.

    ``source`` picks ``report.json`` or ``summary.json``; default: the report when the run has one.
    ``split`` picks the summary's split (default: its first). Intervals are given for accuracies only.
    """
    available = result_sources(run)
    if not available:
        raise FileNotFoundError(
            f"{run} has neither {REPORT_FILE} (written by `test` with an `eval:` section, e.g. "
            f"--config conf/eval/paper.yaml) nor {SUMMARY_FILE} (written at the end of `fit` by the "
            "`summary` callback); nothing to compare"
        )
    chosen = source or available[0]
    if chosen not in available:
        raise FileNotFoundError(f"{run / chosen} does not exist; this run has {available}")
    data = json.loads((run / chosen).read_text(encoding="utf-8"))
    rows = _report_rows(data) if chosen == REPORT_FILE else _summary_rows(data, split, run)
    for row in rows:
        accuracy = row.pop("accuracy") and row["score"] is not None and row["n"]
        row["ci_low"], row["ci_high"] = wilson(row["score"], row["n"]) if accuracy else (None, None)
        row["source"] = chosen if chosen == REPORT_FILE else f"{chosen} ({row.pop('split')})"
    return rows


def _report_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    columns = data["summary"]["columns"]
    rows = []
    for values in data["summary"]["rows"]:
        row = dict(zip(columns, values))
        suite, measure, note = str(row["suite"]), str(row["measure"]), str(row.get("note") or "")
        text = f"{measure} {note}".lower()
        accuracy = (suite in ("GI", "EmoBench") or _ACCURACY.search(text) is not None) and not any(
            word in text for word in ("rouge", "change", "gate", "parseable")
        )
        rows.append({"suite": suite, "measure": measure, "score": row["score"], "n": row["n"], "accuracy": accuracy})
    return rows


def _summary_rows(data: dict[str, Any], split: str | None, run: Path) -> list[dict[str, Any]]:
    splits = data["splits"]
    split = split or next(iter(splits))
    if split not in splits:
        raise KeyError(f"{run / SUMMARY_FILE} has no {split!r} split; it has {list(splits)}")
    after, primary = splits[split]["after"], data["primary_metric"]
    rows = []
    for domain in ("ei", "gi"):
        counts, n_all = after.get(f"counts_{domain}", {}), after[f"n_{domain}"]
        measures = [(group, score) for group, score in after[domain][primary[domain]].items() if group != "avg"]
        measures.append(("average", after[domain][primary[domain]]["avg"]))  # as the report's summary lists them
        measures += [(metric, values["avg"]) for metric, values in after[domain].items()]
        for measure, score in measures:
            n = counts.get(measure, n_all)
            rows.append(
                {"suite": domain.upper(), "measure": measure, "score": score, "n": n, "accuracy": True, "split": split}
            )
    return rows
