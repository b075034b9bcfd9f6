"""What every evaluation suite is and shares: the :class:`Suite` steps, items, outcomes and settings.

A suite is one module with one :class:`Suite` subclass, listed in :data:`moei_lightning.eval.registry.SUITES`.
The ``test`` evaluation drives every listed suite through the same steps:

1. :meth:`Suite.check` (every registered suite, listed or not) and the constructor (listed ones) turn
   wrong config keys into errors before anything is read;
2. :meth:`Suite.load` reads and checks the suite's input files when ``test`` starts;
3. :meth:`Suite.run` builds the suite's requests and asks them through the
   :class:`~moei_lightning.eval.harness.Harness` (log-likelihoods, generations, gate readings);
4. :meth:`Suite.rows` gives the EI/GI metric rows that ``test`` logs (:mod:`moei_lightning.eval.scorer`);
5. :meth:`Suite.report` adds the suite's summary rows, tables and notes to the report, and
   :meth:`Suite.outputs` the raw outputs written beside it.

Every multiple-choice or open item of the EiBench-style suites is an :class:`Item` whose ``record`` is an
EiBench record, so the model sees it formatted exactly like its training data. Every problem with an
input file is a :class:`~moei_lightning.data.DataError` that names the file (and line, where there is
one) and the config key that pointed at it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from moei_lightning.data import ASPECTS, DataError, EiRecord, load_records
from moei_lightning.eval.choices import ChoiceScores

if TYPE_CHECKING:
    from moei_lightning.eval.harness import Harness
    from moei_lightning.eval.report import Report

Row = dict[str, Any]
CHOICE_METRICS: tuple[str, ...] = ("acc", "acc_norm")
"""lm-evaluation-harness's multiple-choice accuracies, both reported for every choice item: ``acc`` takes the
choice with the highest summed log-likelihood, ``acc_norm`` the highest log-likelihood per character."""
PRIMARY_METRIC: dict[str, str] = {"eibench": "acc_norm", "gi": "acc_norm", "mmlu": "acc", "emobench": "acc_norm"}
"""The accuracy a choice task of each item source scores with (its ``score``). lm-evaluation-harness reports
both for tasks whose continuation is the option text (arc, hellaswag), and the leaderboards built on it read
those by ``acc_norm``; its MMLU groups (``mmlu``, ``mmlu_continuation``, whose continuation is the option
text as here) aggregate ``acc``."""
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")


def primary_metric(source: str) -> str:
    """:data:`PRIMARY_METRIC` of an item source; a source without an entry is an error."""
    if source not in PRIMARY_METRIC:
        raise ValueError(f"no primary choice metric for item source {source!r}; add it to PRIMARY_METRIC")
    return PRIMARY_METRIC[source]


@dataclass(frozen=True)
class Settings:
    """Everything the ``eval:`` section sets; the defaults are :class:`~moei_lightning.callbacks.PaperEvaluation`'s
    (docs/evaluation.md lists the keys). Each suite reads its own keys."""

    suites: Sequence[str]
    batch_size: int
    max_new_tokens: int
    eibench: str | Sequence[str] | None
    gi: str | Sequence[str] | None
    gi_mmlu_csv: Mapping[str, str | Sequence[str]] | None
    mmlu_num_fewshot: int
    eqbench_questions: str | None
    eqbench_mode: str
    eqbench_max_new_tokens: int | None
    eqbench_system_message: str
    eqbench_sampling: str
    emobench_dir: str | None
    emobench_languages: Sequence[str]
    emobench_protocol: str
    emobench_max_new_tokens: int
    emotion_prompt_stimuli: Mapping[str, str] | None
    lm_eval_tasks: str | Sequence[str]
    lm_eval_include_path: str | None
    lm_eval_num_fewshot: int | None
    limit: int | None

    def __post_init__(self) -> None:
        """Lists where the config may give one path, plain containers, and every count positive."""
        for key in ("eibench", "gi"):
            value = getattr(self, key)
            object.__setattr__(self, key, [value] if isinstance(value, str) else None if value is None else list(value))
        mmlu = {k: [v] if isinstance(v, str) else list(v) for k, v in (self.gi_mmlu_csv or {}).items()}
        object.__setattr__(self, "gi_mmlu_csv", mmlu)
        object.__setattr__(self, "suites", list(self.suites))
        object.__setattr__(self, "emobench_languages", list(self.emobench_languages))
        object.__setattr__(self, "emotion_prompt_stimuli", dict(self.emotion_prompt_stimuli or {}))
        tasks = self.lm_eval_tasks.split(",") if isinstance(self.lm_eval_tasks, str) else self.lm_eval_tasks
        object.__setattr__(self, "lm_eval_tasks", [task.strip() for task in tasks if task.strip()])
        for key in ("batch_size", "max_new_tokens", "eqbench_max_new_tokens", "emobench_max_new_tokens", "limit"):
            value = getattr(self, key)
            optional = key in ("eqbench_max_new_tokens", "limit")
            if not (value is None and optional) and not (isinstance(value, int) and value >= 1):
                raise DataError(f"config key eval.{key}: expected a positive integer, got {value!r}")
        for key in ("mmlu_num_fewshot", "lm_eval_num_fewshot"):
            value = getattr(self, key)
            if not (value is None and key == "lm_eval_num_fewshot") and not (isinstance(value, int) and value >= 0):
                raise DataError(f"config key eval.{key}: expected 0 or more examples, got {value!r}")


@dataclass(frozen=True)
class Source:
    """Where the suites' default inputs live: the DataModule's split files by ``data`` key (``ei_test``)."""

    data_paths: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def paths(self, given: str | Sequence[str] | None, key: str, data_key: str) -> tuple[list[str], str]:
        """``given`` (config key ``eval.<key>``), else the DataModule's ``data.<data_key>`` files; with the key read."""
        if given is not None:
            return ([given] if isinstance(given, str) else list(given)), f"eval.{key}"
        if data_key not in self.data_paths:
            raise DataError(
                f"config key eval.{key}: not set, and the DataModule has no data.{data_key} to fall back on; "
                f"set eval.{key} to the EiBench JSONL files to evaluate"
            )
        return list(self.data_paths[data_key]), f"data.{data_key}"


