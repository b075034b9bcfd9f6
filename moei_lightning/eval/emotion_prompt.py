"""The EmotionPrompt probe: GI questions asked again with an emotional stimulus appended.

Li et al. (2023, arXiv 2307.11760) showed that short emotional sentences ("This is very important to
my career.") change how LLMs answer. For MoEI they are out-of-distribution emotional wording on
inputs that need general intelligence: the probe asks whether they drag GI inputs into the adapters
(the inter gate rises) and whether GI accuracy moves. The stimuli are configured
(``eval.emotion_prompt_stimuli``, id -> sentence; ``conf/eval/paper.yaml`` lists EP01-EP11).

A stimulus goes at the end of the record's instruction, as in the paper (the original prompt, then
the stimulus); the input, the choices and the template's answer cue stay where the model expects them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from moei_lightning.data import DataError
from moei_lightning.eval.suites import Item


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
