"""Run the loaded suites through one model: choice log-likelihoods, greedy generations, inter-gate readings.

Every model call goes through the :class:`~moei_lightning.runner.ModelRunner`, so under DDP or FSDP the
ranks share the work, make the same number of forward and generate calls, and all end up with every
result. Nothing here writes files or knows about Lightning; the callback does that.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from moei_lightning.data import Encoder
from moei_lightning.eval import emobench as emobench_suite
from moei_lightning.eval import mmlu
from moei_lightning.eval.choices import ChoiceScores, choice_examples, group_choices
from moei_lightning.eval.emobench import EmoBenchItem, EmoBenchOutcome
from moei_lightning.eval.emotion_prompt import probe_items
from moei_lightning.eval.eqbench import (
    DEFAULT_MODE,
    SAMPLINGS,
    EqBenchResult,
    Mode,
    accepted,
    attempt_temperatures,
    default_max_new_tokens,
    partial,
    question_prompt,
    score_responses,
    system_message,
)
from moei_lightning.eval.progress import SuiteProgress
from moei_lightning.eval.suites import EqBenchQuestions, Item, SuiteInputs, from_choice_item
from moei_lightning.runner import ModelRunner


@dataclass
class ChoiceOutcome:
    """A multiple-choice item with its scores; ``gate`` is the mean inter gate on its prompt, if measured."""

    item: Item
    scores: ChoiceScores
    gate: float | None = None

    @property
    def correct(self) -> bool:
        return self.scores.predicted == self.item.answer


@dataclass
class OpenOutcome:
    """An open item with the model's greedy continuation."""

    item: Item
    prediction: str


@dataclass
class EqBenchOutcome:
    """The questions asked, the kept reply by question id, how many attempts each took, and the score."""

    questions: EqBenchQuestions
    replies: dict[str, str]
    result: EqBenchResult
    attempts: dict[str, int] = field(default_factory=dict)


@dataclass
class Results:
    """Per-item outcomes of every suite that ran; ``truncated`` counts scored sequences cut to data.max_length."""

    eibench: list[ChoiceOutcome] = field(default_factory=list)
    eibench_open: list[OpenOutcome] = field(default_factory=list)
    gi: list[ChoiceOutcome] = field(default_factory=list)
    emobench: list[EmoBenchOutcome] = field(default_factory=list)
    emobench_protocol: str = emobench_suite.DEFAULT_PROTOCOL
    eqbench: EqBenchOutcome | None = None
    emotion_prompt: list[ChoiceOutcome] = field(default_factory=list)
    truncated: Counter[str] = field(default_factory=Counter)
    scored: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Settings:
    """How the suites ask: generation lengths, the EQ-Bench mode and generation, the EmoBench protocol.

    ``eqbench_max_new_tokens`` None is the harness's length for the mode; ``eqbench_system_message`` and
    ``eqbench_sampling`` are ``harness`` (as the reference harness asks) or the named alternatives
    ``none`` (no system message) and ``plain`` (no top-k or top-p cut).
    """

    max_new_tokens: int = 128
    eqbench_max_new_tokens: int | None = None
    eqbench_mode: Mode = DEFAULT_MODE
    eqbench_system_message: str = "harness"
    eqbench_sampling: str = "harness"
    emobench_protocol: str = emobench_suite.DEFAULT_PROTOCOL
    emobench_max_new_tokens: int = emobench_suite.MAX_NEW_TOKENS


