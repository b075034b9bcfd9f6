"""The EmotionPrompt probe: GI questions asked again with an emotional stimulus appended.

Li et al. (2023, arXiv 2307.11760) showed that short emotional sentences ("This is very important to
my career.") change how LLMs answer. For MoEI they are out-of-distribution emotional wording on
inputs that need general intelligence: the probe asks whether they drag GI inputs into the adapters
(the inter gate rises) and whether GI accuracy moves. The stimuli are configured
(``eval.emotion_prompt_stimuli``, id -> sentence; ``conf/eval/paper.yaml`` lists EP01-EP11).

A stimulus goes at the end of the record's instruction, as in the paper (the original prompt, then
the stimulus); the input, the choices and the template's answer cue stay where the model expects them.

:class:`EmotionPrompt` is the ``emotion_prompt`` suite: it reruns the ``gi`` suite's items under every
stimulus and reports GI acc and acc_norm per stimulus and over all of them, their change from the plain
prompts, and the mean inter gate on the same prompts, plain and with stimuli.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from moei_lightning.data import DataError
from moei_lightning.eval.harness import Harness
from moei_lightning.eval.report import Report, Table
from moei_lightning.eval.scorer import CHOICE_NOTE, accuracy, pooled_mean
from moei_lightning.eval.suite import CHOICE_METRICS, ChoiceOutcome, Item, Row, Settings, Source, Suite

_NO_ADAPTERS = "no adapters to route to (model.adapter: full)"
_NO_INTER_GATE = "no inter gate (model.adapter: lora or molora.inter: none): adapters on every token, gate 1"


def check_stimuli(stimuli: Mapping[str, str]) -> dict[str, str]:
    """The stimuli as an ordered dict; empty ids or sentences are an error naming the config key."""
    for stimulus_id, text in stimuli.items():
        if not str(stimulus_id).strip() or not isinstance(text, str) or not text.strip():
            raise DataError(
                f"config key eval.emotion_prompt_stimuli: entry {stimulus_id!r}: {text!r}; every stimulus needs "
                "an id and a non-empty sentence, e.g. EP02: This is very important to my career."
            )
    return {str(k): v.strip() for k, v in stimuli.items()}


def with_stimulus(item: Item, stimulus_id: str, stimulus: str) -> Item:
    """``item`` with ``stimulus`` appended to its instruction; its id and variant name the stimulus."""
    record = item.record
    instruction = f"{record.instruction.rstrip()} {stimulus}"
    record = dataclasses.replace(record, id=f"{record.id}#{stimulus_id}", instruction=instruction)
    return dataclasses.replace(item, record=record, variant=stimulus_id)


def probe_items(items: list[Item], stimuli: Mapping[str, str]) -> list[Item]:
    """Every item under every stimulus, stimulus by stimulus."""
    return [with_stimulus(item, sid, text) for sid, text in stimuli.items() for item in items]


@dataclasses.dataclass
class ProbeItems:
    """The ``gi`` suite's items and every one of them under every stimulus."""

    plain: list[Item]
    variants: list[Item]


@dataclasses.dataclass
class ProbeOutcomes:
    """The plain GI outcomes and the stimulus variants' outcomes, each with its prompt's inter gate."""

    plain: list[ChoiceOutcome]
    variants: list[ChoiceOutcome]


