"""The ``uniform`` allocation: every layer gets the run's target."""

from __future__ import annotations

from compresskit import hookimpl
from compresskit.interfaces import Allocation


@hookimpl
def register_allocations(register):
    register(UniformAllocation)


class UniformAllocation(Allocation):
    """Every prunable layer is pruned to the run's ``--sparsity`` (the default allocation).

    Per-layer targets still come from ``--sparsity-map`` or an installed ``layer_sparsity``
    plugin when those answer.

        compresskit prune --allocation uniform --sparsity 0.5
    """

    name = "uniform"
    summary = "the same target for every layer (default)"
