"""Launch a function on N ranks of a local gloo process group, for tests (forked, not spawned).

Forking keeps every import of the test process (seconds instead of ~10 s per spawned rank on
a 2-core machine). Each rank runs with one thread, gets the environment ``torchrun`` would set
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` on a free port) and
writes ``{"ok": ..., "result"/"error": ...}`` to ``<dir>/rank<r>.pt``; a rank that has not
finished after ``timeout`` seconds (``hang.HANG_S``, a safety net) is killed and the test fails
as a hang. ``world=1`` runs the function
in one forked process *without* those variables: the single-process reference, with the same
threading as the ranks.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import socket
from pathlib import Path
from typing import Any, Callable

import torch

from hang import HANG_S, hang


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, out: Path,
           env: dict[str, str]) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("COMPRESSKIT_DIST_TIMEOUT", "60")
    os.environ.update({k: v.format(rank=rank) for k, v in env.items()})
    torch.set_num_threads(1)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            status = {"ok": True, "result": fn(rank, *args)}
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        status = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    status["stdout"] = stdout.getvalue()
    torch.save(status, out / f"rank{rank}.pt")
    os._exit(0)  # never run the forked pytest process's exit handlers


def launch(fn: Callable[..., Any], world: int, out: Path, *args: Any, env: dict[str, str] | None = None,
           timeout: float = HANG_S) -> list[dict[str, Any]]:
    """Run ``fn(rank, *args)`` on ``world`` ranks; returns each rank's status dict, in rank order."""
    out.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, fn, args, out, env or {})) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if hung:
        hang(f"rank(s) {hung} of {world} running {getattr(fn, '__name__', fn)}", timeout)
    results = []
    for r in range(world):
        f = out / f"rank{r}.pt"
        if not f.exists():
            results.append({"ok": False, "error": f"died (exit code {procs[r].exitcode})", "stdout": ""})
        else:
            results.append(torch.load(f, weights_only=True))
            f.unlink()
    return results
