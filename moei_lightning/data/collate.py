"""Pad pretokenised examples into the batch dict that the LightningModule consumes.

Batch contract (every loader of :class:`~moei_lightning.data.MoEIDataModule`):

=================  ==========================  ==================================================
key                type, shape                 meaning
=================  ==========================  ==================================================
``input_ids``      LongTensor (B, T)           causal: prompt + target + EOS; seq2seq: source
``attention_mask`` LongTensor (B, T)           1 on real tokens, 0 on padding
``labels``         LongTensor (B, T) causal,   causal: -100 on prompt and padding, target ids and
                   (B, T_tgt) seq2seq          EOS elsewhere; seq2seq: target + EOS, -100 padding
``domain``         LongTensor (B,)             1 = EI, 0 = GI (the inter-gate target)
``aspect``         list[str]                   perception|cognition|expression|knowledge|...
``task``           list[str]                   the record's task name
``id``             list[str]                   the record's id
=================  ==========================  ==================================================

Evaluation loaders (validation, test, predict) add:

=================  ==========================  ==================================================
``choices``        list[list[str] | None]      the options of multiple-choice records
``target``         list[str]                   the reference output text
``prompt``         list[str]                   the formatted prompt text (no target)
=================  ==========================  ==================================================

Padding is dynamic (to the longest example in the batch). ``input_ids`` and causal ``labels`` are
padded on ``padding_side``; seq2seq ``labels`` are always padded on the right, as decoders expect.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from moei_lightning.data.encode import IGNORE_INDEX, Example, Kind


class Collator:
    """A ``collate_fn``: examples in, contract batch out."""

    def __init__(
        self,
        pad_token_id: int,
        kind: Kind,
        padding_side: Literal["left", "right"] = "right",
        eval_fields: bool = False,
    ) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.kind = kind
        self.padding_side = padding_side
        self.eval_fields = eval_fields

    def __call__(self, examples: list[Example]) -> dict[str, Any]:
        """The batch for ``examples``, in their order."""
        inputs = [e.input_ids for e in examples]
        label_side = self.padding_side if self.kind == "causal" else "right"
        batch: dict[str, Any] = {
            "input_ids": _pad(inputs, self.pad_token_id, self.padding_side),
            "attention_mask": _pad([[1] * len(ids) for ids in inputs], 0, self.padding_side),
            "labels": _pad([e.labels for e in examples], IGNORE_INDEX, label_side),
            "domain": torch.tensor([int(e.record.domain == "ei") for e in examples], dtype=torch.long),
            "aspect": [e.record.aspect for e in examples],
            "task": [e.record.task for e in examples],
            "id": [e.record.id for e in examples],
        }
        if self.eval_fields:
            batch["choices"] = [e.record.choices for e in examples]
            batch["target"] = [e.record.output for e in examples]
            batch["prompt"] = [e.prompt for e in examples]
        return batch


def _pad(rows: list[list[int]], value: int, side: str) -> torch.Tensor:
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        start = width - len(row) if side == "left" else 0
        out[i, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
    return out
