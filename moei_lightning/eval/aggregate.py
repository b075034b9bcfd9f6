"""From per-item outcomes to the report's tables: per task, per EI aspect and GI dimension, per benchmark.

How each number is made (docs/evaluation.md says the same for users):

- EiBench and GI: the rows of :func:`moei_lightning.eval.scorer.score_rows`, the same numbers the
  ``test`` run logs (acc_norm accuracy; BLEU-4, ROUGE-L, Distinct-1/2 in percent; a task scores its
  accuracy or ROUGE-L, an aspect or dimension the mean of its tasks, the averages the mean of those).
- MMLU: lm-eval's ``mmlu`` group score over the MMLU subjects asked (:mod:`moei_lightning.eval.mmlu`).
- EmoBench: accuracy per task, language and category and Overall per language, as its reference
  reports it (EU right only when emotion and cause both are); no pooled average.
- EQ-Bench: the benchmark's own 0-100 score, rounded to 2 decimals as the reference harness rounds it;
  unparseable replies are counted, never dropped; under 83.33 % parseable the run has failed (no score).
- EmotionPrompt: GI accuracy under each stimulus and its mean over stimuli, minus the plain accuracy
  (percentage points); the mean inter gate over the same prompts, plain and with stimuli.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from moei_lightning.eval import mmlu
from moei_lightning.eval.emobench import OVERALL, EmoBenchOutcome
from moei_lightning.eval.emobench import accuracy_rows as emobench_accuracy_rows
from moei_lightning.eval.harness import ChoiceOutcome, Results
from moei_lightning.eval.report import SUMMARY_COLUMNS, Report, Table
from moei_lightning.eval.scorer import ALL, Row, accuracy, score_rows
from moei_lightning.eval.text_metrics import BLEU_SETTINGS, ROUGE_SETTINGS

_SOURCES = {"eibench": "EiBench JSONL", "gi": "GI JSONL", "mmlu": "MMLU CSV", "emobench": "EmoBench"}
_NO_ADAPTERS = "no adapters to route to (model.adapter: full)"
_NO_INTER_GATE = "no inter gate (model.adapter: lora or molora.inter: none): adapters on every token, gate 1"


def build_report(
    names: list[str],
    results: Results,
    config: Mapping[str, object],
    stimuli: Mapping[str, str],
    limit: int | None = None,
) -> Report:
    """The report of the suites in ``names``, in that order; ``limit`` is the per-task cap of a quick run."""
    summary = Table(
        "Summary",
        SUMMARY_COLUMNS,
        note="Scores in percent (EQ-Bench: its 0-100 score; inter gate: 0-1). n counts items.",
    )
    report = Report(summary, config=dict(config))
    if limit is not None:
        report.notes.append(
            f"Quick run (eval.limit={limit}): at most {limit} items per task and language, and the first "
            f"{limit} EQ-Bench questions; these scores are not comparable with full runs."
        )
    rows = score_rows(results.eibench + results.gi, results.eibench_open)
    if "eibench" in names:
        _eibench(rows, report)
    if "gi" in names:
        _gi(results.gi, rows, report)
        _mmlu(results.gi, report)
    if "eqbench" in names and results.eqbench is not None:
        _eqbench(results, report)
    if "emobench" in names:
        _emobench(results.emobench, results.emobench_protocol, report)
    if "emotion_prompt" in names:
        _emotion_prompt(results.gi, results.emotion_prompt, stimuli, _gate_note(config), report)
    max_length = config.get("data", {}).get("max_length") if isinstance(config.get("data"), dict) else None
    for suite, cut in results.truncated.items():
        if cut:
            report.notes.append(
                f"{suite}: {cut} of {results.scored[suite]} scored sequences (prompt + choice) had their prompt "
                f"cut from the left to data.max_length={max_length} tokens."
            )
    return report


def mean(values: Iterable[float | None]) -> float | None:
    """Mean of the values, or None when there is none or any is missing."""
    values = list(values)
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


class _Rows:
    """The scorer's rows of one domain, looked up by (aspect, task, metric)."""

    def __init__(self, rows: list[Row], domain: str) -> None:
        self.rows = [r for r in rows if r["domain"] == domain]
        self._index = {(r["aspect"], r["task"], r["metric"]): r for r in self.rows}

    def value(self, aspect: str, task: str, metric: str) -> float | None:
        row = self._index.get((aspect, task, metric))
        return None if row is None else row["value"]

    def n(self, aspect: str, task: str, metric: str) -> int:
        row = self._index.get((aspect, task, metric))
        return 0 if row is None else row["n"]

    def aspects(self) -> list[str]:
        return list(dict.fromkeys(r["aspect"] for r in self.rows if r["aspect"] != ALL))

    def tasks(self, aspect: str) -> list[str]:
        return list(dict.fromkeys(r["task"] for r in self.rows if r["aspect"] == aspect and r["task"] != ALL))


_TEXT = ("bleu4", "rouge_l", "distinct1", "distinct2")


def _eibench(rows: list[Row], report: Report) -> None:
    ei = _Rows(rows, "ei")
    task_rows: list[list] = []
    for aspect in ei.aspects():
        for task in ei.tasks(aspect):
            if ei.value(aspect, task, "acc") is not None:
                acc, f1 = ei.value(aspect, task, "acc"), ei.value(aspect, task, "f1")
                task_rows.append([task, aspect, "choice", ei.n(aspect, task, "acc"), acc, f1, None, None, None, None])
            if ei.value(aspect, task, "bleu4") is not None:
                text = [ei.value(aspect, task, m) for m in _TEXT]
                task_rows.append([task, aspect, "open", ei.n(aspect, task, "bleu4"), None, None, *text])
    report.tables["eibench"] = Table(
        "EiBench (EI) tasks",
        ["task", "aspect", "type", "n", "accuracy", "macro-F1", "BLEU-4", "ROUGE-L", "Distinct-1", "Distinct-2"],
        task_rows,
        note=f"Choice tasks: acc_norm. Open tasks: greedy generation; BLEU-4: {BLEU_SETTINGS}; "
        f"ROUGE-L: {ROUGE_SETTINGS}; Distinct-1/2 over all predictions.",
    )
    aspect_rows = []
    for aspect in ei.aspects():
        kinds = [row[2] for row in task_rows if row[1] == aspect]
        score = ei.value(aspect, ALL, "score")
        text = [ei.value(aspect, ALL, m) for m in _TEXT]
        n_choice, n_open = ei.n(aspect, ALL, "acc"), ei.n(aspect, ALL, "bleu4")
        aspect_rows.append([aspect, len(kinds), n_choice, ei.value(aspect, ALL, "acc"), n_open, *text, score])
        note = ", ".join(
            f"{kinds.count(k)} {k} task{'s' * (kinds.count(k) != 1)} ({metric})"
            for k, metric in (("choice", "accuracy"), ("open", "ROUGE-L"))
            if k in kinds
        )
        report.summary.rows.append(["EI", aspect, score, n_choice + n_open, f"mean of {note}"])
    n_aspects = len(ei.aspects())
    report.summary.rows.append(
        ["EI", "average", ei.value(ALL, ALL, "avg"), ei.n(ALL, ALL, "avg"), f"mean of {n_aspects} aspects"]
    )
    report.tables["eibench_aspects"] = Table(
        "EiBench (EI) aspects",
        ["aspect", "tasks", "n choice", "accuracy", "n open", "BLEU-4", "ROUGE-L", "Distinct-1", "Distinct-2", "score"],
        aspect_rows,
        note="accuracy and text metrics pooled over the aspect's items; score is the mean of its tasks' scores.",
    )


