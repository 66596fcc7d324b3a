"""Pluggy hook specifications: registration hooks and the run's lifecycle hooks.

A plugin is a module (named in the ``compresskit`` entry-point group) that defines one or
more of these functions, each marked with :data:`hookimpl`::

    from compresskit import hookimpl

    @hookimpl
    def register_metrics(register):
        register(MyMetric)

    @hookimpl
    def layer_sparsity(run, block_index, layer_name):
        return 0.6 if layer_name.startswith("mlp.") else None

Built-in plugins use exactly this mechanism. Lifecycle hooks are called in this order for a
run: ``run_started`` once (after calibration data and gradient statistics exist, before the
first block); per block, ``layer_sparsity`` once per prunable layer before that block is
calibrated, then ``block_done`` after its layers are pruned and its outputs propagated;
``run_finished`` once at the end. Hook arguments are passed by keyword; an implementation may
take any subset of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    import click

    import compresskit  # annotations name compresskit.run.Run; no import at run time

hookspec = pluggy.HookspecMarker("compresskit")
hookimpl = pluggy.HookimplMarker("compresskit")

Register = Callable[..., None]

# --------------------------------------------------------------------------- registration


@hookspec
def register_metrics(register: Register) -> None:
    """Register :class:`~compresskit.interfaces.ScoreMetric` subclasses.

    Called once per plugin manager, when the registry is built. Call
    ``register(cls, aliases=())`` once per class. ``register`` validates that ``cls`` subclasses
    ``ScoreMetric``, has a non-empty ``name``, a dataclass ``Options``, and that neither the name
    nor an alias is taken. A class that fails validation is reported with its plugin and skipped.
    Must not instantiate the class or import heavy dependencies (torch, transformers).

    Args:
        register: the registration callable.
    """


@hookspec
def register_patterns(register: Register) -> None:
    """Register :class:`~compresskit.interfaces.MaskPattern` subclasses (same contract as metrics).

    Args:
        register: the registration callable.
    """


@hookspec
def register_adapters(register: Register) -> None:
    """Register :class:`~compresskit.interfaces.ModelAdapter` subclasses (same contract as metrics).

    Adapters may declare ``aliases`` as a class attribute mapping an alias to a model preset
    (e.g. ``vit_b`` -> ``vit_base_patch16_224``); ``register`` records them as names too.

    Args:
        register: the registration callable.
    """


@hookspec
def register_solvers(register: Register) -> None:
    """Register :class:`~compresskit.interfaces.Solver` subclasses (``--update NAME``).

    Args:
        register: the registration callable.
    """


@hookspec
def register_allocations(register: Register) -> None:
    """Register :class:`~compresskit.interfaces.Allocation` subclasses (``--allocation NAME``).

    Args:
        register: the registration callable.
    """


@hookspec
def register_assets(register: Register) -> None:
    """Register packaged models and data sets (:class:`compresskit.data.Asset`).

    Call ``register(Asset(...))`` once per asset; ``compresskit list assets`` shows them and
    adapters resolve names through :func:`compresskit.data.find_asset`.

    Args:
        register: the registration callable.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add sub-commands to the ``compresskit`` command line (``@cli.command()``).

    Import heavy dependencies inside the command body, so ``compresskit --help`` stays fast.

    Args:
        cli: the top-level click group.
    """


# --------------------------------------------------------------------------- lifecycle


@hookspec
def run_started(run: compresskit.run.Run) -> None:
    """A run is about to prune its first block (calibration data and gradients are ready).

    Args:
        run: the run state (:class:`compresskit.run.Run`); plugins may record facts in
            ``run.notes`` (they go into the manifest).
    """


@hookspec(firstresult=True)
def layer_sparsity(run: compresskit.run.Run, block_index: int, layer_name: str) -> float | None:
    """The target sparsity of one layer, or None to leave it to the next plugin.

    The first non-None answer wins; with none, the run's uniform target applies. Order: the
    explicit ``--sparsity-map`` (tryfirst), installed plugins, the run's ``--allocation``
    (trylast). Called for every prunable layer of a block just before that block is calibrated,
    so earlier blocks' report rows are available in ``run.report``.

    Args:
        run: the run state.
        block_index: index of the block in ``adapter.blocks(model)``.
        layer_name: qualified name inside the block (e.g. ``self_attn.q_proj``).

    Returns:
        A fraction in ``[0, 1)``, or None.
    """


@hookspec
def block_done(run: compresskit.run.Run, block_index: int) -> None:
    """A block's layers are pruned and its outputs (the next block's inputs) are computed.

    Args:
        run: the run state; ``run.inputs`` holds the next block's inputs.
        block_index: the block just finished.
    """


@hookspec
def run_finished(run: compresskit.run.Run) -> None:
    """Every block is pruned; the report is complete (nothing is saved yet).

    Args:
        run: the run state.
    """
