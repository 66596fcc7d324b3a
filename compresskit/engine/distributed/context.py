"""The process group of a ``torchrun`` launch: ranks, sharding, checked collectives, the session guard.

See :mod:`compresskit.engine.distributed` for the design. Imports torch only inside functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

from compresskit.errors import CompressKitError, DistributedError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

TIMEOUT_ENV = "COMPRESSKIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0
BUCKET_BYTES = 64 << 20
ACCUMULATE = ("float32", "float64")


def launched() -> bool:
    """True inside a multi-process launch (``torchrun`` sets ``WORLD_SIZE`` > 1 and ``RANK``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


@dataclasses.dataclass
class Context:
    """This process's place in a run: its rank, the world size, and the collectives it uses.

    The default instance (``world_size`` 1) is the single-process run: sharding keeps
    everything, reductions and checks return at once.
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

    # ------------------------------------------------------------------ sharding

    def sizes(self, n: int) -> list[int]:
        """How many of ``n`` items each rank gets (contiguous shards, sizes differ by at most one)."""
        base, extra = divmod(n, self.world_size)
        return [base + (r < extra) for r in range(self.world_size)]

    def shard_range(self, n: int) -> tuple[int, int]:
        """``(start, stop)`` of this rank's shard of ``n`` items."""
        sizes = self.sizes(n)
        start = sum(sizes[: self.rank])
        return start, start + sizes[self.rank]

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's contiguous shard of ``items`` (all of them in a single process)."""
        start, stop = self.shard_range(len(items))
        return list(items[start:stop])

    def require_samples(self, n: int) -> None:
        """Refuse a run with more ranks than calibration samples."""
        if n < self.world_size:
            raise DistributedError(f"{self.world_size} ranks but only {n} calibration samples: every rank needs at "
                                   f"least one; start at most {n} processes (torchrun --nproc-per-node/--nnodes) "
                                   f"or raise --nsamples to {self.world_size} or more")

    def device(self, dev: torch.device) -> torch.device:
        """This rank's compute device: ``cuda`` without an index becomes ``cuda:<local rank>``."""
        import torch

        if not self.enabled or dev.type != "cuda":
            return dev
        if dev.index is None:
            count = torch.cuda.device_count()
            if self.local_rank >= count:
                raise DistributedError(f"local rank {self.local_rank} has no GPU: {count} CUDA device(s) are visible "
                                       f"on this node; start at most {count} processes per node (--nproc-per-node)")
            dev = torch.device("cuda", self.local_rank)
        elif int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise DistributedError(f"--device {dev} would put every rank of this node on one GPU; give --device cuda "
                                   "(or auto): each rank then computes on cuda:<LOCAL_RANK>")
        torch.cuda.set_device(dev)
        self.gpu = dev if "nccl" in (self.backend or "") else None
        return dev

    def backend_for(self, dev: Any) -> str:
        """The backend that carries statistics living on ``dev`` (``nccl`` on CUDA, else ``gloo``)."""
        import torch

        return "nccl" if torch.device(dev).type == "cuda" and "nccl" in (self.backend or "") else "gloo"

    # ------------------------------------------------------------------ collectives

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
        via = self.gpu if self.gpu is not None else torch.device("cpu")
        in_place = len(bucket) == 1 and bucket[0].is_contiguous() and home == via
        flat = bucket[0] if in_place else torch.cat([t.reshape(-1) for t in bucket]).to(via)
        self.comm_bytes += flat.numel() * flat.element_size()
        self._call(f"the all-reduce of {what}", dist.all_reduce, flat)
        if not in_place:
            flat, offset = flat.to(home), 0
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
        import torch
        import torch.distributed as dist

        via = self.gpu if self.gpu is not None else torch.device("cpu")
        buf = tensor if tensor.device == via and tensor.is_contiguous() else tensor.to(via).contiguous()
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

    @contextlib.contextmanager
    def writer_first(self) -> Iterator[None]:
        """Rank 0 runs the body first (filling shared caches), the others after it (reading them)."""
        if self.enabled and not self.is_writer:
            self.check()
        yield
        if self.enabled and self.is_writer:
            self.check()

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self.broken = True
            raise DistributedError(f"rank {self.rank} lost contact with the other ranks during {what} ({exc}); "
                                   "another rank died or hung: see its log (a hung rank is given up after "
                                   f"${TIMEOUT_ENV} seconds)") from exc

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


_SINGLE = Context()
_CURRENT = _SINGLE


def current() -> Context:
    """The context of this process: the active :func:`session`, else a single-process one."""
    return _CURRENT


@contextlib.contextmanager
def session() -> Iterator[Context]:
    """Join the ``torchrun`` process group for the duration of a command (re-entrant).

    Outside a multi-process launch this yields the single-process context and does nothing.
    On a normal exit every rank waits for the others (and raises if one of them failed); on an
    error this rank reports it to the others before re-raising, so that all stop together.
    """
    global _CURRENT
    if _CURRENT.enabled or not launched():
        yield _CURRENT
        return
    ctx = _start()
    _CURRENT = ctx
    level = logging.getLogger("compresskit").level
    if not ctx.is_writer:  # one copy of the informational lines, from rank 0
        logging.getLogger("compresskit").setLevel(logging.WARNING)
    try:
        yield ctx
        ctx.check()
    except Exception as exc:
        if not ctx.broken:
            with contextlib.suppress(DistributedError):
                ctx.check(failed=exc)
        raise
    finally:
        _CURRENT = _SINGLE
        logging.getLogger("compresskit").setLevel(level)
        ctx.close()


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: run ``fn`` inside :func:`session` (commands and API entry points)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with session():
            return fn(*args, **kwargs)

    return wrapper


def _start() -> Context:
    import datetime
    import socket

    import torch
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=_timeout())
    owns = not dist.is_initialized()
    if owns:
        nccl = torch.cuda.is_available() and dist.is_nccl_available()
        try:
            dist.init_process_group("cpu:gloo,cuda:nccl" if nccl else "gloo", timeout=timeout)
        except Exception as exc:
            raise DistributedError(f"could not join the process group of this torchrun launch ({exc}); check "
                                   "MASTER_ADDR/MASTER_PORT (or --rdzv-endpoint) and that every node runs the "
                                   "same torchrun command") from exc
    backend = str(dist.get_backend())
    control = dist.new_group(backend="gloo", timeout=timeout) if "nccl" in backend else None
    ctx = Context(rank=dist.get_rank(), world_size=dist.get_world_size(),
                  local_rank=int(os.environ.get("LOCAL_RANK", "0")), backend=backend, control=control, owns_group=owns)
    hosts: list[Any] = [None] * ctx.world_size
    ctx._call("the start-up", dist.all_gather_object, hosts, socket.gethostname(), group=control)
    ctx.nodes = len(set(hosts))
    if ctx.is_writer:
        log.info("distributed run: %d ranks on %d node(s), backend %s", ctx.world_size, ctx.nodes, backend)
    return ctx


def _timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        value = -1.0
    if not value > 0:
        raise DistributedError(f"${TIMEOUT_ENV}={raw!r} is not a positive number of seconds; unset it or set e.g. 600")
    return value


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