@dataclass(frozen=True)
class Item:
    """One question for the model.

    ``source`` is where it came from (``eibench``, ``gi``, ``mmlu`` or ``emobench``); ``group`` is
    the EI aspect, the GI dimension or the EmoBench category; ``answer`` indexes ``record.choices``
    and is None for open (generation) items; ``variant`` names the emotional stimulus appended to
    the prompt, empty for the plain item.
    """

    source: str
    task: str
    group: str
    language: str
    record: EiRecord
    answer: int | None
    variant: str = ""


@dataclass(frozen=True)
class ChoiceItem:
    """A benchmark's multiple-choice question; ``answer_index`` points at the correct one in ``choices``.

    ``prompt_instruction`` says what to do, ``prompt_input`` holds the material and the question; the
    choices are kept apart so they can be lettered or each scored by likelihood. Loaders (MMLU CSV,
    EmoBench) make these; :func:`from_choice_item` turns one into an :class:`Item`.
    """

    id: str
    suite: str
    task: str
    category: str
    language: str
    prompt_instruction: str
    prompt_input: str
    choices: list[str]
    answer_index: int

    def __post_init__(self) -> None:
        if not 0 <= self.answer_index < len(self.choices):
            raise ValueError(
                f"item {self.id}: answer_index {self.answer_index} is outside its "
                f"{len(self.choices)} choices; fix the loader or the source row"
            )


@dataclass
class ChoiceOutcome:
    """A multiple-choice item with its scores; ``gate`` is the mean inter gate on its prompt, if measured."""

    item: Item
    scores: ChoiceScores
    gate: float | None = None

    def predicted(self, metric: str) -> int:
        """The choice ``metric`` (one of :data:`CHOICE_METRICS`) picks."""
        if metric not in CHOICE_METRICS:
            raise ValueError(f"unknown choice metric {metric!r}; use one of {list(CHOICE_METRICS)}")
        return self.scores.predicted if metric == "acc_norm" else self.scores.predicted_unnormalised

    def correct(self, metric: str) -> bool:
        return self.predicted(metric) == self.item.answer

    def line(self, suite: str) -> dict[str, Any]:
        """The outcome as a line of ``choices.jsonl``: every choice's summed log-likelihood and both verdicts."""
        return {
            "suite": suite,
            "source": self.item.source,
            "id": self.item.record.id,
            "task": self.item.task,
            "group": self.item.group,
            "variant": self.item.variant,
            "answer": self.item.answer,
            "loglikelihoods": self.scores.logprobs,
            "tokens": self.scores.tokens,
            "chars": self.scores.chars,
            **{metric: int(self.correct(metric)) for metric in CHOICE_METRICS},
        }


@dataclass
class OpenOutcome:
    """An open item with the model's greedy continuation."""

    item: Item
    prediction: str


