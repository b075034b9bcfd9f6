"""Batch samplers: EI/GI mixing for training, fixed-order sharding for evaluation. Both are rank-aware.

The dataset behind the training sampler is the EI examples followed by the GI examples: indices
``0..n_ei-1`` are EI and ``n_ei..n_ei+n_gi-1`` are GI.

How training batches are built, per epoch (``W`` ranks, per-rank batch size ``b``):

1. ``g = round(b * gi_ratio)`` (halves round up) GI examples and ``e = b - g`` EI examples per batch.
2. The EI examples are shuffled with a generator seeded from ``seed + epoch`` and cut into
   ``M = n_ei // e`` micro-batches of ``e``. This is the epoch: every full EI batch once. The
   ``n_ei % e`` examples left over wait for a later epoch, whose shuffle differs.
3. The GI examples form a stream of shuffled passes (a new shuffle each pass, also seeded from
   ``seed + epoch``); micro-batch ``k`` takes GI stream positions ``k*g .. k*g+g-1``. GI is usually
   the smaller set, so GI examples repeat within an epoch.
4. Each rank runs ``S = ceil(M / W)`` steps. Slot ``k = s*W + r`` is rank ``r``'s batch at step
   ``s``; slots ``k >= M`` (at most ``W-1`` of them) reuse EI micro-batch ``k - M`` with fresh GI,
   so every rank has the same number of batches.

So global step ``s`` is slots ``s*W .. s*W+W-1``: EI shuffle positions ``s*W*e .. (s+1)*W*e - 1``
and the matching GI stream positions. One rank with batch ``W*b`` therefore sees the same examples
at every step as ``W`` ranks with batch ``b``, whenever ``round(W*b*gi_ratio) == W*round(b*gi_ratio)``
and ``W`` divides ``M`` (otherwise the single rank's last step is left out instead of wrapped).

Resuming mid-epoch: ``batches_done`` (set by the DataModule to read the Trainer's progress of the
current epoch, restored from the checkpoint) is read when a pass starts, and the pass begins after
those batches; in a fresh epoch it is 0. The Trainer is the source of truth because Lightning
fetches a batch ahead, and because it builds the training loader before it restores a checkpoint
(to count the scheduler's steps), so a loader-side ``load_state_dict`` would come too late.

Lightning calls ``set_epoch`` on ``batch_sampler.sampler`` (not on the batch sampler), which is why
the epoch lives in :class:`EpochPermutation` and the mixing sampler exposes it as ``.sampler``.
Lightning must not inject its own ``DistributedSampler``: the Trainer needs
``use_distributed_sampler=False`` under DDP/FSDP.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator

from torch.utils.data import Sampler

from moei_lightning.data.errors import DataError


def gi_per_batch(batch_size: int, gi_ratio: float) -> int:
    """GI examples in each training batch: ``batch_size * gi_ratio`` rounded half up."""
    return math.floor(batch_size * gi_ratio + 0.5)


class EpochPermutation(Sampler[int]):
    """A shuffled ``range(n)`` that is fixed by ``seed + epoch``; ``set_epoch`` moves to the next shuffle."""

    def __init__(self, n: int, seed: int, stream: str = "ei") -> None:
        self.n = n
        self.seed = seed
        self.stream = stream
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of ``epoch``."""
        self.epoch = epoch

    def permutation(self, part: int = 0) -> list[int]:
        """The shuffle of this epoch; ``part`` numbers further independent shuffles of the same epoch."""
        order = list(range(self.n))
        random.Random(f"{self.stream}:{self.seed + self.epoch}:{part}").shuffle(order)
        return order

    def __iter__(self) -> Iterator[int]:
        return iter(self.permutation())

    def __len__(self) -> int:
        return self.n


class MixedBatchSampler(Sampler[list[int]]):
    """Training batches with a fixed GI share, deterministic per epoch, equal in number on every rank."""

    def __init__(
        self,
        n_ei: int,
        n_gi: int,
        batch_size: int,
        gi_ratio: float,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.n_ei, self.n_gi = n_ei, n_gi
        self.rank, self.world_size = rank, world_size
        self.batch_size = batch_size
        self.gi = gi_per_batch(batch_size, gi_ratio)
        self.ei = batch_size - self.gi
        if gi_ratio > 0 and self.gi == 0:
            raise DataError(
                f"config keys data.batch_size={batch_size}, data.gi_ratio={gi_ratio}: a batch would hold "
                f"{batch_size * gi_ratio:.2f} GI examples, which rounds to none; raise data.batch_size or "
                "data.gi_ratio, or set data.gi_ratio to 0 to train on EI only"
            )
        if self.ei < 1:
            raise DataError(
                f"config keys data.batch_size={batch_size}, data.gi_ratio={gi_ratio}: no room left for EI "
                "examples in a batch; use a data.gi_ratio below 1"
            )
        if self.gi and not n_gi:
            raise DataError(
                f"config key data.gi_ratio={gi_ratio} asks for GI examples, but the GI training set "
                "is empty; set data.gi_train or data.gi_ratio: 0"
            )
        self.micro_batches = n_ei // self.ei
        if not self.micro_batches:
            raise DataError(
                f"the EI training set has {n_ei} examples, fewer than the {self.ei} EI examples of one batch "
                f"(data.batch_size={batch_size}, data.gi_ratio={gi_ratio}); add data or lower data.batch_size"
            )
        self.sampler = EpochPermutation(n_ei, seed, "ei")
        self._gi_order = EpochPermutation(n_gi, seed, "gi")
        self.batches_done: Callable[[], int] = lambda: 0

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of ``epoch`` (Lightning reaches it through ``self.sampler``)."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(self.micro_batches / self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        self._gi_order.set_epoch(self.sampler.epoch)
        ei = self.sampler.permutation()
        gi = self._gi_stream(len(self) * self.world_size * self.gi)
        start = self.batches_done()  # a run resumed mid-epoch continues after the batches it trained on
        for step in range(start if start < len(self) else 0, len(self)):
            slot = step * self.world_size + self.rank
            chunk = slot % self.micro_batches
            ei_part = ei[chunk * self.ei : (chunk + 1) * self.ei]
            gi_part = [self.n_ei + i for i in gi[slot * self.gi : (slot + 1) * self.gi]]
            yield ei_part + gi_part

    def _gi_stream(self, length: int) -> list[int]:
        stream: list[int] = []
        part = 0
        while len(stream) < length:
            stream += self._gi_order.permutation(part)
            part += 1
        return stream


class EvalBatchSampler(Sampler[list[int]]):
    """Evaluation batches in dataset order, split across ranks without repeats and with equal batch counts.

    Rank ``r`` gets examples ``r, r+W, r+2W, ...``. Every rank runs ``K = ceil(ceil(n/W) / batch_size)``
    batches (so FSDP, which needs every rank in every forward, never waits on a rank that has finished),
    and splits its examples into ``K`` batches of near-equal size, at most ``batch_size``. Examples are
    repeated only when a rank has fewer examples than ``K`` (fewer examples than ranks, or batch size 1
    with ``n`` not a multiple of ``W``); the repeats are the rank's first examples, or example 0 for a
    rank with none, and carry the same ``id``, so per-id results can drop them.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.n, self.batch_size = n, batch_size
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.n / self.world_size) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        count = len(self)
        if not count:
            return
        mine = list(range(self.rank, self.n, self.world_size)) or [0]
        while len(mine) < count:
            mine += mine[: count - len(mine)]
        size, extra = divmod(len(mine), count)
        start = 0
        for b in range(count):
            end = start + size + (b < extra)
            yield mine[start:end]
            start = end
