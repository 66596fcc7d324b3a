"""The runner matrix shared by the strict-device tests (CPU) and the ``cuda`` tests.

Every built-in metric x pattern x solver x allocation, read from the registry so that a new
built-in plugin joins the matrix by itself. Excluded, because compresskit refuses them with a
clear error (tested elsewhere): an allocation other than ``uniform`` with an N:M pattern (N:M
fixes every layer's sparsity), a metric whose mask comes out of a solver's sweep (SparseGPT's
``mask_solver``) with a solver that cannot choose masks (``select_and_solve``), and, streamed, an
allocation with a dense pre-pass (``prepare``).
"""

from __future__ import annotations

import functools
import itertools

PATTERNS = ("unstructured", "2:4")
RUN = dict(adapter="llama", nsamples=4, seqlen=16, calibration="random", progress=False, sparsity=0.5)


@functools.lru_cache(maxsize=None)
def _builtin(kind: str) -> tuple[str, ...]:
    from compresskit.engine.registry import Registry

    reg = Registry.from_entrypoints()
    return tuple(sorted(e.name for e in reg.entries(kind) if e.origin.distribution == "compresskit"))


def _has_prepass(allocation: str) -> bool:
    from compresskit.engine.registry import Registry
    from compresskit.interfaces import Allocation

    cls = Registry.from_entrypoints().get("allocation", allocation).cls
    return cls.prepare is not Allocation.prepare


def _refused(metric: str, solver: str) -> bool:
    """compresskit refuses this pair: the metric's mask comes out of another solver's sweep."""
    from compresskit.engine.registry import Registry
    from compresskit.interfaces import Solver

    reg = Registry.from_entrypoints()
    metric_cls, solver_cls = reg.get("metric", metric).cls, reg.get("solver", solver).cls
    chooses = solver != "none" and solver_cls.select_and_solve is not Solver.select_and_solve
    return metric_cls.mask_solver is not None and solver not in ("none", metric_cls.mask_solver) and not chooses


def combos(streamed: bool) -> list[tuple[str, str, str, str]]:
    """``(metric, pattern, solver, allocation)`` of every run the matrix makes."""
    out = []
    for metric, pattern, solver, allocation in itertools.product(
            _builtin("metric"), PATTERNS, _builtin("solver"), _builtin("allocation")):
        if allocation != "uniform" and ":" in pattern:
            continue
        if streamed and _has_prepass(allocation):
            continue
        if _refused(metric, solver):
            continue
        out.append((metric, pattern, solver, allocation))
    return out


def config(metric: str, pattern: str, solver: str, allocation: str, device: str) -> dict:
    """The keyword arguments of :func:`compresskit.prune` for one combination."""
    return dict(RUN, metric=metric, pattern=pattern, update=solver, allocation=allocation, device=device)


def ids(combo: tuple[str, str, str, str]) -> str:
    return "-".join(combo)