class Suite:
    """One benchmark of the ``test`` evaluation; subclass it, set :attr:`name`, and list the class in
    :data:`moei_lightning.eval.registry.SUITES`.

    The constructor receives the ``eval:`` settings and raises a :class:`~moei_lightning.data.DataError`
    naming the config key when the suite cannot run with them. Items and outcomes are whatever the
    suite needs; only the suite reads them.
    """

    name: ClassVar[str]
    """The suite's name in ``eval.suites`` and in the report's files."""
    requires: ClassVar[tuple[str, ...]] = ()
    """Suites that must run before this one (their items reach :meth:`load`, their outcomes :meth:`run`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @classmethod
    def check(cls, settings: Settings) -> None:
        """Errors in this suite's own config keys, raised whether or not the suite is listed."""

    def require(self, key: str) -> None:
        """A setting the listed suite cannot run without."""
        if not getattr(self.settings, key):
            raise DataError(f"config key eval.{key}: the {self.name} suite is in eval.suites but {key} is not set")

    def load(self, source: Source, loaded: Mapping[str, Any]) -> Any:
        """The suite's items, read and checked before any model call; ``loaded`` holds earlier suites' items."""
        raise NotImplementedError

    def count(self, items: Any) -> int:
        """How many items the progress display announces."""
        return len(items)

    def run(self, harness: Harness, items: Any, done: Mapping[str, Any]) -> Any:
        """Ask the items through ``harness``; ``done`` holds earlier suites' outcomes. Returns the outcomes."""
        raise NotImplementedError

    def rows(self, outcomes: Any) -> list[Row]:
        """The EI/GI scorer rows ``test`` logs (``test/<domain>/...``); none by default."""
        return []

    def report(self, outcomes: Any, rows: list[Row], report: Report) -> None:
        """Add the suite's summary rows (:meth:`Report.add`), tables and notes; ``rows`` are :meth:`rows`'."""
        raise NotImplementedError

    def outputs(self, outcomes: Any) -> dict[str, list[dict[str, Any]] | dict[str, Any]]:
        """Raw outputs to write beside the report, by file name: a list of lines (JSONL) or one JSON object.
        Suites that name the same JSONL file share it, in suite order; a file with no lines is not written."""
        return {}


def record_language(record: EiRecord) -> str:
    """The record's ``language`` when it has one, else ``zh`` when its target (or, without one, its prompt)
    has more Chinese characters than Latin letters, else ``en``: open answers are scored by the
    language's tokens, and Chinese scored with English tokens gets BLEU and ROUGE of 0."""
    if record.language:
        return record.language
    text = record.output
    if not (_HAN.search(text) or _LATIN.search(text)):
        text = f"{record.instruction}{record.input}"
    return "zh" if len(_HAN.findall(text)) > len(_LATIN.findall(text)) else "en"


def domain_records(paths: Sequence[str], key: str, domain: str) -> list[EiRecord]:
    """The records of ``paths`` (config key ``key``), every one of ``domain``; a record of the other is an error."""
    records = load_records(paths)
    for record in records:
        if record.domain != domain or record.aspect not in ASPECTS[domain]:
            raise DataError(
                f"{record.source}: field 'domain': a {record.domain!r} record ({record.aspect}) among the "
                f"{domain} records of {key}; list it under the other domain's files"
            )
    return records


def record_item(record: EiRecord, source: str) -> Item:
    """An EiBench-style record as an item of ``source``; a choice record carries its answer."""
    answer = record.choices.index(record.output) if record.choices else None
    return Item(source, record.task, record.aspect, record_language(record), record, answer)


def from_choice_item(item: ChoiceItem, domain: str) -> Item:
    """A loader's :class:`ChoiceItem` as an :class:`Item` whose record is formatted like training data."""
    record = EiRecord(
        id=item.id,
        task=item.task,
        domain=domain,
        aspect=item.category,
        instruction=item.prompt_instruction,
        input=item.prompt_input,
        output=item.choices[item.answer_index],
        choices=item.choices,
        source=item.id,
    )
    return Item(item.suite, item.task, item.category, item.language, record, item.answer_index)


T = TypeVar("T")


def limit_items(items: list[T], limit: int | None) -> list[T]:
    """The first ``limit`` items of each task and language (items with ``task`` and ``language``), in their
    order; all of them without a limit."""
    if limit is None:
        return items
    seen: Counter[tuple[str, str]] = Counter()
    kept = []
    for item in items:
        key = (item.task, item.language)  # type: ignore[attr-defined]
        seen[key] += 1
        if seen[key] <= limit:
            kept.append(item)
    return kept


def require_file(path: str, key: str) -> None:
    """A missing input file is an error naming the config key that pointed at it."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"config key {key}: file {path} not found; fix the path, or download it (docs/evaluation.md)"
        )
