"""The plugin kinds: one table that the registry, the CLI, the API and the testing helpers share.

A *kind* is an interface plugins implement and register classes for: ``metric``
(:class:`~compresskit.interfaces.ScoreMetric`), ``pattern``
(:class:`~compresskit.interfaces.MaskPattern`), ``adapter``
(:class:`~compresskit.interfaces.ModelAdapter`), ``solver``
(:class:`~compresskit.interfaces.Solver`) and ``allocation``
(:class:`~compresskit.interfaces.Allocation`). Adding a kind means one row here, one ABC and one
registration hookspec.
"""

from __future__ import annotations

import dataclasses

from compresskit.interfaces import Allocation, MaskPattern, ModelAdapter, ScoreMetric, Solver


@dataclasses.dataclass(frozen=True)
class Kind:
    """One plugin kind.

    Attributes:
        name: singular name (``compresskit info KIND NAME``).
        field: the ``RunConfig`` field (and CLI option) holding the chosen plugin's name; also the
            ``-o FIELD.KEY=VALUE`` scope, with ``<field>_options`` holding the options.
        plural: the ``compresskit list`` argument.
        base: the ABC every registered class subclasses.
        hook: the registration hookspec.
        default: the name used when a run does not choose one.
    """

    name: str
    field: str
    plural: str
    base: type
    hook: str
    default: str


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("adapter", "adapter", "adapters", ModelAdapter, "register_adapters", "llama"),
        Kind("metric", "metric", "metrics", ScoreMetric, "register_metrics", "gblm"),
        Kind("pattern", "pattern", "patterns", MaskPattern, "register_patterns", "unstructured"),
        Kind("solver", "update", "solvers", Solver, "register_solvers", "none"),
        Kind("allocation", "allocation", "allocations", Allocation, "register_allocations", "uniform"),
    )
}
"""Every plugin kind by name, in the order a run resolves them."""

BY_PLURAL: dict[str, Kind] = {k.plural: k for k in KINDS.values()}

BY_FIELD: dict[str, Kind] = {k.field: k for k in KINDS.values()}
