"""Model-side scoring shared by training, per-aspect metrics and the evaluation harness.

- :func:`sequence_logprobs`: log-probability of every label token of a batch (causal or seq2seq), from
  :func:`routed_logits` (one forward, prompt routing from the tokens before the targets) and
  :func:`label_logprobs`.
- :func:`choice_loglikelihoods`: multiple choice by log-likelihood, as lm-evaluation-harness (v0.4)
  does it: each choice is the continuation of the record's own prompt (formatted as in training), the
  answer is the choice with the highest log-likelihood per character (``acc_norm``; the raw sum is
  kept too), and the prompt/choice boundary is split as lm-eval's ``_encode_pair`` splits it
  (:func:`split_boundary`, :func:`choice_examples`). Its three steps (:func:`choice_examples`,
  :func:`example_loglikelihoods`, :func:`group_choices`) are public so the evaluation harness can
  spread the forward passes over ranks.
- :func:`generate_texts`: greedy, batched, deterministic generation; causal prompts padded on the left.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moei_lightning.data import IGNORE_INDEX, Collator, DataReport, EiRecord, Encoder, Example, strip_affixes


def sequence_logprobs(model: nn.Module, batch: dict[str, Any], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs, mask)``, both (B, T): log p(label token) where ``mask`` marks supervised positions."""
    return label_logprobs(*routed_logits(model, batch, kind))


def routed_logits(model: nn.Module, batch: dict[str, Any], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` of one forward pass, aligned so that ``logits[:, t]`` predicts ``labels[:, t]``.

    Prompt routing (MoLoRA) sees the tokens before each causal target only, as it does in generation.
    """
    labels = batch["labels"]
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    prompt = None
    if kind == "seq2seq":
        kwargs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
        kwargs["decoder_attention_mask"] = (labels != IGNORE_INDEX).long()
    else:
        prompt = (labels != IGNORE_INDEX).cumsum(dim=1) == 0  # positions before the first target token
    recorder = getattr(model, "molora_recorder", None)
    with recorder.prompt(prompt) if recorder is not None else contextlib.nullcontext():
        logits = model(**kwargs).logits
    if kind == "causal":
        logits, labels = logits[:, :-1], labels[:, 1:]
    return logits, labels


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs, mask)`` of aligned logits and labels: log p(label) in float32 where a label is set, else 0."""
    mask = labels != IGNORE_INDEX
    token_loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.clamp_min(0).reshape(-1), reduction="none"
    )
    return -token_loss.view(labels.shape) * mask, mask


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
    sums, counts = example_loglikelihoods(model, examples, encoder.kind, _pad_id(encoder.tokenizer), batch_size)
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


@torch.no_grad()
def example_loglikelihoods(
    model: nn.Module, examples: list[Example], kind: str, pad_id: int, batch_size: int = 16
) -> tuple[list[float], list[int]]:
    """Per example: the summed log-probability of its label tokens, and how many there are.

    The number of forward passes depends only on ``len(examples)`` and ``batch_size``, which keeps
    ranks of a sharded model in step when each is given the same number of examples.
    """
    collate = Collator(pad_id, kind, "right")
    device = next(model.parameters()).device
    sums, counts = [], []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        logprobs, mask = sequence_logprobs(model, batch, kind)
        sums += logprobs.sum(-1).tolist()
        counts += mask.sum(-1).tolist()
    return sums, counts


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


@torch.no_grad()
def generate_texts(
    model: nn.Module,
    tokenizer: Any,
    kind: str,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
    synced_gpus: bool = False,
    temperature: float | None = None,
    unfiltered: bool = True,
) -> list[str]:
    """Continuations of ``prompts``, in order: greedy, or sampled at ``temperature``; ``unfiltered`` turns
    off any top-k or top-p cut, else the model's generation config keeps its own (as a caller that sets
    only the temperature gets). ``synced_gpus`` keeps sharded ranks stepping together."""
    device = next(model.parameters()).device
    sampling = {"do_sample": False} if temperature is None else {"do_sample": True, "temperature": temperature}
    if temperature is not None and unfiltered:
        sampling |= {"top_k": 0, "top_p": 1.0}
    outputs = []
    for start in range(0, len(prompts), batch_size):
        encoded = encode_prompts(tokenizer, prompts[start : start + batch_size], kind).to(device)
        generated = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            synced_gpus=synced_gpus,
            **sampling,
        )
        if kind == "causal":
            generated = generated[:, encoded["input_ids"].shape[1] :]
        outputs += tokenizer.batch_decode(generated, skip_special_tokens=True)
    return [text.strip() for text in outputs]


def encode_prompts(tokenizer: Any, prompts: list[str], kind: str) -> Any:
    """Tokenise prompts for generation: left padding for causal models, and no second BOS.

    Prompts rendered by a chat template already begin with BOS, so special tokens are added only
    when the text does not start with the tokenizer's BOS.
    """
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and all(p.startswith(bos) for p in prompts))
    side = "left" if kind == "causal" else "right"
    return tokenizer(prompts, return_tensors="pt", padding=True, padding_side=side, add_special_tokens=add_special)


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
