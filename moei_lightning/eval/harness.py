"""Run the loaded suites through one model: choice log-likelihoods, greedy generations, inter-gate readings.

Every model call goes through :func:`~moei_lightning.eval.distributed.sharded_map`, so under DDP or
FSDP the ranks share the work, make the same number of forward and generate calls, and all end up
with every result. Nothing here writes files or knows about Lightning; the callback does that.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from moei_lightning.data import EiRecord, Encoder, Example
from moei_lightning.eval import emobench as emobench_suite
from moei_lightning.eval.distributed import Gather, all_gather, sharded_map
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
from moei_lightning.eval.scoring import (
    ChoiceScores,
    choice_examples,
    encode_prompts,
    example_loglikelihoods,
    generate_texts,
    group_choices,
)
from moei_lightning.eval.suites import (
    CHOICE_METRICS,
    EqBenchQuestions,
    Item,
    SuiteInputs,
    from_choice_item,
    primary_metric,
)
from moei_lightning.molora import RoutingRecorder
from moei_lightning.sharding import gathered_root

T = TypeVar("T")
R = TypeVar("R")


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
    """One model under evaluation, with the settings every suite shares.

    Args:
        model: the Hugging Face model (with its adapters), already on its device and in eval mode.
        tokenizer: its tokenizer.
        kind: ``causal`` or ``seq2seq``.
        encoder: formats and tokenises records exactly as for training (``data.*`` settings).
        recorder: the adapters' routing recorder, for inter-gate readings; None without adapters.
        batch_size: sequences per forward pass (and per generate call, unless ``generation_batch_size`` is set).
        rank: this process's global rank.
        world_size: the number of processes sharing the work.
        gather: collects one object from every rank (tests replace it).
        generation_batch_size: prompts per generate call; None: ``batch_size``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        kind: str,
        encoder: Encoder,
        recorder: RoutingRecorder | None = None,
        batch_size: int = 8,
        rank: int = 0,
        world_size: int = 1,
        gather: Gather = all_gather,
        generation_batch_size: int | None = None,
    ) -> None:
        self.model, self.tokenizer, self.kind, self.encoder = model, tokenizer, kind, encoder
        self.recorder = recorder
        self.batch_size = batch_size
        self.generation_batch_size = generation_batch_size or batch_size
        self.rank, self.world_size, self.gather = rank, world_size, gather
        self.pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id

    @classmethod
    def of_module(
        cls, module: Any, datamodule: Any, batch_size: int, rank: int = 0, world_size: int = 1, **kwargs: Any
    ) -> Harness:
        """The runner for a MoEIModule (``model``, ``tokenizer``, ``kind``, ``recorder``), with its DataModule's
        prompt settings (``formatter``, ``max_length``), so records are read as training reads them."""
        encoder = Encoder(module.tokenizer, datamodule.formatter, module.kind, datamodule.max_length)
        kwargs.setdefault("recorder", module.recorder)
        return cls(
            module.model,
            module.tokenizer,
            module.kind,
            encoder,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            **kwargs,
        )

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
            predictions = self.generate(prompts, settings.max_new_tokens)
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
            for outcome, gate in zip(results.gi, self.gates([o.item.record for o in results.gi])):
                outcome.gate = gate
            variants = self.choices(probe_items(inputs.gi, inputs.stimuli), "emotion_prompt", results)
            for outcome, gate in zip(variants, self.gates([o.item.record for o in variants])):
                outcome.gate = gate
            results.emotion_prompt = variants
        if progress is not None:
            progress.close()
        return results

    def choices(self, items: list[Item], suite: str, results: Results) -> list[ChoiceOutcome]:
        """The choices' log-likelihoods of every item; truncated prompts are counted in ``results``."""
        records = [item.record for item in items]
        examples, report = choice_examples(self.encoder, records)
        results.truncated[suite] += report.truncated
        results.scored[suite] += len(examples)
        pairs = self._map(lambda shard: by_length(self._loglikelihoods, shard, _example_length), examples)
        scores = group_choices(records, [s for s, _ in pairs], [n for _, n in pairs])
        return [ChoiceOutcome(item, score) for item, score in zip(items, scores)]

    def generate(
        self, prompts: list[str], max_new_tokens: int, temperature: float | None = None, unfiltered: bool = True
    ) -> list[str]:
        """Greedy (or sampled, with ``unfiltered`` as in :func:`generate_texts`) continuations; ranks step
        together (``synced_gpus``): a sharded model needs all at each step."""

        def run(shard: list[str]) -> list[str]:
            # FSDP2: generate() on an encoder-decoder calls the encoder outside the root's forward, so the
            # root's own weights (shared embedding) are gathered around each call; a no-op otherwise.
            with gathered_root(self.model):
                return generate_texts(
                    self.model,
                    self.tokenizer,
                    self.kind,
                    shard,
                    max_new_tokens,
                    self.generation_batch_size,
                    synced_gpus=self.world_size > 1 and dist.is_initialized(),
                    temperature=temperature,
                    unfiltered=unfiltered,
                )

        return self._map(lambda shard: by_length(run, shard, len), prompts)

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
            texts = self.generate([prompts[qid] for qid in pending], new_tokens, temperature, sampling == "plain")
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
        letters) or ``loglikelihood`` (each question as multiple choice, by ``acc`` and ``acc_norm``)."""
        if protocol == "generate":
            system = emobench_suite.system_prompt
            prompts = [
                chat_prompt(self.tokenizer, emobench_suite.user_prompt(i), system(i.task, i.language)) for i in items
            ]
            replies = self.generate(prompts, max_new_tokens)
            return [EmoBenchOutcome(i, emobench_suite.parse_reply(r, i.task), r) for i, r in zip(items, replies)]
        if protocol != "loglikelihood":
            raise ValueError(f"EmoBench protocol {protocol!r} is not one of {list(emobench_suite.PROTOCOLS)}")
        questions = [[from_choice_item(q, "ei") for q in emobench_suite.loglikelihood_questions(i)] for i in items]
        flat = self.choices([q for qs in questions for q in qs], "emobench", results or Results())
        outcomes, at = [], 0
        for item, qs in zip(items, questions):
            chosen = flat[at : at + len(qs)]
            letters = {m: [emobench_suite.LETTERS[o.predicted(m)] for o in chosen] for m in CHOICE_METRICS}
            primary = letters[primary_metric(emobench_suite.SUITE)]
            outcomes.append(EmoBenchOutcome(item, primary, by_metric=letters))
            at += len(qs)
        return outcomes

    def gates(self, records: list[EiRecord]) -> list[float | None]:
        """Mean inter gate over the real prompt tokens of each record, averaged over adapted layers."""
        prompts = [self.encoder.formatter.format(record) for record in records]
        return self._map(lambda shard: by_length(self._prompt_gates, shard, len), prompts)

    def _loglikelihoods(self, examples: list[Example]) -> list[tuple[float, int]]:
        sums, counts = example_loglikelihoods(self.model, examples, self.kind, self.pad_id, self.batch_size)
        return list(zip(sums, counts))

    @torch.no_grad()
    def _prompt_gates(self, prompts: list[str]) -> list[float | None]:
        device = next(self.model.parameters()).device
        gates: list[float | None] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            inputs = dict(encode_prompts(self.tokenizer, batch, self.kind).to(device))
            if self.kind == "seq2seq":  # the prompt is the encoder's input; the decoder sees only its start token
                start_id = self.model.config.decoder_start_token_id
                inputs["decoder_input_ids"] = torch.full((len(batch), 1), start_id, device=device)
            self.model(**inputs, use_cache=False)
            gates += example_gates(self.recorder, "decoder" if self.kind == "causal" else "encoder", len(batch))
        return gates

    def _map(self, fn: Callable[[list[T]], list[R]], units: Sequence[T]) -> list[R]:
        return sharded_map(fn, units, self.rank, self.world_size, self.gather)


def by_length(fn: Callable[[list[T]], list[R]], units: list[T], length: Callable[[T], int]) -> list[R]:
    """``fn`` over ``units`` taken shortest first, so batches pad little; results in the units' own order."""
    order = sorted(range(len(units)), key=lambda i: length(units[i]))
    results = fn([units[i] for i in order])
    ordered: list = [None] * len(units)
    for i, result in zip(order, results):
        ordered[i] = result
    return ordered