def _gi(outcomes: list[ChoiceOutcome], rows: list[Row], report: Report) -> None:
    gi = _Rows(rows, "gi")
    sources = {(o.item.group, o.item.task): o.item.source for o in outcomes}
    table = [
        [
            task,
            dimension,
            _SOURCES[sources[(dimension, task)]],
            gi.n(dimension, task, "acc"),
            gi.value(dimension, task, "acc"),
        ]
        for dimension in gi.aspects()
        for task in gi.tasks(dimension)
    ]
    note = "acc_norm; MMLU subjects: lm-eval's acc, the same answer with one-letter choices."
    report.tables["gi"] = Table("GI tasks", ["task", "dimension", "source", "n", "accuracy"], table, note=note)
    for dimension in gi.aspects():
        count = len(gi.tasks(dimension))
        tasks = f"{count} task{'s' * (count != 1)}"
        score, n = gi.value(dimension, ALL, "score"), gi.n(dimension, ALL, "score")
        report.summary.rows.append(["GI", dimension, score, n, f"mean of {tasks} (accuracy)"])
    n_dimensions = len(gi.aspects())
    report.summary.rows.append(
        ["GI", "average", gi.value(ALL, ALL, "avg"), len(outcomes), f"mean of {n_dimensions} dimensions"]
    )


def _mmlu(outcomes: list[ChoiceOutcome], report: Report) -> None:
    """lm-eval's ``mmlu`` group score over the MMLU subjects asked (none asked: no row)."""
    subjects = mmlu.subject_accuracies(outcomes)
    if subjects:
        n, count = sum(n for _, n in subjects.values()), len(subjects)
        note = f"lm-eval's mmlu group: acc of {count} subject{'s' * (count != 1)}, mean weighted by size"
        report.summary.rows.append(["GI", "MMLU", 100 * mmlu.group_accuracy(subjects), n, note])


def _eqbench(results: Results, report: Report) -> None:
    outcome = results.eqbench
    result, asked, available = outcome.result, outcome.result.n_questions, outcome.questions.available
    name = f"EQ-Bench {result.version}"
    coverage = f"first {asked} of {available} questions (eval.limit)" if asked < available else f"all {asked} questions"
    mode = result.mode.replace("_", "-")
    parse_note = f"{result.parseable} of {asked} parseable ({result.chosen_pass.replace('_', ' ')}, {mode} mode)"
    failed = " FAILED: under 83.33% parseable, the reference harness records no score" if result.failed else ""
    report.summary.rows.append(
        [name, "score", None if result.failed else result.benchmark_score, asked, f"{parse_note}; {coverage}{failed}"]
    )
    report.summary.rows.append([name, "parseable", result.parseable, asked, parse_note])
    unparseable = list(result.unparseable_ids)
    shown = ", ".join(unparseable[:30]) + (f", ... ({len(unparseable)} in all)" if len(unparseable) > 30 else "")
    retried = sum(n > 1 for n in outcome.attempts.values())
    report.tables["eqbench"] = Table(
        name,
        ["measure", "value"],
        [
            ["score", result.benchmark_score],
            ["failed (under 83.33% parseable)", "yes" if result.failed else "no"],
            ["mode", mode],
            ["first pass score", round(result.first_pass_score, 2)],
            ["revised score", round(result.revised_score, 2)],
            ["chosen pass", result.chosen_pass],
            ["parseable (chosen pass)", f"{result.parseable} of {asked}"],
            ["parseable (first pass)", f"{result.first_pass_parseable} of {asked}"],
            ["parseable (revised)", f"{result.revised_parseable} of {asked}"],
            ["questions asked again (up to 3 attempts)", retried],
            ["questions asked", f"{coverage} in {outcome.questions.path}"],
            ["unparseable question ids", shown or "none"],
        ],
        note="Replies sampled at temperature 0.01 through the chat template (unparseable ones asked again, "
        "0.15 hotter, up to 3 attempts), scored as the reference harness does (docs/evaluation.md).",
    )
    if result.parseable < asked:
        report.notes.append(
            f"{name}: {asked - result.parseable} of {asked} replies could not be parsed and score nothing"
            + (" (with none parseable the benchmark score is 0)" if result.parseable == 0 else "")
            + "; the replies are in eqbench_replies.json, and "
            "`python -m moei_lightning.eval.eqbench eqbench_replies.json --questions ...` rescores them."
        )


