"""One model under evaluation: the suites ask it through here, in order.

Every model call goes through the :class:`~moei_lightning.runner.ModelRunner`, so under DDP or FSDP the
ranks share the work, make the same number of forward and generate calls, and all end up with every
result. Nothing here writes files or knows about Lightning; the ``test`` callback does that.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from moei_lightning.data import Encoder
from moei_lightning.eval import mmlu
from moei_lightning.eval.choices import choice_examples, group_choices
from moei_lightning.eval.suite import ChoiceOutcome, Item, Suite
from moei_lightning.runner import ModelRunner


class Progress(Protocol):
    """Hears when each suite begins (with its item count) and when the last one has ended."""

    def start(self, suite: str, items: int) -> None: ...

    def close(self) -> None: ...


@dataclass
class Results:
    """Every suite's outcomes by name; ``truncated`` counts scored sequences cut to data.max_length, of
    ``scored``, per suite."""

    outcomes: dict[str, Any] = field(default_factory=dict)
    truncated: Counter[str] = field(default_factory=Counter)
    scored: Counter[str] = field(default_factory=Counter)


class Harness:
    """One model under evaluation (its :class:`ModelRunner`), with the records' formatting every suite shares.

    ``encoder`` formats and tokenises records exactly as for training (``data.*`` settings).
    """

    def __init__(self, runner: ModelRunner, encoder: Encoder) -> None:
        self.runner, self.encoder = runner, encoder
        self.mmlu_encoder = mmlu.prompt_encoder(encoder)
        self.tokenizer = runner.tokenizer
        self.truncated: Counter[str] = Counter()
        self.scored: Counter[str] = Counter()

    @classmethod
    def of_module(
        cls, module: Any, datamodule: Any, batch_size: int, rank: int = 0, world_size: int = 1, **kwargs: Any
    ) -> Harness:
        """The harness for a MoEIModule (``model``, ``tokenizer``, ``kind``), with its DataModule's prompt settings
        (``formatter``, ``max_length``), so records are read as training reads them; ``kwargs`` go to the runner."""
        encoder = Encoder(module.tokenizer, datamodule.formatter, module.kind, datamodule.max_length)
        runner = ModelRunner(module.model, module.tokenizer, module.kind, batch_size, rank, world_size, **kwargs)
        return cls(runner, encoder)

    def run(self, suites: Sequence[Suite], inputs: Mapping[str, Any], progress: Progress | None = None) -> Results:
        """Every suite on its loaded ``inputs``, in order; ``progress`` hears when each begins."""
        self.truncated, self.scored = Counter(), Counter()  # this run's counts, not an earlier run's as well
        results = Results(truncated=self.truncated, scored=self.scored)
        for suite in suites:
            if progress is not None:
                progress.start(suite.name, suite.count(inputs[suite.name]))
            results.outcomes[suite.name] = suite.run(self, inputs[suite.name], results.outcomes)
        if progress is not None:
            progress.close()
        return results

    def choices(self, items: list[Item], suite: str) -> list[ChoiceOutcome]:
        """The choices' log-likelihoods of every item; truncated prompts are counted under ``suite``."""
        records = [item.record for item in items]
        examples = []
        for item in items:
            asked, report = choice_examples(self.encoder_for(item), [item.record])
            examples += asked
            self.truncated[suite] += report.truncated
        self.scored[suite] += len(examples)
        pairs = self.runner.loglikelihoods(examples)
        scores = group_choices(records, [s for s, _ in pairs], [n for _, n in pairs])
        return [ChoiceOutcome(item, score) for item, score in zip(items, scores)]

    def encoder_for(self, item: Item) -> Encoder:
        """How an item is prompted and tokenised: MMLU as lm-eval's ``mmlu`` (:func:`mmlu.prompt_encoder`),
        everything else as in training."""
        return self.mmlu_encoder if item.source == mmlu.SUITE else self.encoder

    def prompts(self, items: Sequence[Item]) -> list[str]:
        """The items' prompts as they are asked (:meth:`encoder_for`)."""
        return [self.encoder_for(item).formatter.format(item.record) for item in items]

    def gates(self, items: Sequence[Item]) -> list[float | None]:
        """Mean inter gate over the real prompt tokens of each item, averaged over adapted layers."""
        return self.runner.gates(self.prompts(items))


def chat_prompt(tokenizer: Any, prompt: str, system: str | None = None) -> str:
    """``prompt`` as the user turn of the tokenizer's chat template (after ``system``, if given), ready for the
    reply; without a template, the system text and the prompt one after the other."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt if system is None else f"{system}\n{prompt}"
    messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
