"""Tokenise records once, with truncation, and count everything that was cut or skipped.

Causal LMs (``kind="causal"``) see ``prompt + target + EOS`` and are supervised on the target and the
EOS only: prompt positions get label -100. Seq2seq models get the prompt as the source and
``target + EOS`` as the labels.

The prompt is tokenised without the tokenizer's automatic special tokens, and the tokens the
tokenizer would add at the start (LLaMA's BOS) are put back only when the text does not already
begin with them: a chat template renders ``<s>`` itself, and a second BOS would be a prompt the
model never saw in training. Tokens the tokenizer adds at the end (T5's EOS) are kept for seq2seq
sources and left out of causal prompts, where the target follows.

Truncation to ``max_length`` tokens, causal: the prompt is cut from the left (its leading special
tokens stay), so the text nearest the answer survives; if the target with its EOS alone does not fit
beside the leading special tokens, the whole prompt text goes and the target is cut from the right.
Seq2seq: the source text is cut from the left (special tokens stay) and the target from the right,
each to ``max_length``. An example that would keep no target token (causal) or no source text
(seq2seq) is skipped. Every cut and every skip is counted in the :class:`DataReport`.
"""

from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from moei_lightning.data.errors import DataError
from moei_lightning.data.prompts import PromptFormatter
from moei_lightning.data.records import EiRecord

Kind = Literal["causal", "seq2seq"]
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """A tokenised record. Causal: ``labels`` aligns with ``input_ids``. Seq2seq: ``labels`` is the target."""

    record: EiRecord
    prompt: str
    input_ids: list[int]
    labels: list[int]


@dataclass
class DataReport:
    """What tokenisation did to one split; printed at setup so that no cut or skip goes unnoticed."""

    split: str
    examples: Counter[str] = field(default_factory=Counter)
    """Kept examples per ``domain/aspect``."""
    truncated: int = 0
    """Kept examples that lost tokens (prompt, target or both)."""
    target_truncated: int = 0
    """Of those, the ones whose target lost tokens."""
    skipped: list[str] = field(default_factory=list)
    """``file:line`` of examples left out because nothing of the target (causal) or source (seq2seq) fit."""
    capped: int = 0
    """Records left out on purpose by ``data.max_train_examples``."""

    @property
    def total(self) -> int:
        """Number of kept examples."""
        return sum(self.examples.values())

    def summary(self) -> str:
        """A few human-readable lines for the setup log."""
        counts = ", ".join(f"{key}={n}" for key, n in sorted(self.examples.items())) or "none"
        lines = [f"{self.split}: {self.total} examples ({counts})"]
        lines.append(f"  truncated: {self.truncated} (target cut in {self.target_truncated})")
        if self.capped:
            lines.append(f"  left out by data.max_train_examples: {self.capped}")
        if self.skipped:
            shown = ", ".join(self.skipped[:5]) + (", ..." if len(self.skipped) > 5 else "")
            lines.append(f"  skipped, no room within data.max_length: {len(self.skipped)} ({shown})")
        return "\n".join(lines)


class Encoder:
    """Prompt formatting plus tokenisation for one tokenizer, model kind and length limit."""

    def __init__(self, tokenizer: Any, formatter: PromptFormatter, kind: Kind, max_length: int) -> None:
        if kind not in get_args(Kind):
            raise DataError(
                f"model kind {kind!r} is not supported; the LightningModule's `kind` must be one of "
                f"{list(get_args(Kind))}"
            )
        if max_length < 1:
            raise DataError(f"config key data.max_length: must be a positive number of tokens, got {max_length}")
        if tokenizer.eos_token_id is None:
            raise DataError(
                f"the tokenizer {type(tokenizer).__name__} has no EOS token, so targets cannot be "
                "terminated; use a tokenizer with an eos_token"
            )
        self.tokenizer = tokenizer
        self.formatter = formatter
        self.kind = kind
        self.max_length = max_length
        self._check_template_words()
        self.lead, self.tail = special_affixes(tokenizer)

    def _check_template_words(self) -> None:
        """Every word of the template must tokenise: a tokenizer without an unknown token fails on new words.

        Without this, the first batch fails inside the tokenizer with a message that names no word.
        """
        literal = " ".join(text for text, *_ in string.Formatter().parse(self.formatter.template))
        for word in dict.fromkeys([*literal.split(), *(self.formatter.system_prompt or "").split()]):
            try:
                self.tokenizer(word, add_special_tokens=False)
            except Exception as err:  # the tokenizers library raises a bare Exception
                raise DataError(
                    f"config key data.prompt_template: the word {word!r} of the template is not in the vocabulary "
                    f"of the tokenizer {type(self.tokenizer).__name__}, which has no unknown token ({err}); "
                    "write the template (and data.system_prompt) in words the tokenizer knows"
                ) from err

    def encode(self, records: list[EiRecord], split: str) -> tuple[list[Example], DataReport]:
        """Tokenise ``records`` in order; the report tells what was truncated or skipped and why."""
        report = DataReport(split)
        if not records:
            return [], report
        prompts = [self.formatter.format(record) for record in records]
        bodies = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        targets = self.tokenizer([record.output for record in records], add_special_tokens=False)["input_ids"]
        examples = []
        for record, prompt, body, target in zip(records, prompts, bodies, targets):
            target = [*target, self.tokenizer.eos_token_id]
            body = strip_affixes(body, self.lead, self.tail if self.kind == "seq2seq" else [])
            encoded = (self._causal if self.kind == "causal" else self._seq2seq)(body, target, report)
            if encoded is None:
                report.skipped.append(record.source or record.id)
                continue
            examples.append(Example(record, prompt, *encoded))
            report.examples[f"{record.domain}/{record.aspect}"] += 1
        return examples, report

    def _causal(self, body: list[int], target: list[int], report: DataReport) -> tuple[list[int], list[int]] | None:
        room = self.max_length - len(self.lead)
        if room < 1:
            return None
        if len(body) + len(target) > room:
            report.truncated += 1
            if len(target) > room:
                report.target_truncated += 1
                target = target[:room]
            body = body[len(body) - (room - len(target)) :]
        prompt = [*self.lead, *body]
        return [*prompt, *target], [IGNORE_INDEX] * len(prompt) + target

    def _seq2seq(self, body: list[int], target: list[int], report: DataReport) -> tuple[list[int], list[int]] | None:
        room = self.max_length - len(self.lead) - len(self.tail)
        if room < 1:
            return None
        if len(body) > room or len(target) > self.max_length:
            report.truncated += 1
            report.target_truncated += len(target) > self.max_length
            body, target = body[len(body) - min(room, len(body)) :], target[: self.max_length]
        return [*self.lead, *body, *self.tail], target


def special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer adds before and after a text (LLaMA: [BOS], []; T5: [], [EOS])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise DataError(
        f"cannot tell which special tokens {type(tokenizer).__name__} adds: 'a' encodes to {plain} plainly "
        f"but to {full} with special tokens"
    )


def strip_affixes(ids: list[int], lead: list[int], tail: list[int]) -> list[int]:
    """``ids`` without a leading ``lead`` and trailing ``tail`` that the prompt text itself rendered
    (a chat template writes ``<s>`` itself), so they are not added twice."""
    if lead and ids[: len(lead)] == lead:
        ids = ids[len(lead) :]
    if tail and ids[len(ids) - len(tail) :] == tail:
        ids = ids[: len(ids) - len(tail)]
    return ids
