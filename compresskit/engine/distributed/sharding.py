"""How the calibration samples (and evaluation rows) split across ranks: contiguous shards."""

from __future__ import annotations

from typing import Any, Sequence

from compresskit.errors import DistributedError


def sizes(n: int, world_size: int) -> list[int]:
    """How many of ``n`` items each rank gets (contiguous shards, sizes differ by at most one)."""
    base, extra = divmod(n, world_size)
    return [base + (r < extra) for r in range(world_size)]


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s shard of ``n`` items."""
    counts = sizes(n, world_size)
    start = sum(counts[:rank])
    return start, start + counts[rank]


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Rank ``rank``'s contiguous shard of ``items`` (all of them in a single process)."""
    start, stop = shard_range(len(items), rank, world_size)
    return list(items[start:stop])


def require_samples(n: int, world_size: int) -> None:
    """Refuse a run with more ranks than calibration samples."""
    if n < world_size:
        raise DistributedError(f"{world_size} ranks but only {n} calibration samples: every rank needs at "
                               f"least one; start at most {n} processes (torchrun --nproc-per-node/--nnodes) "
                               f"or raise --nsamples to {world_size} or more")
