"""The routing side channel: blocks write their gate and expert weights here, never as return values.

Routing is a per-call context. A caller that wants what routing produced, or that knows which tokens
are the prompt, wraps its model call in :func:`routing`: the prompt mask goes in with the call, and
the records of every forward inside come out in the :class:`Capture` it yields. Nothing else is
set from outside: a forward pre-hook on the model (and on the encoder of an encoder-decoder model)
starts a fresh :class:`Forward` with the attention masks, so each record holds real tokens only.
Records are keyed by layer name: a block recomputed under activation checkpointing overwrites its
own entry with the same values instead of counting twice, and pools the same prompt tokens, because
a forward's state lasts until the next forward starts.

Under ``routing: prompt`` a sequence is routed from its prompt tokens only: all real tokens of a
forward by default (a prompt on its way to ``generate``, an encoder's source), fewer when the call
says so (teacher-forced forwards, where the target follows the prompt). The decoder of an
encoder-decoder model routes from the pooled encoder output, its prompt. Cached decoding reuses the
decision the prompt's forward took.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

Stream = Literal["encoder", "decoder"]


@dataclass
class RoutingRecord:
    """Routing of one adapted layer in one forward: one entry per decision the layer took.

    Under token routing that is every real (non-pad) token, under prompt routing every sequence.
    ``gate`` is (N,) in [0, 1], or ``None`` for ``inter: none``; ``gate_logit`` is its logit (the gate
    loss reads it: a BCE on the saturated probability loses its gradient); ``probs`` is (N, K) and sums to 1
    over experts; ``example_index`` (N,) says which sequence of the batch each decision belongs to,
    so per-example labels (EI or GI) can be spread over them; ``stream`` says which token stream
    the layer saw (encoder or decoder).
    """

    gate: torch.Tensor | None
    probs: torch.Tensor
    example_index: torch.Tensor
    stream: Stream
    gate_logit: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.probs.device


@dataclass(frozen=True)
class Decision:
    """A prompt-routed layer's decision for each sequence, outside autograd, for cached decoding to reuse.

    ``weights`` (sequences, 1, K) are the expert weights ``g * p_k * alpha / r``; ``gate_logit``
    (sequences, 1, 1) or ``None`` and ``probs`` (sequences, 1, K) are what the layer records.
    """

    weights: torch.Tensor
    gate_logit: torch.Tensor | None
    probs: torch.Tensor

    @classmethod
    def of(cls, weights: torch.Tensor, gate_logit: torch.Tensor | None, probs: torch.Tensor) -> Decision:
        return cls(weights.detach(), None if gate_logit is None else gate_logit.detach(), probs.detach())


class RealTokens:
    """Which cells of a (batch, length) grid are real tokens, for every layer of one stream in one forward.

    The index is computed once, on first use (a boolean mask index would cost every layer a nonzero
    and, on a GPU, a host sync); a forward whose records nobody reads never computes it.
    """

    def __init__(
        self, mask: torch.Tensor | None, batch: int, length: int, device: torch.device, source: object = None
    ) -> None:
        self.mask, self.batch, self.length, self.device = mask, batch, length, device
        self.source = source  # the attention mask ``mask`` was cut from: a new forward's mask is another object

    @cached_property
    def index(self) -> torch.Tensor | None:
        """Flat positions of the real tokens, or None when every token is real."""
        return None if self.mask is None else self.mask.reshape(-1).nonzero().squeeze(1)

    @cached_property
    def example_index(self) -> torch.Tensor:
        rows = torch.arange(self.batch, device=self.device)
        grid = rows.repeat_interleave(self.length)
        return grid if self.index is None else grid[self.index]

    def take(self, grid: torch.Tensor) -> torch.Tensor:
        """The real tokens' rows of a (batch, length, C) tensor, as (N, C)."""
        flat = grid.reshape(self.batch * self.length, grid.shape[-1])
        return flat if self.index is None else flat.index_select(0, self.index)


