"""CUDA graphs for the OBS sweep: one block's column loop replayed as a single launch.

The sweep (:func:`compresskit.obs.obs_sweep`) runs two small kernels per column, about 35k columns
per LLaMA-7B block; on a GPU their launches, not their arithmetic, set its time. Where the mask
of a block is fixed before its columns are swept (a fixed mask, SparseGPT's unstructured
selection: not N:M, which selects every m columns), the block's loop is the same sequence of
kernels on tensors of the same shape every time. It is captured once per shape into a CUDA
graph on static buffers: each block is copied in, the graph replayed, the result copied out.
The kernels are those of the eager loop on the same numbers, so the values are the same.

Safety: a graph is used only after it reproduced the eager loop bit for bit on a test block
(else a warning, and the eager loop for that shape); any failure to capture falls back to the
eager loop too. ``$COMPRESSKIT_CUDA_GRAPHS=0`` turns graphs off, ``1`` (default ``auto``) on
CUDA. On the CPU there is nothing to capture.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

log = logging.getLogger(__name__)

ENV = "COMPRESSKIT_CUDA_GRAPHS"
Capture = Callable[[Callable[[], None]], Callable[[], None]]  # body -> replay
# (block, its rows, the divisors' rows, the errors' rows, U's rows, start, stop): the column loop
Columns = Callable[..., None]

_graphs: dict[tuple, BlockGraph | None] = {}


def enabled(device: torch.device) -> bool:
    """Whether the sweep may use graphs on ``device`` (CUDA, unless ``$COMPRESSKIT_CUDA_GRAPHS=0``)."""
    env = os.environ.get(ENV, "auto").strip().lower()
    if env not in ("auto", "0", "1"):
        raise ValueError(f"${ENV}={env!r}: expected auto, 0 or 1")
    return env != "0" and device.type == "cuda"


def cuda_capture(body: Callable[[], None]) -> Callable[[], None]:
    """Capture ``body`` into a CUDA graph (after warm-up runs on a side stream); returns its replay.
    Thread-local capture mode: the block prefetch's worker may use the GPU meanwhile."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        body()
    return graph.replay


class BlockGraph:
    """The captured column loop of blocks ``[size, rows]`` (transposed layout, see ``obs_sweep``)."""

    def __init__(self, size: int, rows: int, dtype: torch.dtype, device: torch.device, columns: Columns,
                 capture: Capture) -> None:
        self.columns = columns

        def buffer(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.w, self.div, self.err, self.u = buffer(size, rows), buffer(size, rows), buffer(size, rows), buffer(size, size)
        views = self.w.unbind(0), self.div.unbind(0), self.err.unbind(0), self.u.unbind(0)
        self.replay = capture(lambda: columns(self.w, *views, 0, size))

    def run(self, wb: torch.Tensor, div: torch.Tensor, ub: torch.Tensor) -> torch.Tensor:
        """Sweep block ``wb`` in place; returns the errors (a buffer overwritten by the next run)."""
        self.w.copy_(wb)
        self.div.copy_(div)
        self.u.copy_(ub)
        self.replay()
        wb.copy_(self.w)
        return self.err

    def matches_eager(self) -> bool:
        """Replay a test block (pruned and kept entries, a triangular factor) and compare it with the
        eager loop bit for bit."""
        size, rows = self.w.shape
        at = {"dtype": self.w.dtype, "device": self.w.device}
        g = torch.Generator(device=self.w.device).manual_seed(0)  # made where the buffers are: nothing moves
        w = torch.randn(size, rows, generator=g, **at)
        u = torch.randn(size, size, generator=g, **at).triu() + 4 * torch.eye(size, **at)
        pruned = torch.rand(size, rows, generator=g, **at) < 0.5
        div = torch.where(pruned, u.diagonal().unsqueeze(1), torch.full((), float("inf"), **at))
        want, err = w.clone(), torch.empty_like(w)
        self.columns(want, *(t.unbind(0) for t in (want, div, err, u)), 0, size)
        got = w.clone()
        got_err = self.run(got, div, u)
        return torch.equal(got, want) and torch.equal(got_err, err)


def get(size: int, rows: int, dtype: torch.dtype, device: torch.device, columns: Columns,
        capture: Capture | None = None) -> BlockGraph | None:
    """The graph of ``columns`` (the sweep's column loop) for blocks of ``size`` columns by ``rows``,
    captured and checked on first use; None off CUDA, when turned off, or where capture failed or
    did not match the eager loop."""
    if not enabled(device):
        return None
    key = (str(device), dtype, size, rows)
    if key not in _graphs:
        _graphs[key] = _make(size, rows, dtype, device, columns, capture or cuda_capture)
    return _graphs[key]


def _make(size: int, rows: int, dtype: torch.dtype, device: torch.device, columns: Columns, capture: Capture
          ) -> BlockGraph | None:
    try:
        graph = BlockGraph(size, rows, dtype, device, columns, capture)
        ok = graph.matches_eager()
    except Exception as exc:  # noqa: BLE001 - any capture failure leaves the eager loop, which is correct
        log.warning("the OBS sweep could not capture a CUDA graph for blocks of %d x %d (%s: %s); it runs "
                    "column by column ($%s=0 skips the attempt)", size, rows, type(exc).__name__, exc, ENV)
        return None
    if not ok:
        log.warning("the OBS sweep's CUDA graph for blocks of %d x %d differs from the column loop on a test "
                    "block; it runs column by column", size, rows)
        return None
    return graph


def captured() -> dict[str, bool]:
    """Every block shape the sweep asked a graph for in this process (``"128x4096"``), True where
    one was used, False where it fell back to the column loop."""
    return {f"{size}x{rows}": g is not None for (_, _, size, rows), g in _graphs.items()}


def clear() -> None:
    """Forget every captured graph (tests; frees their buffers)."""
    _graphs.clear()