class Harness:
    """One model under evaluation (its :class:`ModelRunner`), with the records' formatting every suite shares.

    ``encoder`` formats and tokenises records exactly as for training (``data.*`` settings).
    """

    def __init__(self, runner: ModelRunner, encoder: Encoder) -> None:
        self.runner, self.encoder = runner, encoder
        self.mmlu_encoder = mmlu.prompt_encoder(encoder)
        self.tokenizer = runner.tokenizer

    @classmethod
    def of_module(
        cls, module: Any, datamodule: Any, batch_size: int, rank: int = 0, world_size: int = 1, **kwargs: Any
    ) -> Harness:
        """The harness for a MoEIModule (``model``, ``tokenizer``, ``kind``), with its DataModule's prompt settings
        (``formatter``, ``max_length``), so records are read as training reads them; ``kwargs`` go to the runner."""
        encoder = Encoder(module.tokenizer, datamodule.formatter, module.kind, datamodule.max_length)
        runner = ModelRunner(module.model, module.tokenizer, module.kind, batch_size, rank, world_size, **kwargs)
        return cls(runner, encoder)

    def run(
        self, inputs: SuiteInputs, settings: Settings | None = None, progress: SuiteProgress | None = None
    ) -> Results:
        """Every suite named in ``inputs.names``, in order; ``progress`` hears when each begins."""
        settings = settings or Settings()
        results = Results()
        step = progress.start if progress is not None else lambda suite, items: None
        if "eibench" in inputs.names:
            step("eibench", len(inputs.eibench))
            choice = [item for item in inputs.eibench if item.answer is not None]
            open_items = [item for item in inputs.eibench if item.answer is None]
            results.eibench = self.choices(choice, "eibench", results)
            prompts = [self.encoder.formatter.format(item.record) for item in open_items]
            predictions = self.runner.generate(prompts, settings.max_new_tokens)
            results.eibench_open = [OpenOutcome(item, text) for item, text in zip(open_items, predictions)]
        if "gi" in inputs.names:
            step("gi", len(inputs.gi))
            results.gi = self.choices(inputs.gi, "gi", results)
        if "eqbench" in inputs.names and inputs.eqbench is not None:
            step("eqbench", len(inputs.eqbench.questions))
            results.eqbench = self.eqbench(
                inputs.eqbench,
                settings.eqbench_max_new_tokens,
                settings.eqbench_mode,
                settings.eqbench_system_message,
                settings.eqbench_sampling,
            )
        if "emobench" in inputs.names:
            step("emobench", len(inputs.emobench))
            results.emobench_protocol = settings.emobench_protocol
            results.emobench = self.emobench(
                inputs.emobench, settings.emobench_protocol, settings.emobench_max_new_tokens, results
            )
        if "emotion_prompt" in inputs.names:
            step("emotion_prompt", len(inputs.gi) * (1 + len(inputs.stimuli)))
            for outcome, gate in zip(results.gi, self.gates([o.item for o in results.gi])):
                outcome.gate = gate
            variants = self.choices(probe_items(inputs.gi, inputs.stimuli), "emotion_prompt", results)
            for outcome, gate in zip(variants, self.gates([o.item for o in variants])):
                outcome.gate = gate
            results.emotion_prompt = variants
        if progress is not None:
            progress.close()
        return results

    def choices(self, items: list[Item], suite: str, results: Results) -> list[ChoiceOutcome]:
        """acc_norm scores of every item; truncated prompts are counted in ``results``."""
        records = [item.record for item in items]
        examples = []
        for item in items:
            asked, report = choice_examples(self.encoder_for(item), [item.record])
            examples += asked
            results.truncated[suite] += report.truncated
        results.scored[suite] += len(examples)
        pairs = self.runner.loglikelihoods(examples)
        scores = group_choices(records, [s for s, _ in pairs], [n for _, n in pairs])
        return [ChoiceOutcome(item, score) for item, score in zip(items, scores)]

    def eqbench(
        self,
        questions: EqBenchQuestions,
        max_new_tokens: int | None = None,
        mode: Mode = DEFAULT_MODE,
        system: str = "harness",
        sampling: str = "harness",
    ) -> EqBenchOutcome:
        """Ask every question through the chat template as the reference harness does, then score the replies.

        ``max_new_tokens`` None is the harness's reply length for ``mode``; ``system`` and ``sampling`` are
        ``harness`` or their named alternatives (:class:`Settings`).

        Attempt 1 samples every question at temperature 0.01; each later attempt (up to 3) asks the
        questions whose reply did not parse again, 0.15 hotter. A question keeps its first parsing reply,
        else (revise mode) its first reply of which one pass parsed, else its last reply. Every rank sees
        every reply, so all ranks agree on which questions are asked again.
        """
        if sampling not in SAMPLINGS:
            raise ValueError(f"EQ-Bench sampling {sampling!r} is not one of {list(SAMPLINGS)}")
        asked, version = questions.questions, questions.version
        new_tokens = default_max_new_tokens(mode) if max_new_tokens is None else max_new_tokens
        message = system_message(system, getattr(self.tokenizer, "chat_template", None))
        prompts = {
            qid: chat_prompt(self.tokenizer, question_prompt(q, mode, version), message) for qid, q in asked.items()
        }
        replies: dict[str, str] = {}  # the latest reply of each question
        kept: dict[str, str] = {}  # the reply that parsed
        partials: dict[str, str] = {}  # revise mode: the first reply of which one pass parsed
        attempts: dict[str, int] = {}
        pending = list(asked)
        for attempt, temperature in enumerate(attempt_temperatures(), start=1):
            if not pending:
                break
            texts = self.runner.generate(
                [prompts[qid] for qid in pending], new_tokens, temperature, sampling == "plain"
            )
            retry = []
            for qid, text in zip(pending, texts):
                replies[qid], attempts[qid] = text, attempt
                if accepted(text, asked[qid], mode):
                    kept[qid] = text
                    continue
                if partial(text, asked[qid], mode):
                    partials.setdefault(qid, text)
                retry.append(qid)
            pending = retry
        final = {qid: kept.get(qid, partials.get(qid, replies[qid])) for qid in asked}
        return EqBenchOutcome(questions, final, score_responses(final, asked, mode, version), attempts)

    def emobench(
        self, items: list[EmoBenchItem], protocol: str, max_new_tokens: int, results: Results | None = None
    ) -> list[EmoBenchOutcome]:
        """Answer EmoBench items by ``protocol``: ``generate`` (the reference's prompts, greedy replies parsed for
        letters) or ``loglikelihood`` (each question as multiple choice, acc_norm)."""
        if protocol == "generate":
            system = emobench_suite.system_prompt
            prompts = [
                chat_prompt(self.tokenizer, emobench_suite.user_prompt(i), system(i.task, i.language)) for i in items
            ]
            replies = self.runner.generate(prompts, max_new_tokens)
            return [EmoBenchOutcome(i, emobench_suite.parse_reply(r, i.task), r) for i, r in zip(items, replies)]
        if protocol != "loglikelihood":
            raise ValueError(f"EmoBench protocol {protocol!r} is not one of {list(emobench_suite.PROTOCOLS)}")
        questions = [[from_choice_item(q, "ei") for q in emobench_suite.loglikelihood_questions(i)] for i in items]
        flat = self.choices([q for qs in questions for q in qs], "emobench", results or Results())
        outcomes, at = [], 0
        for item, qs in zip(items, questions):
            chosen = flat[at : at + len(qs)]
            outcomes.append(EmoBenchOutcome(item, [emobench_suite.LETTERS[o.scores.predicted] for o in chosen]))
            at += len(qs)
        return outcomes

    def encoder_for(self, item: Item) -> Encoder:
        """How an item is prompted and tokenised: MMLU as lm-eval's ``mmlu`` (:func:`mmlu.prompt_encoder`),
        everything else as in training."""
        return self.mmlu_encoder if item.source == mmlu.SUITE else self.encoder

    def gates(self, items: list[Item]) -> list[float | None]:
        """Mean inter gate over the real prompt tokens of each item, averaged over adapted layers."""
        return self.runner.gates([self.encoder_for(item).formatter.format(item.record) for item in items])


def chat_prompt(tokenizer: Any, prompt: str, system: str | None = None) -> str:
    """``prompt`` as the user turn of the tokenizer's chat template (after ``system``, if given), ready for the
    reply; without a template, the system text and the prompt one after the other."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt if system is None else f"{system}\n{prompt}"
    messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
