"""The model runner: log-likelihoods, generation and gate readings for one model, as every caller needs them.

Training's loss, per-aspect metrics, the evaluation suites and the lm-eval model class all call the
model through here, so padding, prompt routing and equal calls across ranks are decided once:

- :func:`sequence_logprobs`: log p of every label token of a batch (causal or seq2seq) from one
  forward (:func:`routed_logits`) whose prompt routing sees the tokens before the targets only.
- :func:`generate_texts`: greedy or sampled, batched generation; causal prompts padded on the left.
- :class:`ModelRunner`: the same over a list of inputs shared by every rank (evaluation): each rank
  takes its shard (:func:`~moei_lightning.ranks.sharded_map`), inputs run shortest first, and every
  rank ends with every result in order; plus the mean inter gate on each prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moei_lightning.data import IGNORE_INDEX, Collator, Example
from moei_lightning.molora import RoutingRecord, routing
from moei_lightning.ranks import Gather, all_gather, sharded_map
from moei_lightning.sharding import gathered_root

T = TypeVar("T")
R = TypeVar("R")


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
    with routing(model, prompt):
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


def pad_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (LLaMA has no pad token)."""
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


class ModelRunner:
    """One model's calls over inputs every rank holds: each rank runs its shard, every rank gets every result.

    Args:
        model: the Hugging Face model (with its adapters), already on its device and in eval mode.
        tokenizer: its tokenizer.
        kind: ``causal`` or ``seq2seq``.
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
        batch_size: int = 8,
        rank: int = 0,
        world_size: int = 1,
        gather: Gather = all_gather,
        generation_batch_size: int | None = None,
    ) -> None:
        self.model, self.tokenizer, self.kind = model, tokenizer, kind
        self.batch_size = batch_size
        self.generation_batch_size = generation_batch_size or batch_size
        self.rank, self.world_size, self.gather = rank, world_size, gather

    def loglikelihoods(self, examples: list[Example]) -> list[tuple[float, int]]:
        """Per example: the summed log-probability of its label tokens and their count."""

        def run(shard: list[Example]) -> list[tuple[float, int]]:
            sums, counts = example_loglikelihoods(self.model, shard, self.kind, pad_id(self.tokenizer), self.batch_size)
            return list(zip(sums, counts))

        return self._map(lambda shard: by_length(run, shard, _example_length), examples)

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

    def gates(self, prompts: list[str]) -> list[float | None]:
        """Mean inter gate over the real tokens of each prompt, averaged over adapted layers (:func:`example_gates`)."""
        return self._map(lambda shard: by_length(self._prompt_gates, shard, len), prompts)

    @torch.no_grad()
    def _prompt_gates(self, prompts: list[str]) -> list[float | None]:
        device = next(self.model.parameters()).device
        stream = "decoder" if self.kind == "causal" else "encoder"
        gates: list[float | None] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            inputs = dict(encode_prompts(self.tokenizer, batch, self.kind).to(device))
            if self.kind == "seq2seq":  # the prompt is the encoder's input; the decoder sees only its start token
                start_id = self.model.config.decoder_start_token_id
                inputs["decoder_input_ids"] = torch.full((len(batch), 1), start_id, device=device)
            with routing(self.model) as capture:
                self.model(**inputs, use_cache=False)
            gates += example_gates(capture.records, stream, len(batch))
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


def example_gates(records: dict[str, RoutingRecord], stream: str, batch: int) -> list[float | None]:
    """Per example of one forward: its mean gate over real tokens, averaged over the stream's layers.

    A layer without an inter gate (the ``lora`` baseline, ``inter: none``) applies its adapters to
    every token, so it counts as gate 1, as in the router statistics; without adapters at all
    (``adapter: full``) there is no gate to read and every example gets None.
    """
    layers = [r for r in records.values() if r.stream == stream]
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
