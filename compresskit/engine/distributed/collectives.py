"""Checked collectives of a ``torchrun`` launch: status exchange, sums, gathers, broadcasts.

:class:`Collectives` is the part of :class:`~compresskit.engine.distributed.context.Context` that
talks to the other ranks; every collective is preceded by a status exchange (:meth:`check`) so
that a failed rank stops all of them. Device crossings (CPU parts summed on the GPU under NCCL)
go through :mod:`compresskit.engine.device`. Imports torch only inside functions.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

from compresskit.engine.device import as_device, to_device
from compresskit.errors import CompressKitError, DistributedError

if TYPE_CHECKING:
    import torch

TIMEOUT_ENV = "COMPRESSKIT_DIST_TIMEOUT"
BUCKET_BYTES = 64 << 20


class Collectives:
    """Collectives over the ranks of a run; a single-process context returns at once.

    Needs the attributes of :class:`~compresskit.engine.distributed.context.Context` (``rank``,
    ``world_size``, ``enabled``, ``control``, ``gpu``, ``broken`` and the communication counters).
    """


    def check(self, failed: BaseException | None = None) -> None:
        """Status exchange before every collective: raise if another rank failed.

        With ``failed`` (the :func:`session` guard calls it so), this rank reports its own
        error to the others and returns; they raise :class:`DistributedError` with its message.
        """
        if not self.enabled or self.broken:
            return
        import torch
        import torch.distributed as dist

        flags = torch.zeros(self.world_size, dtype=torch.int64)
        flags[self.rank] = int(failed is not None)
        self._call("a status exchange", dist.all_reduce, flags, group=self.control)
        bad = flags.nonzero().flatten().tolist()
        if not bad:
            return
        messages: list[Any] = [None] * self.world_size
        self._call("a failure report", dist.all_gather_object, messages, _describe(failed), group=self.control)
        self.broken = True  # no more collectives: the others are stopping too
        if failed is None:
            also = f" (ranks {', '.join(map(str, bad[1:]))} failed too)" if len(bad) > 1 else ""
            raise DistributedError(f"rank {bad[0]} of {self.world_size} failed: {messages[bad[0]]}{also}")

    def all_reduce(self, tree: Mapping[str, Any], what: str = "statistics") -> Mapping[str, Any]:
        """Sum every tensor of a (nested) tree across ranks, in place; returns ``tree``."""
        if not self.enabled:
            return tree
        from compresskit.stats import leaves

        self.check()
        t0 = time.perf_counter()
        for bucket in _buckets([t for _, t in leaves(tree)], BUCKET_BYTES):
            self._reduce(bucket, what)
        self.comm_seconds += time.perf_counter() - t0
        return tree

    def _reduce(self, bucket: list[torch.Tensor], what: str) -> None:
        """All-reduce one bucket: on this rank's GPU under NCCL (CPU parts are copied there and
        back, e.g. the gradient sums), else on the CPU with gloo."""
        import torch
        import torch.distributed as dist

        home = bucket[0].device
        via = self.gpu if self.gpu is not None else as_device("cpu")
        in_place = len(bucket) == 1 and bucket[0].is_contiguous() and home == via
        flat = bucket[0] if in_place else to_device(torch.cat([t.reshape(-1) for t in bucket]), via)
        self.comm_bytes += flat.numel() * flat.element_size()
        self._call(f"the all-reduce of {what}", dist.all_reduce, flat)
        if not in_place:
            flat, offset = to_device(flat, home), 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].reshape(t.shape))
                offset += t.numel()

    def concat(self, part: torch.Tensor, total: int) -> torch.Tensor:
        """Every rank's shard of ``total`` rows (this rank's is ``part``), concatenated in rank order.

        Exact: each row is added to zeros only. Used to shard evaluation.
        """
        if not self.enabled:
            return part
        import torch

        start, stop = self.shard_range(total)
        if part.shape[0] != stop - start:
            raise CompressKitError(f"rank {self.rank} holds {part.shape[0]} rows of its shard, expected {stop - start}")
        full = torch.zeros((total, *part.shape[1:]), dtype=part.dtype, device=part.device)
        full[start:stop] = part
        self.all_reduce({"rows": full}, "evaluation results")
        return full

    def gather(self, value: Any) -> list[Any]:
        """Every rank's (picklable) ``value``, in rank order."""
        if not self.enabled:
            return [value]
        import torch.distributed as dist

        self.check()
        out: list[Any] = [None] * self.world_size
        self._call("a gather", dist.all_gather_object, out, value, group=self.control)
        return out

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        """Overwrite ``tensor`` on every rank with rank ``src``'s (in place; call :meth:`check` first)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        via = self.gpu if self.gpu is not None else as_device("cpu")
        buf = tensor if tensor.device == via and tensor.is_contiguous() else to_device(tensor, via).contiguous()
        t0 = time.perf_counter()
        self._call("a broadcast", dist.broadcast, buf, src=src)
        self.comm_seconds += time.perf_counter() - t0
        self.comm_bytes += buf.numel() * buf.element_size() if self.rank == src else 0
        if buf is not tensor:
            tensor.copy_(buf)

    def agree(self, values: Mapping[str, str]) -> None:
        """Raise on every rank unless every rank holds the same ``values`` (digests by name)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        self.check()
        gathered: list[Any] = [None] * self.world_size
        self._call("a consistency check", dist.all_gather_object, gathered, dict(values), group=self.control)
        for name in values:
            differ = [r for r, g in enumerate(gathered) if g[name] != gathered[0][name]]
            if differ:
                raise DistributedError(f"the ranks disagree on {name}: rank 0 has {gathered[0][name][:16]}, rank "
                                       f"{differ[0]} has {gathered[differ[0]][name][:16]}; every rank must load the "
                                       "same model and data with the same options and versions (on every node)")

    def from_writer(self, load: Callable[[], Mapping[str, torch.Tensor] | None]) -> dict[str, torch.Tensor] | None:
        """``load()`` on rank 0 (e.g. a cache lookup), its flat dict of CPU tensors (or None) sent to all."""
        if not self.enabled:
            return load()
        import torch
        import torch.distributed as dist

        value = load() if self.is_writer else None
        self.check()
        meta = [None if value is None else {k: (tuple(v.shape), str(v.dtype).split(".")[-1]) for k, v in value.items()}]
        self._call("a broadcast", dist.broadcast_object_list, meta, src=0, group=self.control)
        if meta[0] is None:
            return None
        t0 = time.perf_counter()
        out = {}
        for key, (shape, dtype) in sorted(meta[0].items()):
            t = value[key].contiguous() if self.is_writer else torch.empty(shape, dtype=getattr(torch, dtype))
            self._call("a broadcast", dist.broadcast, t, src=0, group=self.control)
            self.comm_bytes += t.numel() * t.element_size()
            out[key] = t
        self.comm_seconds += time.perf_counter() - t0
        return out

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self.broken = True
            raise DistributedError(f"rank {self.rank} lost contact with the other ranks during {what} ({exc}); "
                                   "another rank died or hung: see its log (a hung rank is given up after "
                                   f"${TIMEOUT_ENV} seconds)") from exc



def _describe(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    return str(exc) if isinstance(exc, CompressKitError) else f"{type(exc).__name__}: {exc}"


def _buckets(tensors: Iterable[torch.Tensor], cap: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive tensors of one dtype and device, grouped up to ``cap`` bytes (large ones alone)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (t.dtype != bucket[0].dtype or t.device != bucket[0].device or size + nbytes > cap):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket
