"""Split evaluation work over ranks so that every rank makes the same model calls, then collect it.

Under FSDP every forward (and every generation step) is a collective: a rank that runs one more
batch than the others waits forever. So each rank gets exactly ``ceil(n / world_size)`` units, the
last unit repeated as padding, and the repeats are dropped again when the results are put back in
order. Units are dealt round-robin (unit ``i`` to rank ``i % world_size``), which spreads long and
short inputs evenly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")
R = TypeVar("R")

Gather = Callable[[object, int], list]


def shard(units: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's units; every rank gets the same number (none when there are no units at all)."""
    if not units:
        return []
    per_rank = -(-len(units) // world_size)
    padded = [*units, *[units[-1]] * (per_rank * world_size - len(units))]
    return padded[rank::world_size]


def merge(per_rank: Sequence[Sequence[R]], total: int) -> list[R]:
    """Undo :func:`shard`: the results of ``total`` units in their original order, padding dropped."""
    world_size = len(per_rank)
    return [per_rank[i % world_size][i // world_size] for i in range(total)]


def all_gather(obj: object, world_size: int) -> list:
    """``obj`` from every rank, in rank order (no communication on a single process)."""
    if world_size == 1:
        return [obj]
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def sharded_map(
    fn: Callable[[list[T]], list[R]],
    units: Sequence[T],
    rank: int,
    world_size: int,
    gather: Gather = all_gather,
) -> list[R]:
    """``fn`` over ``units``, each rank taking its shard; every rank gets every result, in order."""
    mine = shard(units, rank, world_size)
    local = fn(mine)
    if len(local) != len(mine):
        raise ValueError(f"sharded_map: {len(local)} results for {len(mine)} units; fn must return one per unit")
    return merge(gather(local, world_size), len(units))
