"""This process's place in a ``torchrun`` run: rank, world size, shards, and the collectives it uses.

See :mod:`compresskit.engine.distributed` for the design. The concerns live in their own modules:
:mod:`~compresskit.engine.distributed.sharding` (who gets which samples),
:mod:`~compresskit.engine.distributed.collectives` (checked sums, gathers, broadcasts) and
:mod:`~compresskit.engine.distributed.lifecycle` (joining the process group, the session guard);
a rank's device is chosen by :func:`compresskit.engine.device.compute_device`. Imports torch only
inside functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Sequence

from compresskit.engine.distributed import sharding
from compresskit.engine.distributed.collectives import BUCKET_BYTES, TIMEOUT_ENV, Collectives, _buckets  # noqa: F401

ACCUMULATE = ("float32", "float64")


@dataclasses.dataclass
class Context(Collectives):
    """This process's place in a run: its rank, the world size, and the collectives it uses.

    The default instance (``world_size`` 1) is the single-process run: sharding keeps
    everything, reductions and checks return at once. Its device is chosen by
    :func:`compresskit.engine.device.compute_device` (which records ``gpu``).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    nodes: int = 1
    backend: str | None = None
    control: Any = None  # a gloo group for status and small objects when the default group is NCCL
    gpu: Any = None  # this rank's CUDA device once chosen (with NCCL): where the all-reduces run
    owns_group: bool = False
    broken: bool = False
    comm_seconds: float = 0.0
    comm_bytes: int = 0
    decide_seconds: float = 0.0  # wall time of the (split) layer decisions, for the manifest
    decide_started: float = 0.0

    @property
    def enabled(self) -> bool:
        """True when several ranks share the run."""
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0: the one that writes outputs, manifests and caches, and shows progress."""
        return self.rank == 0

    # ------------------------------------------------------------------ sharding (see .sharding)

    def sizes(self, n: int) -> list[int]:
        """How many of ``n`` items each rank gets (contiguous shards, sizes differ by at most one)."""
        return sharding.sizes(n, self.world_size)

    def shard_range(self, n: int) -> tuple[int, int]:
        """``(start, stop)`` of this rank's shard of ``n`` items."""
        return sharding.shard_range(n, self.rank, self.world_size)

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's contiguous shard of ``items`` (all of them in a single process)."""
        return sharding.shard(items, self.rank, self.world_size)

    def require_samples(self, n: int) -> None:
        """Refuse a run with more ranks than calibration samples."""
        sharding.require_samples(n, self.world_size)

    def backend_for(self, dev: Any) -> str:
        """The backend that carries statistics living on ``dev`` (``nccl`` on CUDA, else ``gloo``)."""
        from compresskit.engine.device import is_cuda

        return "nccl" if is_cuda(dev) and "nccl" in (self.backend or "") else "gloo"

    @contextlib.contextmanager
    def writer_first(self) -> Iterator[None]:
        """Rank 0 runs the body first (filling shared caches), the others after it (reading them)."""
        if self.enabled and not self.is_writer:
            self.check()
        yield
        if self.enabled and self.is_writer:
            self.check()

    def describe(self, nsamples: int, device: Any) -> dict[str, Any]:
        """Facts for the manifest: world size, backend, nodes and the per-rank sample counts."""
        return {"world_size": self.world_size, "backend": self.backend_for(device), "nodes": self.nodes,
                "samples_per_rank": self.sizes(nsamples)}

    def close(self) -> None:
        import gc

        import torch.distributed as dist

        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        elif self.control is not None:
            dist.destroy_process_group(self.control)
        self.control = None
        # Collect the process groups now: left to interpreter shutdown, their gloo threads can still
        # be joinable there and abort the process ("terminate called without an active exception").
        gc.collect()
