"""What the command modules share: the process's plugin registry (with the ``-p`` modules), the
``RunConfig`` defaults, ``-o SCOPE.KEY=VALUE`` parsing and rank-aware echo. No command lives here."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import click

from compresskit.config import RunConfig
from compresskit.engine import distributed
from compresskit.engine.kinds import BY_FIELD

DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}
SCOPES = (*BY_FIELD, "gradient")
_REGISTRY: list[Any] = []
_PLUGIN_SPECS: list[tuple[str, ...]] = [()]


def registry():
    """The process's plugin registry: built on first use with the ``-p`` modules (and again when
    they or ``$COMPRESSKIT_PLUGINS``/``$COMPRESSKIT_DISABLE_PLUGINS`` change, as in tests)."""
    import os

    from compresskit.engine.registry import DISABLE_ENV, LOAD_ENV, Registry

    key = (_PLUGIN_SPECS[0], os.environ.get(LOAD_ENV), os.environ.get(DISABLE_ENV))
    if not _REGISTRY or _REGISTRY[0][0] != key:
        _REGISTRY[:] = [(key, Registry.from_entrypoints(extra=_PLUGIN_SPECS[0]))]
    return _REGISTRY[0][1]


def use_plugins(specs: tuple[str, ...]) -> None:
    """Make :func:`registry` load these ``-p`` values (modules, ``.py`` files, ``no:NAME``); rebuilt on change."""
    if tuple(specs) != _PLUGIN_SPECS[0]:
        _PLUGIN_SPECS[0] = tuple(specs)
        _REGISTRY.clear()



@contextlib.contextmanager
def library_progress_bars(enabled: bool) -> Iterator[None]:
    """``--no-progress`` for the libraries' own bars too: transformers ("Loading weights", "Writing
    model shards"), huggingface_hub (downloads) and datasets (``map``) are silenced while the
    command runs, and restored afterwards (in-process callers such as tests keep their settings)."""
    if enabled:
        yield
        return
    restore = []
    try:
        from transformers.utils import logging as tf_logging

        if tf_logging.is_progress_bar_enabled():  # also turns huggingface_hub's bars off and on
            tf_logging.disable_progress_bar()
            restore.append(tf_logging.enable_progress_bar)
    except ImportError:
        pass
    try:
        import datasets.utils.logging as ds_logging

        if ds_logging.is_progress_bar_enabled():
            ds_logging.disable_progress_bar()
            restore.append(ds_logging.enable_progress_bar)
    except ImportError:
        pass
    try:
        yield
    finally:
        for undo in restore:
            undo()


def quiet_if(no_progress: bool) -> None:
    """Silence every progress bar until the current command ends when ``--no-progress`` is given."""
    if no_progress:
        click.get_current_context().with_resource(library_progress_bars(False))


def parse_options(items: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``-o metric.alpha=0`` -> {"metric": {"alpha": "0"}, ...} for every scope."""
    out: dict[str, dict[str, str]] = {s: {} for s in SCOPES}
    for item in items:
        key, sep, value = item.partition("=")
        scope, dot, name = key.partition(".")
        if not sep or not dot or scope not in out or not name:
            raise click.BadParameter(
                f"{item!r}: expected SCOPE.KEY=VALUE with SCOPE one of {', '.join(SCOPES)} (e.g. -o metric.alpha=100); "
                "see `compresskit info metric NAME` for the keys", param_hint="-o/--option")
        out[scope][name] = value
    return out



def echo_writer():
    """``click.echo`` on rank 0 (or in a single process); silent on the other ranks of a torchrun launch."""
    return click.echo if distributed.current().is_writer else (lambda *a, **k: None)


def task_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [t.strip() for t in value.split(",") if t.strip()]
    if not names:
        raise click.BadParameter("give at least one task name, e.g. hellaswag,arc_easy,piqa", param_hint="--eval-tasks")
    return names

