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
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

Stream = Literal["encoder", "decoder"]


@dataclass
class RoutingRecord:
    """Routing of one adapted layer in one forward: one entry per decision the layer took.

    Under token routing that is every real (non-pad) token, under prompt routing every sequence.
    ``gate`` is (N,) in [0, 1], or ``None`` for ``inter: none``; ``probs`` is (N, K) and sums to 1
    over experts; ``example_index`` (N,) says which sequence of the batch each decision belongs to,
    so per-example labels (EI or GI) can be spread over them; ``stream`` says which token stream
    the layer saw (encoder or decoder).
    """

    gate: torch.Tensor | None
    probs: torch.Tensor
    example_index: torch.Tensor
    stream: Stream


class RoutingRecorder:
    """Collects one :class:`RoutingRecord` per adapted layer for the current forward."""

    def __init__(self) -> None:
        self.records: dict[str, RoutingRecord] = {}
        self.masks: dict[Stream, torch.Tensor | None] = {"encoder": None, "decoder": None}
        self.enabled = True
        self.continues_cache = False
        self.prompt_mask: torch.Tensor | None = None
        self.prompt_cache: dict[str, torch.Tensor] = {}
        self.encoder_summary: torch.Tensor | None = None

    def clear(self) -> None:
        self.records = {}

    @contextmanager
    def prompt(self, mask: torch.Tensor | None) -> Iterator[None]:
        """Within this block, decoder-stream prompt routing pools only the tokens ``mask`` marks.

        ``mask`` is (batch, P): the first ``P`` positions of every following forward, where true.
        Positions past ``P`` (a target, tokens generated without a cache) are never pooled.
        """
        previous, self.prompt_mask = self.prompt_mask, mask
        try:
            yield
        finally:
            self.prompt_mask = previous

    def prompt_token_mask(self, stream: Stream, batch: int, length: int) -> torch.Tensor | None:
        """The (batch, length) bool mask of the prompt's real tokens, or None when every token counts."""
        mask = self.token_mask(stream, batch, length)
        if stream != "decoder" or self.prompt_mask is None:
            return mask
        prompt = self.prompt_mask.bool()
        if prompt.shape[0] != batch:
            raise ValueError(
                f"the prompt mask covers {prompt.shape[0]} sequences but the forward has {batch}; "
                "pass recorder.prompt() the mask of this batch"
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
        self, name: str, stream: Stream, gate: torch.Tensor | None, probs: torch.Tensor, per_sequence: bool = False
    ) -> None:
        """Store a layer's (batch, length, 1) gate and (batch, length, K) weights, minus padding.

        ``per_sequence`` (prompt routing): the tensors hold one decision per sequence, (batch, 1, .),
        stored once per sequence.
        """
        if not self.enabled:
            return
        batch, length = probs.shape[0], probs.shape[1]
        if per_sequence:
            self.records[name] = RoutingRecord(
                gate=None if gate is None else gate.reshape(batch),
                probs=probs.reshape(batch, -1),
                example_index=torch.arange(batch, device=probs.device),
                stream=stream,
            )
            return
        mask = self.token_mask(stream, batch, length)
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.bool, device=probs.device)
        example_index = torch.arange(batch, device=probs.device)[:, None].expand(batch, length)[mask]
        self.records[name] = RoutingRecord(
            gate=None if gate is None else gate.squeeze(-1)[mask],
            probs=probs[mask],
            example_index=example_index,
            stream=stream,
        )

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
