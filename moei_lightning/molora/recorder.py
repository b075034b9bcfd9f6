"""The routing side channel: blocks write their gate and expert weights here, never as return values.

A forward pre-hook on the model (and on the encoder of an encoder-decoder model) starts a new
record set and captures the attention masks, so each entry holds real tokens only. Entries are
keyed by layer name: a block recomputed under activation checkpointing overwrites its own entry
with the same values instead of counting twice.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

Stream = Literal["encoder", "decoder"]


@dataclass
class RoutingRecord:
    """Routing of one adapted layer in one forward, over real (non-pad) tokens only.

    ``gate`` is (N,) in [0, 1], or ``None`` for ``inter: none``; ``probs`` is (N, K) and sums to 1
    over experts; ``example_index`` (N,) says which sequence of the batch each token belongs to, so
    per-example labels (EI or GI) can be spread over tokens; ``stream`` says which token stream
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
        self.sequence_cache: dict[str, torch.Tensor] = {}

    def clear(self) -> None:
        self.records = {}

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
        """True during cached decoding: the mask is longer than the tokens of this forward."""
        mask = self.masks[stream]
        return mask is not None and mask.shape[-1] > length

    def record(self, name: str, stream: Stream, gate: torch.Tensor | None, probs: torch.Tensor) -> None:
        """Store a layer's (batch, length, 1) gate and (batch, length, K) weights, minus padding."""
        if not self.enabled:
            return
        batch, length = probs.shape[0], probs.shape[1]
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
        return handles

    def _model_hook(self, model: nn.Module) -> Callable[..., None]:
        signature = inspect.signature(model.forward)
        is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))

        def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            bound = signature.bind_partial(*args, **kwargs).arguments
            self.clear()
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
