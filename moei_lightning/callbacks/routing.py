"""Routing statistics as sums: per adapted layer and token group, over any number of batches and ranks.

Everything kept is a sum over real tokens (token count, gate sum, entropy sum, expert-weight sums,
gate-histogram counts over fixed bins), in one float64 tensor of fixed shape
``(layers, groups, fields)``. Adding two such tensors merges their batches, so gathering across
ranks is a single ``all_reduce(sum)`` whose shape every rank knows in advance.

Token groups: the domains ``ei`` and ``gi`` and the EI aspects. A layer without an inter gate
(``inter: none``, the ``lora`` baseline) applies its adapters to every token, so its gate counts as 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moei_lightning.data import EI_ASPECTS
from moei_lightning.molora import RoutingRecord

ALL = "all"
"""The ``layer`` of rows pooled over every layer, and the ``aspect`` of rows covering a whole domain."""

GROUPS: tuple[tuple[str, str], ...] = (("ei", ALL), ("gi", ALL), *(("ei", aspect) for aspect in EI_ASPECTS))
"""Token groups as ``(domain, aspect)``; ``aspect == "all"`` is the whole domain."""


def group_name(domain: str, aspect: str) -> str:
    """The short name used in logger keys: the aspect, or the domain for a whole domain."""
    return domain if aspect == ALL else aspect


@dataclass(frozen=True)
class Layout:
    """Where each statistic lives along the last axis of the sums tensor."""

    num_experts: int
    num_bins: int

    @property
    def usage(self) -> slice:
        return slice(3, 3 + self.num_experts)

    @property
    def hist(self) -> slice:
        return slice(3 + self.num_experts, 3 + self.num_experts + self.num_bins)

    @property
    def width(self) -> int:
        return 3 + self.num_experts + self.num_bins

    @property
    def edges(self) -> list[float]:
        return torch.linspace(0.0, 1.0, self.num_bins + 1, dtype=torch.float64).tolist()


COUNT, GATE, ENTROPY = 0, 1, 2


def group_membership(domain: torch.Tensor, aspects: list[str]) -> torch.Tensor:
    """(batch, groups) float64: 1 where example ``i`` belongs to group ``j`` of :data:`GROUPS`."""
    columns = []
    for group_domain, group_aspect in GROUPS:
        in_domain = domain.bool() if group_domain == "ei" else ~domain.bool()
        if group_aspect != ALL:
            in_domain = in_domain & torch.tensor([a == group_aspect for a in aspects], device=domain.device)
        columns.append(in_domain)
    return torch.stack(columns, dim=1).to(torch.float64)


def batch_sums(
    records: dict[str, RoutingRecord], layers: list[str], membership: torch.Tensor, layout: Layout
) -> torch.Tensor:
    """The ``(layers, groups, fields)`` sums of one forward; a layer without a record adds nothing."""
    out = torch.zeros(len(layers), len(GROUPS), layout.width, dtype=torch.float64, device=membership.device)
    for i, name in enumerate(layers):
        record = records.get(name)
        if record is None or record.probs.numel() == 0:
            continue
        probs = record.probs.detach().to(torch.float64)
        gate = torch.ones_like(probs[:, 0]) if record.gate is None else record.gate.detach().to(torch.float64)
        tokens = membership[record.example_index]  # (N, groups)
        entropy = -(probs * probs.clamp_min(torch.finfo(torch.float64).tiny).log()).sum(-1)
        bins = (gate * layout.num_bins).long().clamp(0, layout.num_bins - 1)
        per_token = torch.cat(
            [
                torch.ones_like(gate)[:, None],
                gate[:, None],
                entropy[:, None],
                probs,
                torch.nn.functional.one_hot(bins, layout.num_bins).to(torch.float64),
            ],
            dim=1,
        )
        out[i] = tokens.T @ per_token
    return out


def summarise(sums: torch.Tensor, layers: list[str], layout: Layout) -> list[dict[str, Any]]:
    """One row per layer (plus the ``all`` pool) and group with tokens: means, usage and histogram.

    ``usage`` is the mean expert weight p_k (sums to 1 over experts), ``entropy`` the mean router
    entropy in nats, ``gate_hist`` the bin edges and counts of the inter gate over [0, 1].
    """
    sums = sums.cpu()
    pooled = torch.cat([sums, sums.sum(0, keepdim=True)])
    rows = []
    for i, layer in enumerate([*layers, ALL]):
        for j, (domain, aspect) in enumerate(GROUPS):
            stats = pooled[i, j]
            count = float(stats[COUNT])
            if count == 0:
                continue
            rows.append(
                {
                    "layer": layer,
                    "domain": domain,
                    "aspect": aspect,
                    "tokens": int(count),
                    "gate_mean": float(stats[GATE]) / count,
                    "entropy": float(stats[ENTROPY]) / count,
                    "usage": (stats[layout.usage] / count).tolist(),
                    "gate_hist": {"edges": layout.edges, "counts": [int(c) for c in stats[layout.hist].round()]},
                }
            )
    return rows
