"""The routing side channel: blocks write their gate and expert weights here, never as return values.

A forward pre-hook on the model (and on the encoder of an encoder-decoder model) starts a new
record set and captures the attention masks, so each entry holds real tokens only. Entries are
keyed by layer name: a block recomputed under activation checkpointing overwrites its own entry
with the same values instead of counting twice.

Under ``routing: prompt`` a sequence is routed from its prompt tokens only. The recorder knows which
tokens those are: all real tokens of a forward by default (a prompt on its way to ``generate``, an
encoder's source), fewer inside :meth:`RoutingRecorder.prompt` (teacher-forced forwards, where the
target follows the prompt). The decoder of an encoder-decoder model routes from the pooled encoder
output (:attr:`RoutingRecorder.encoder_summary`), its prompt.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


class RoutingRecorder:
    """Collects one :class:`RoutingRecord` per adapted layer for the current forward."""

    def __init__(self) -> None:
        self.records: dict[str, RoutingRecord] = {}
        self.masks: dict[Stream, torch.Tensor | None] = {"encoder": None, "decoder": None}
        self.enabled = True
        self.continues_cache = False
        self.prompt_mask: torch.Tensor | None = None
        self.forward_prompt: torch.Tensor | None = None  # the prompt mask the current forward started with
        self.decisions: dict[str, Decision] = {}  # per prompt-routed layer, from the last forward that routed
        self.encoder_summary: torch.Tensor | None = None
        self._real_tokens: dict[tuple[Stream, int, int], RealTokens] = {}

    def clear(self) -> None:
        self.records = {}
        self._real_tokens = {}

    def real_tokens(self, stream: Stream, batch: int, length: int, device: torch.device) -> RealTokens:
        """The real tokens of ``stream`` for an input of this shape, shared by the stream's layers."""
        key = (stream, batch, length)
        tokens = self._real_tokens.get(key)
        if tokens is None or tokens.source is not self.masks[stream]:
            tokens = RealTokens(self.token_mask(stream, batch, length), batch, length, device, self.masks[stream])
            self._real_tokens[key] = tokens
        return tokens

    @contextmanager
    def prompt(self, mask: torch.Tensor | None) -> Iterator[None]:
        """Within this block, decoder-stream prompt routing pools only the tokens ``mask`` marks.

        ``mask`` is (batch, P): the first ``P`` positions of every following forward, where true.
        Positions past ``P`` (a target, tokens generated without a cache) are never pooled. Each
        forward keeps the mask it started with until the next forward, so blocks that activation
        checkpointing recomputes during backward, after this block has ended, pool the same tokens.
        """
        previous, self.prompt_mask = self.prompt_mask, mask
        self.forward_prompt = mask
        try:
            yield
        finally:
            self.prompt_mask = previous

    def prompt_token_mask(self, stream: Stream, batch: int, length: int) -> torch.Tensor | None:
        """The (batch, length) bool mask of the prompt's real tokens, or None when every token counts."""
        mask = self.token_mask(stream, batch, length)
        if stream != "decoder" or self.forward_prompt is None:
            return mask
        prompt = self.forward_prompt.bool()
        if prompt.shape[0] != batch:
            raise ValueError(
                f"the prompt mask covers {prompt.shape[0]} sequences but the forward has {batch}; "
                "pass recorder.prompt() the mask of this batch"
            )
        prompt = F.pad(prompt, (0, max(0, length - prompt.shape[1])))[:, :length].to(
            mask.device if mask is not None else prompt.device
        )
        return prompt if mask is None else mask & prompt

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Run extra forwards (evaluation, metrics) and afterwards hold exactly what was held before:
        the records, masks, on/off state and prompt-routing state of the step being monitored.

        Every attribute is saved (dicts copied), so state added to the recorder later is kept too.
        """
        saved = {key: dict(value) if isinstance(value, dict) else value for key, value in vars(self).items()}
        try:
            yield
        finally:
            vars(self).clear()
            vars(self).update(saved)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Like :meth:`snapshot`, and forwards inside record nothing (cheaper when nobody reads them)."""
        with self.snapshot():
            self.enabled = False
            yield

    def token_mask(self, stream: Stream, batch: int, length: int) -> torch.Tensor | None:
        """The (batch, length) bool mask of real tokens for the current input, or None if all are real.

        During cached decoding the mask covers past and new tokens, so its last ``length``
        columns belong to the tokens in this forward.
        """
        mask = self.masks[stream]
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
        if stream == "decoder" and self.continues_cache:
            return True
        mask = self.masks[stream]
        return mask is not None and mask.shape[-1] > length

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
        if not self.enabled:
            return
        tokens = self._decisions(stream, probs.shape[0], probs.shape[1], probs.device, per_sequence)
        self.records[name] = LazyRecord(stream, tokens, gate_logit, probs, probs.shape[-1])

    def record_uniform(
        self, name: str, stream: Stream, batch: int, length: int, device: torch.device, per_sequence: bool = False
    ) -> None:
        """Record a layer with one expert and no gate (plain LoRA): weight 1 everywhere, built only if read."""
        if not self.enabled:
            return
        self.records[name] = LazyRecord(
            stream, self._decisions(stream, batch, length, device, per_sequence), None, None, 1
        )

    def _decisions(
        self, stream: Stream, batch: int, length: int, device: torch.device, per_sequence: bool
    ) -> RealTokens:
        """Where a layer's decisions are: one per sequence (prompt routing), else one per real token."""
        return RealTokens(None, batch, 1, device) if per_sequence else self.real_tokens(stream, batch, length, device)

    def attach(self, model: nn.Module, encoder: nn.Module | None) -> list[torch.utils.hooks.RemovableHandle]:
        """Hook ``model`` (and its encoder) so every forward starts a fresh record with its masks."""
        handles = [model.register_forward_pre_hook(self._model_hook(model), with_kwargs=True)]
        if encoder is not None:
            handles.append(encoder.register_forward_pre_hook(self._encoder_hook(encoder), with_kwargs=True))
            handles.append(encoder.register_forward_hook(self._summarise_encoder))
        return handles

    def _summarise_encoder(self, _module: nn.Module, _args: tuple, output: Any) -> None:
        """Keep the mean of the encoder's output over real source tokens: the decoder's prompt."""
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        mask = self.token_mask("encoder", hidden.shape[0], hidden.shape[1])
        if mask is None:
            self.encoder_summary = hidden.float().mean(1, keepdim=True)
            return
        weights = mask.to(torch.float32).unsqueeze(-1)
        pooled = (hidden.float() * weights).sum(1, keepdim=True)
        self.encoder_summary = pooled / weights.sum(1, keepdim=True).clamp_min(1)

    def _model_hook(self, model: nn.Module) -> Callable[..., None]:
        signature = inspect.signature(model.forward)
        is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))

        def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            bound = signature.bind_partial(*args, **kwargs).arguments
            self.clear()
            self.forward_prompt = self.prompt_mask
            past = bound.get("past_key_values", bound.get("cache"))  # transformers 5 names it `cache`
            self.continues_cache = _cached_length(past) > 0
            if is_encoder_decoder:
                self.masks["encoder"] = bound.get("attention_mask")
                self.masks["decoder"] = bound.get("decoder_attention_mask")
            else:
                self.masks["decoder"] = bound.get("attention_mask")
                self.masks["encoder"] = None

        return hook

    def _encoder_hook(self, encoder: nn.Module) -> Callable[..., None]:
        signature = inspect.signature(encoder.forward)

        def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            self.masks["encoder"] = signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")

        return hook


def _cached_length(past: Any) -> int:
    """Tokens already in a key/value cache (a ``Cache`` object or the legacy tuple); 0 without one."""
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    return int(past[0][0].shape[-2]) if len(past) else 0