def _emobench(outcomes: list[EmoBenchOutcome], protocol: str, report: Report) -> None:
    rows = emobench_accuracy_rows(outcomes)
    how = (
        "letter answers parsed from greedy replies to the reference prompts (unparseable = wrong)"
        if protocol == "generate"
        else "each question by log-likelihood (acc_norm), not the published protocol"
    )
    report.tables["emobench"] = Table(
        "EmoBench",
        ["task", "language", "category", "n", "accuracy"],
        [list(row) for row in rows],
        note=f"As the reference reports it: per language, per category and Overall; EU is right only when "
        f"emotion and cause both are. Protocol {protocol}: {how}.",
    )
    for task, language, category, n, acc in rows:
        if category == OVERALL:
            report.summary.rows.append(["EmoBench", f"{task} {language}", acc, n, f"Overall, {protocol}"])


def _emotion_prompt(
    plain: list[ChoiceOutcome],
    variants: list[ChoiceOutcome],
    stimuli: Mapping[str, str],
    gate_note: str,
    report: Report,
) -> None:
    by_stimulus: dict[str, list[ChoiceOutcome]] = defaultdict(list)
    for outcome in variants:
        by_stimulus[outcome.item.variant].append(outcome)
    plain_accuracy, plain_gate = accuracy(plain), mean(o.gate for o in plain)
    rows = [["none", "(plain prompts)", len(plain), plain_accuracy, None, plain_gate, None]]
    accuracies, gates = [], []
    for stimulus_id, text in stimuli.items():
        group = by_stimulus[stimulus_id]
        acc, gate = accuracy(group), mean(o.gate for o in group)
        accuracies.append(acc)
        gates.append(gate)
        rows.append([stimulus_id, text, len(group), acc, acc - plain_accuracy, gate, _difference(gate, plain_gate)])
    report.tables["emotion_prompt"] = Table(
        "EmotionPrompt probe (GI with emotional stimuli)",
        ["stimulus", "text", "n", "GI accuracy", "change", "inter gate", "gate change"],
        rows,
        note="Each stimulus appended to the instruction of every GI item; change is against the plain prompts. "
        "Inter gate: mean over the prompt's real tokens and the adapted layers (0 backbone, 1 adapters).",
    )
    n, k = len(plain), len(stimuli)
    stimulus_accuracy, stimulus_gate = mean(accuracies), mean(gates)
    gate_note = gate_note if plain_gate is not None else _NO_ADAPTERS
    report.summary.rows += [
        ["EmotionPrompt", "GI accuracy (plain)", plain_accuracy, n, "all GI items"],
        ["EmotionPrompt", "GI accuracy (stimuli)", stimulus_accuracy, n * k, f"mean over {k} stimuli"],
        ["EmotionPrompt", "GI accuracy change", stimulus_accuracy - plain_accuracy, n * k, "percentage points"],
        ["EmotionPrompt", "inter gate (plain)", plain_gate, n, gate_note],
        ["EmotionPrompt", "inter gate (stimuli)", stimulus_gate, n * k, gate_note or f"mean over {k} stimuli"],
        ["EmotionPrompt", "inter gate change", _difference(stimulus_gate, plain_gate), n * k, gate_note],
    ]


def _gate_note(config: Mapping[str, object]) -> str:
    """Why the inter gate reads 1 everywhere, when the run's adapters have none."""
    molora = config.get("molora")
    inter = molora.get("inter") if isinstance(molora, dict) else None
    return _NO_INTER_GATE if config.get("adapter") == "lora" or inter == "none" else ""


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b
