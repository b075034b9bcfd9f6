"""Every rank makes the same model calls: the one place that keeps sharded ranks in step.

Under FSDP every forward (and every generation step) is a collective: a rank that runs one more
batch than the others waits forever.

- :func:`sharded_map`: work every rank knows (an evaluation's items). Each rank gets exactly
  ``ceil(n / world_size)`` units, the last unit repeated as padding, and the repeats are dropped again
  when the results are put back in order. Units are dealt round-robin (unit ``i`` to rank
  ``i % world_size``), which spreads long and short inputs evenly; every rank gets every result.
- :func:`local_map`: work each rank holds alone (its own batch). Ranks agree on the longest count,
  the shorter ones pad with repeats, and the repeats' results are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
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


def local_map(
    fn: Callable[[list[T]], list[R]], units: list[T], filler: T, device: torch.device | str = "cpu"
) -> list[R]:
    """``fn`` over this rank's own ``units`` with as many units on every rank of the process group.

    A rank with fewer units pads with its first unit (``filler`` when it has none) up to the longest
    rank's count; the padding's results are dropped. Without a process group it is just ``fn(units)``.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn(units)
    longest = torch.tensor(len(units), device=device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    padded = units + [units[0] if units else filler] * (int(longest) - len(units))
    return fn(padded)[: len(units)]