class LazyRecord(RoutingRecord):
    """A record cut out of the layer's (batch, length, .) tensors when first read, so writing it costs nothing."""

    def __init__(
        self,
        stream: Stream,
        tokens: RealTokens,
        gate_logit: torch.Tensor | None,
        probs: torch.Tensor | None,
        experts: int,
    ) -> None:
        self.stream, self._tokens, self._gate_logit = stream, tokens, gate_logit
        self._probs, self._experts = probs, experts

    @cached_property
    def gate_logit(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self._gate_logit is None else self._tokens.take(self._gate_logit).squeeze(-1)

    @cached_property
    def gate(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self.gate_logit is None else torch.sigmoid(self.gate_logit)

    @cached_property
    def probs(self) -> torch.Tensor:  # type: ignore[override]
        if self._probs is None:  # one expert: its weight is 1 on every token
            return torch.ones(self.example_index.shape[0], 1, device=self._tokens.device)
        return self._tokens.take(self._probs)

    @cached_property
    def example_index(self) -> torch.Tensor:  # type: ignore[override]
        return self._tokens.example_index

    @property
    def num_experts(self) -> int:
        return self._experts

    @property
    def device(self) -> torch.device:
        return self._tokens.device


@dataclass
class Capture:
    """What routing produced during one :func:`routing` block: each forward's records, in order."""

    forwards: list[dict[str, RoutingRecord]] = field(default_factory=list)

    @property
    def records(self) -> dict[str, RoutingRecord]:
        """The last forward's records by layer name (empty when no adapted forward ran)."""
        return self.forwards[-1] if self.forwards else {}


@dataclass
class Forward:
    """The routing state of one forward, made by the model's pre-hook and read by the layers.

    ``prompt`` is the (batch, P) mask of the call the forward belongs to; ``decisions`` holds each
    prompt-routed layer's decision, carried over to the forwards that continue this one's cache.
    """

    masks: dict[Stream, torch.Tensor | None] = field(default_factory=lambda: {"encoder": None, "decoder": None})
    prompt: torch.Tensor | None = None
    continues_cache: bool = False
    records: dict[str, RoutingRecord] = field(default_factory=dict)
    decisions: dict[str, Decision] = field(default_factory=dict)
    tokens: dict[tuple[Stream, int, int], RealTokens] = field(default_factory=dict)


@dataclass
class _Call:
    prompt: torch.Tensor | None
    capture: Capture


class RoutingRecorder:
    """Where the adapted layers of one model record their routing; callers use :func:`routing`, layers the rest."""

    def __init__(self) -> None:
        self._forward = Forward()
        self._calls: list[_Call] = []
        self._encoder_summary: torch.Tensor | None = None
        self._in_model = False  # inside the model's own forward (an encoder call within it is part of it)

    @contextmanager
    def call(self, prompt_mask: torch.Tensor | None = None) -> Iterator[Capture]:
        """Within this block, forwards route from the prompt ``prompt_mask`` marks, and are captured.

        ``prompt_mask`` is (batch, P): the first ``P`` positions of every decoder-stream forward, where
        true; positions past ``P`` (a target, tokens generated without a cache) are never pooled.
        ``None`` keeps the enclosing call's mask (every real token outside any call). Every enclosing
        capture sees the forwards too.
        """
        prompt = prompt_mask if prompt_mask is not None or not self._calls else self._calls[-1].prompt
        capture = Capture()
        self._calls.append(_Call(prompt, capture))
        try:
            yield capture
        finally:
            self._calls.pop()

    @property
    def encoder_summary(self) -> torch.Tensor | None:
        """The mean encoder output over real source tokens, from the encoder's latest forward."""
        return self._encoder_summary

    def real_tokens(self, stream: Stream, batch: int, length: int, device: torch.device) -> RealTokens:
        """The real tokens of ``stream`` for an input of this shape, shared by the stream's layers."""
        key, forward = (stream, batch, length), self._forward
        tokens = forward.tokens.get(key)
        if tokens is None or tokens.source is not forward.masks[stream]:
            tokens = RealTokens(self.token_mask(stream, batch, length), batch, length, device, forward.masks[stream])
            forward.tokens[key] = tokens
        return tokens

    def prompt_token_mask(self, stream: Stream, batch: int, length: int) -> torch.Tensor | None:
        """The (batch, length) bool mask of the prompt's real tokens, or None when every token counts."""
        mask = self.token_mask(stream, batch, length)
        if stream != "decoder" or self._forward.prompt is None:
            return mask
        prompt = self._forward.prompt.bool()
        if prompt.shape[0] != batch:
            raise ValueError(
                f"the prompt mask covers {prompt.shape[0]} sequences but the forward has {batch}; "
                "pass routing() the prompt mask of this batch"
            )
        prompt = F.pad(prompt, (0, max(0, length - prompt.shape[1])))[:, :length].to(
            mask.device if mask is not None else prompt.device
        )
        return prompt if mask is None else mask & prompt

    def token_mask(self, stream: Stream, batch: int, length: int) -> torch.Tensor | None:
        """The (batch, length) bool mask of real tokens for the current input, or None if all are real.

        During cached decoding the mask covers past and new tokens, so its last ``length``
        columns belong to the tokens in this forward.
        """
        mask = self._forward.masks[stream]
        if mask is None:
            return None
        if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < length:
            raise ValueError(
                f"the {stream} attention mask has shape {tuple(mask.shape)}, which does not cover an "
                f"input of {batch} sequences x {length} tokens; pass the attention mask that belongs "
                "to the input_ids of this forward"
            )
        return mask[:, -length:].bool()

    def is_incremental(self, stream: Stream, length: int) -> bool:
        """True during cached decoding: the forward continues a filled cache, or the mask is longer than it."""
        if stream == "decoder" and self._forward.continues_cache:
            return True
        mask = self._forward.masks[stream]
        return mask is not None and mask.shape[-1] > length

    def decision(self, name: str) -> Decision | None:
        """The decision layer ``name`` took on the prompt this forward continues, if any."""
        return self._forward.decisions.get(name)

    def keep_decision(self, name: str, decision: Decision) -> None:
        """Keep a prompt-routed layer's decision for the forwards that continue this one's cache."""
        self._forward.decisions[name] = decision

    def record(
        self,
        name: str,
        stream: Stream,
        gate_logit: torch.Tensor | None,
        probs: torch.Tensor,
        per_sequence: bool = False,
    ) -> None:
        """Store a layer's (batch, length, 1) gate logit and (batch, length, K) weights, minus padding.

        ``per_sequence`` (prompt routing): the tensors hold one decision per sequence, (batch, 1, .),
        stored once per sequence.
        """
        tokens = self._decisions(stream, probs.shape[0], probs.shape[1], probs.device, per_sequence)
        self._forward.records[name] = LazyRecord(stream, tokens, gate_logit, probs, probs.shape[-1])

    def record_uniform(
        self, name: str, stream: Stream, batch: int, length: int, device: torch.device, per_sequence: bool = False
    ) -> None:
        """Record a layer with one expert and no gate (plain LoRA): weight 1 everywhere, built only if read."""
        tokens = self._decisions(stream, batch, length, device, per_sequence)
        self._forward.records[name] = LazyRecord(stream, tokens, None, None, 1)

    def _decisions(
        self, stream: Stream, batch: int, length: int, device: torch.device, per_sequence: bool
    ) -> RealTokens:
        """Where a layer's decisions are: one per sequence (prompt routing), else one per real token."""
        return RealTokens(None, batch, 1, device) if per_sequence else self.real_tokens(stream, batch, length, device)

    def attach(self, model: nn.Module, encoder: nn.Module | None) -> list[torch.utils.hooks.RemovableHandle]:
        """Hook ``model`` (and its encoder) so every forward starts a fresh :class:`Forward` with its masks."""
        handles = [
            model.register_forward_pre_hook(self._model_hook(model), with_kwargs=True),
            model.register_forward_hook(self._model_done, always_call=True),
        ]
        if encoder is not None:
            handles.append(encoder.register_forward_pre_hook(self._encoder_hook(encoder), with_kwargs=True))
            handles.append(encoder.register_forward_hook(self._summarise_encoder))
        return handles

    def _summarise_encoder(self, _module: nn.Module, _args: tuple, output: Any) -> None:
        """Keep the mean of the encoder's output over real source tokens: the decoder's prompt."""
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        mask = self.token_mask("encoder", hidden.shape[0], hidden.shape[1])
        if mask is None:
            self._encoder_summary = hidden.float().mean(1, keepdim=True)
            return
        weights = mask.to(torch.float32).unsqueeze(-1)
        pooled = (hidden.float() * weights).sum(1, keepdim=True)
        self._encoder_summary = pooled / weights.sum(1, keepdim=True).clamp_min(1)

    def _model_hook(self, model: nn.Module) -> Callable[..., None]:
        signature = inspect.signature(model.forward)
        is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))

        def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            bound = signature.bind_partial(*args, **kwargs).arguments
            past = bound.get("past_key_values", bound.get("cache"))  # transformers 5 names it `cache`
            continues = _cached_length(past) > 0
            if is_encoder_decoder:
                masks = {"encoder": bound.get("attention_mask"), "decoder": bound.get("decoder_attention_mask")}
                ids = bound.get("decoder_input_ids")
            else:
                masks = {"encoder": None, "decoder": bound.get("attention_mask")}
                ids = bound.get("input_ids")
            mask = masks["decoder"]
            extends = continues or (mask is not None and ids is not None and mask.shape[-1] > ids.shape[-1])
            self._in_model = True
            # a forward that extends the previous one's sequences keeps the decisions their prompts got
            self._start(Forward(masks, continues_cache=continues, decisions=self._forward.decisions if extends else {}))

        return hook

    def _model_done(self, *_: Any) -> None:
        self._in_model = False

    def _start(self, forward: Forward) -> None:
        """Make ``forward`` the current one, routed from the innermost call's prompt and seen by every capture."""
        forward.prompt = self._calls[-1].prompt if self._calls else None
        self._forward = forward
        for call in self._calls:
            call.capture.forwards.append(forward.records)

    def _encoder_hook(self, encoder: nn.Module) -> Callable[..., None]:
        signature = inspect.signature(encoder.forward)

        def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            mask = signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
            if self._in_model:
                self._forward.masks["encoder"] = mask
            else:  # generate() runs the encoder on its own, before the first decoder forward
                self._start(Forward(masks={"encoder": mask, "decoder": None}))

        return hook


@contextmanager
def routing(model: nn.Module, prompt_mask: torch.Tensor | None = None) -> Iterator[Capture]:
    """Run model calls inside this block routed from ``prompt_mask`` (see :meth:`RoutingRecorder.call`), and
    capture what routing produced; a model without adapters yields an empty capture."""
    recorder: RoutingRecorder | None = getattr(model, "molora_recorder", None)
    if recorder is None:
        yield Capture()
        return
    with recorder.call(prompt_mask) as capture:
        yield capture


def _cached_length(past: Any) -> int:
    """Tokens already in a key/value cache (a ``Cache`` object or the legacy tuple); 0 without one."""
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    return int(past[0][0].shape[-2]) if len(past) else 0
