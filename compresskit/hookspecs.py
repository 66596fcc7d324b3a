"""Pluggy hook specifications: how a plugin registers metrics, patterns and adapters.

A plugin is a module (named in the ``compresskit`` entry-point group) that defines one or
more of these functions, each marked with :data:`hookimpl`::

    from compresskit import hookimpl

    @hookimpl
    def register_metrics(register):
        register(MyMetric)

Built-in plugins use exactly this mechanism.
"""

from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("compresskit")
hookimpl = pluggy.HookimplMarker("compresskit")

Register = Callable[..., None]


@hookspec
def register_metrics(register: Register) -> None:
    """Register :class:`~compresskit.interfaces.ScoreMetric` subclasses.

    Called once per plugin manager, when the registry is built. Call
    ``register(cls, aliases=())`` once per class. ``register`` validates that ``cls`` subclasses
    ``ScoreMetric``, has a non-empty ``name``, a dataclass ``Options``, and that neither the name
    nor an alias is taken (a clash raises :class:`~compresskit.errors.DuplicatePluginError`
    naming both plugins). Must not instantiate the class or import heavy dependencies.

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
