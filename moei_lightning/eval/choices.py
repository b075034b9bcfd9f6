"""Multiple choice by log-likelihood, as lm-evaluation-harness (v0.4) does it.

Each choice is the continuation of the record's own prompt (formatted as in training); the answer is
the choice with the highest log-likelihood per character (``acc_norm``; the raw sum, ``acc``, is kept
too), and the prompt/choice boundary is split as lm-eval's ``_encode_pair`` splits it
(:func:`split_boundary`, :func:`choice_examples`). The forward passes are the model runner's
(:mod:`moei_lightning.runner`); :func:`choice_examples` and :func:`group_choices` are the steps around them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from moei_lightning.data import IGNORE_INDEX, DataReport, EiRecord, Encoder, Example, strip_affixes
from moei_lightning.runner import example_loglikelihoods, pad_id


@dataclasses.dataclass
class ChoiceScores:
    """Log-likelihood of every choice of one record; ``predicted`` is the acc_norm answer."""

    logprobs: list[float]
    tokens: list[int]
    chars: list[int]

    @property
    def predicted(self) -> int:
        normalised = [lp / max(1, n) for lp, n in zip(self.logprobs, self.chars)]
        return max(range(len(normalised)), key=normalised.__getitem__)

    @property
    def predicted_unnormalised(self) -> int:
        return max(range(len(self.logprobs)), key=self.logprobs.__getitem__)


@torch.no_grad()
def choice_loglikelihoods(
    model: nn.Module, encoder: Encoder, records: list[EiRecord], batch_size: int = 16
) -> list[ChoiceScores]:
    """Score every choice of every record (records without choices are an error)."""
    examples, _ = choice_examples(encoder, records)
    sums, counts = example_loglikelihoods(model, examples, encoder.kind, pad_id(encoder.tokenizer), batch_size)
    return group_choices(records, sums, counts)


TARGET_DELIMITER = " "
"""What separates a prompt from a choice: lm-evaluation-harness's default ``target_delimiter`` for
multiple choice. It also makes a choice's tokens the ones training gives a target tokenised on its
own by a SentencePiece tokenizer (LLaMA-2, T5): ``[/INST]`` + `` joy`` reads ``▁joy``, as in training."""


def split_boundary(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's boundary: whitespace ending the context moves to the start of the continuation."""
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + continuation


def choice_examples(encoder: Encoder, records: list[EiRecord]) -> tuple[list[Example], DataReport]:
    """Every choice of every record, in order, as the continuation of the record's prompt (no EOS).

    Tokenised as lm-evaluation-harness does: the continuation is ``TARGET_DELIMITER + choice``, and
    after :func:`split_boundary`, a causal model's choice
    tokens are those of ``tokenize(context + continuation)`` past the length of
    ``tokenize(context)``, and the model reads ``tokenize(context)`` followed by them; a seq2seq
    model's choice tokens are the continuation tokenised alone. So "Answer: " + "Paris" and
    "Answer:" + " Paris" score the same. The prompt keeps the special tokens training gives it, and
    is cut from the left to fit ``data.max_length`` (counted in the report). Split from the forward
    passes so that a caller can spread the examples over ranks.
    """
    tokenizer, causal = encoder.tokenizer, encoder.kind == "causal"
    tail = [] if causal else encoder.tail
    report = DataReport("choices")
    examples = []
    for record in records:
        if not record.choices:
            raise ValueError(f"{record.source or record.id}: no choices to score")
        prompt = encoder.formatter.format(record)
        for choice in record.choices:
            context, continuation = split_boundary(prompt, TARGET_DELIMITER + choice)
            context_ids = strip_affixes(_tokens(tokenizer, context), encoder.lead, tail)
            if causal:
                whole = strip_affixes(_tokens(tokenizer, context + continuation), encoder.lead, [])
                target = whole[len(context_ids) :]
            else:
                target = _tokens(tokenizer, continuation)
            room = encoder.max_length - len(encoder.lead) - len(tail) - (len(target) if causal else 0)
            if not target or room < 0 or (not causal and len(target) > encoder.max_length):
                raise ValueError(
                    f"{record.source or record.id}: choice {choice!r} cannot be scored within "
                    f"data.max_length={encoder.max_length} tokens; raise it to score every choice"
                )
            if len(context_ids) > room:
                report.truncated += 1
                context_ids = context_ids[len(context_ids) - room :]
            source = [*encoder.lead, *context_ids, *tail]
            variant = dataclasses.replace(record, output=choice)
            if causal:
                examples.append(Example(variant, prompt, [*source, *target], [IGNORE_INDEX] * len(source) + target))
            else:
                examples.append(Example(variant, prompt, source, target))
            report.examples[f"{record.domain}/{record.aspect}"] += 1
    return examples, report


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def group_choices(records: list[EiRecord], sums: list[float], counts: list[int]) -> list[ChoiceScores]:
    """Regroup per-choice scores (in :func:`choice_examples` order) into one :class:`ChoiceScores` per record."""
    scores, at = [], 0
    for record in records:
        n = len(record.choices)
        chars = [len(c) for c in record.choices]
        scores.append(ChoiceScores(sums[at : at + n], counts[at : at + n], chars))
        at += n
    if at != len(sums):
        raise ValueError(f"{len(sums)} choice scores for records with {at} choices in all")
    return scores