def _example_length(example: Example) -> int:
    return len(example.input_ids) + len(example.labels)


def example_gates(recorder: RoutingRecorder | None, stream: str, batch: int) -> list[float | None]:
    """Per example of the last forward: its mean gate over real tokens, averaged over the stream's layers.

    A layer without an inter gate (the ``lora`` baseline, ``inter: none``) applies its adapters to
    every token, so it counts as gate 1, as in the router statistics; without adapters at all
    (``adapter: full``) there is no gate to read and every example gets None.
    """
    layers = [] if recorder is None else [r for r in recorder.records.values() if r.stream == stream]
    if not layers:
        return [None] * batch
    per_layer = []
    for record in layers:
        index = record.example_index
        gate = torch.ones_like(index, dtype=torch.float32) if record.gate is None else record.gate.float()
        sums = torch.zeros(batch, device=index.device).index_add_(0, index, gate)
        counts = torch.zeros(batch, device=index.device).index_add_(0, index, torch.ones_like(gate))
        per_layer.append(sums / counts.clamp_min(1))
    return torch.stack(per_layer).mean(0).tolist()


def chat_prompt(tokenizer: Any, prompt: str, system: str | None = None) -> str:
    """``prompt`` as the user turn of the tokenizer's chat template (after ``system``, if given), ready for the
    reply; without a template, the system text and the prompt one after the other."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt if system is None else f"{system}\n{prompt}"
    messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