class EmotionPrompt(Suite):
    """The ``emotion_prompt`` suite: the ``gi`` items under each stimulus of ``eval.emotion_prompt_stimuli``."""

    name = "emotion_prompt"
    requires = ("gi",)

    @classmethod
    def check(cls, settings: Settings) -> None:
        check_stimuli(settings.emotion_prompt_stimuli)

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.stimuli = check_stimuli(settings.emotion_prompt_stimuli)
        if not self.stimuli:
            raise DataError(
                "config key eval.emotion_prompt_stimuli: the emotion_prompt suite needs at least one stimulus; "
                "conf/eval/paper.yaml lists EP01-EP11"
            )

    def load(self, source: Source, loaded: Mapping[str, Any]) -> ProbeItems:
        return ProbeItems(loaded["gi"], probe_items(loaded["gi"], self.stimuli))

    def count(self, items: ProbeItems) -> int:
        return len(items.plain) + len(items.variants)

    def run(self, harness: Harness, items: ProbeItems, done: Mapping[str, Any]) -> ProbeOutcomes:
        plain = done["gi"]
        gates = harness.gates([o.item for o in plain])
        plain = [dataclasses.replace(o, gate=gate) for o, gate in zip(plain, gates)]
        variants = harness.choices(items.variants, self.name)
        for outcome, gate in zip(variants, harness.gates([o.item for o in variants])):
            outcome.gate = gate
        return ProbeOutcomes(plain, variants)

    def report(self, outcomes: ProbeOutcomes, rows: list[Row], report: Report) -> None:
        plain, variants, stimuli = outcomes.plain, outcomes.variants, self.stimuli
        gate_note = _gate_note(report.config)
        by_stimulus: dict[str, list[ChoiceOutcome]] = defaultdict(list)
        for outcome in variants:
            by_stimulus[outcome.item.variant].append(outcome)
        plain_accuracy = {metric: accuracy(plain, metric) for metric in CHOICE_METRICS}
        plain_gate = _mean(o.gate for o in plain)
        rows = [["none", "(plain prompts)", len(plain), *plain_accuracy.values(), None, None, plain_gate, None]]
        accuracies: dict[str, list[tuple[float, int]]] = defaultdict(list)
        gates = []
        for stimulus_id, text in stimuli.items():
            group = by_stimulus[stimulus_id]
            acc = {metric: accuracy(group, metric) for metric in CHOICE_METRICS}
            gate = _mean(o.gate for o in group)
            for metric, value in acc.items():
                accuracies[metric].append((value, len(group)))
            gates.append(gate)
            changes = [acc[m] - plain_accuracy[m] for m in CHOICE_METRICS]
            rows.append([stimulus_id, text, len(group), *acc.values(), *changes, gate, _difference(gate, plain_gate)])
        report.tables["emotion_prompt"] = Table(
            "EmotionPrompt probe (GI with emotional stimuli)",
            [
                "stimulus",
                "text",
                "n",
                "GI acc",
                "GI acc_norm",
                "change acc",
                "change acc_norm",
                "inter gate",
                "gate change",
            ],
            rows,
            note="Each stimulus appended to the instruction of every GI item; change is against the plain prompts. "
            f"{CHOICE_NOTE} Inter gate: mean over the prompt's real tokens and the adapted layers (0 backbone, "
            "1 adapters).",
        )
        n, k = len(plain), len(stimuli)
        stimulus_gate = _mean(gates)
        gate_note = gate_note if plain_gate is not None else _NO_ADAPTERS
        for metric in CHOICE_METRICS:
            stimulus_accuracy = pooled_mean(accuracies[metric])
            report.add("EmotionPrompt", f"GI {metric} (plain)", plain_accuracy[metric], n, "all GI items")
            report.add("EmotionPrompt", f"GI {metric} (stimuli)", stimulus_accuracy, n * k, f"over {k} stimuli")
            change = stimulus_accuracy - plain_accuracy[metric]
            report.add("EmotionPrompt", f"GI {metric} change", change, n * k, "percentage points")
        report.add("EmotionPrompt", "inter gate (plain)", plain_gate, n, gate_note)
        report.add("EmotionPrompt", "inter gate (stimuli)", stimulus_gate, n * k, gate_note or f"mean over {k} stimuli")
        report.add("EmotionPrompt", "inter gate change", _difference(stimulus_gate, plain_gate), n * k, gate_note)

    def outputs(self, outcomes: ProbeOutcomes) -> dict[str, Any]:
        return {"choices.jsonl": [o.line(self.name) for o in outcomes.variants]}


def _mean(values: Iterable[float | None]) -> float | None:
    """Mean of the values, or None when there is none or any is missing."""
    values = list(values)
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def _gate_note(config: Mapping[str, object]) -> str:
    """Why the inter gate reads 1 everywhere, when the run's adapters have none."""
    molora = config.get("molora")
    inter = molora.get("inter") if isinstance(molora, dict) else None
    return _NO_INTER_GATE if config.get("adapter") == "lora" or inter == "none" else ""


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b
