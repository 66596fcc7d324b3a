"""The life of a ``torchrun`` process group: joining it, the current context, the session guard.

Imports torch only inside functions.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Any, Callable, Iterator

from compresskit.engine.distributed.collectives import TIMEOUT_ENV
from compresskit.engine.distributed.context import Context
from compresskit.errors import DistributedError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 1800.0


def launched() -> bool:
    """True inside a multi-process launch (``torchrun`` sets ``WORLD_SIZE`` > 1 and ``RANK``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


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
