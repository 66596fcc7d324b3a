"""Plugin manager factory and the typed registry of every plugin kind (see :mod:`compresskit.engine.kinds`).

Loading is defensive: a plugin whose module fails to import, whose hook names are misspelled,
whose registration hook raises, or whose class fails validation is reported (plugin,
distribution, what is wrong, how to disable it) and skipped; every other plugin keeps working.
Built-in plugins (the ``compresskit`` distribution) load first, so a third-party duplicate of a
built-in name is the one refused.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata as md
import importlib.util
import logging
import os
from typing import Any, Iterable

import pluggy

from compresskit import hookspecs

from compresskit.engine import targets
from compresskit.errors import DuplicatePluginError, PluginDefinitionError, PluginLoadError, UnknownPluginError
from compresskit.engine.kinds import KINDS

log = logging.getLogger(__name__)

GROUP = "compresskit"
DISABLE_ENV = "COMPRESSKIT_DISABLE_PLUGINS"
LOAD_ENV = "COMPRESSKIT_PLUGINS"
BUILTIN_DIST = "compresskit"
CORE_PLUGIN = "compresskit.engine.targets"


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a registered class came from."""

    plugin: str
    distribution: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        if self.distribution:
            return f"{self.plugin} ({self.distribution} {self.version})"
        return self.plugin


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered class."""

    kind: str
    name: str
    cls: type
    origin: Origin
    aliases: tuple[str, ...] = ()


@dataclasses.dataclass
class PluginFailure:
    """A plugin (or one class of it) that was skipped, and how to get rid of the message."""

    plugin: str
    distribution: str | None
    error: str
    severity: str = "error"  # "error": skipped; "warning": loaded, but something looks wrong
    fix: str | None = None  # how to get rid of the message; default: disable the plugin

    def message(self) -> str:
        dist = f" ({self.distribution})" if self.distribution else ""
        fix = self.fix or (f"disable it with {DISABLE_ENV}={self.plugin} or -p no:{self.plugin}"
                           if self.severity == "error" else "")
        return f"plugin {self.plugin}{dist}: {self.error}" + (f"; {fix}" if fix else "")


@dataclasses.dataclass
class LoadInfo:
    """What happened while loading plugins: distributions of loaded plugins, failures."""

    distributions: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    failures: list[PluginFailure] = dataclasses.field(default_factory=list)
    explicit: set[str] = dataclasses.field(default_factory=set)  # named with -p / $COMPRESSKIT_PLUGINS


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _names_from_env(var: str) -> list[str]:
    return [p.strip() for p in os.environ.get(var, "").split(",") if p.strip()]


def disabled_plugins() -> set[str]:
    """Names listed (comma-separated) in ``COMPRESSKIT_DISABLE_PLUGINS``, plus ``no:NAME`` entries of
    ``COMPRESSKIT_PLUGINS``."""
    return set(_names_from_env(DISABLE_ENV)) | split_specs(_names_from_env(LOAD_ENV))[1]


def split_specs(specs: Iterable[str]) -> tuple[list[str], set[str]]:
    """``-p`` values -> (modules or ``.py`` files to load, plugin names to disable: ``no:NAME``)."""
    load, blocked = [], set()
    for spec in specs:
        spec = spec.strip()
        if spec.startswith("no:"):
            blocked.add(spec[3:].strip())
        elif spec:
            load.append(spec)
    return load, blocked


def new_plugin_manager() -> pluggy.PluginManager:
    """An empty manager with every hookspec and the core's own hook implementations."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    pm.register(targets, name=CORE_PLUGIN)
    pm.register(targets.ALLOCATION, name=CORE_PLUGIN + ".allocation")
    return pm


def add_plugin(pm: pluggy.PluginManager, module: Any, name: str, load: LoadInfo, dist: str | None = None) -> bool:
    """Register one plugin module; on a bad hook name unregister it and record why. Returns success."""
    if pm.get_plugin(name) is not None or pm.is_registered(module):
        return False
    try:
        pm.register(module, name=name)
        pm.check_pending()
    except Exception as exc:  # pluggy raises PluginValidationError for unknown hook names
        if pm.get_plugin(name) is not None:
            pm.unregister(name=name)
        load.failures.append(PluginFailure(name, dist, f"{type(exc).__name__}: {exc}"))
        return False
    if not pm.get_hookcallers(module):
        load.failures.append(PluginFailure(name, dist, "defines no @hookimpl function (nothing was registered); "
                                           "mark its hooks with compresskit.hookimpl", severity="warning"))
    return True


def get_plugin_manager(load_entrypoints: bool = True, extra: Iterable[str] = (),
                       disabled: Iterable[str] = ()) -> tuple[pluggy.PluginManager, LoadInfo]:
    """Return a fresh plugin manager and what happened while loading (failures, versions).

    Args:
        load_entrypoints: load the ``compresskit`` entry-point group (built-ins first).
        extra: more plugin modules for this process (dotted names or ``.py`` paths), after
            those in ``$COMPRESSKIT_PLUGINS`` (both may hold ``no:NAME`` to disable a plugin).
        disabled: plugin names to skip, besides those in ``$COMPRESSKIT_DISABLE_PLUGINS``.
    """
    pm, load = new_plugin_manager(), LoadInfo()
    extra, no = split_specs(extra)
    blocked = disabled_plugins() | set(disabled) | no
    if load_entrypoints:
        eps = sorted(md.entry_points(group=GROUP), key=lambda ep: getattr(ep.dist, "name", "") != BUILTIN_DIST)
        for ep in eps:
            if ep.name in blocked or pm.get_plugin(ep.name) is not None:
                continue
            dist = getattr(ep, "dist", None)
            dname = f"{dist.name} {dist.version}" if dist else None
            try:
                module = ep.load()
            except Exception as exc:  # a broken third-party plugin must not break the tool
                load.failures.append(PluginFailure(ep.name, dname, f"failed to import: {type(exc).__name__}: {exc}"))
                continue
            if add_plugin(pm, module, ep.name, load, dname) and dist is not None:
                load.distributions[ep.name] = (dist.name, dist.version)
    for spec in [*split_specs(_names_from_env(LOAD_ENV))[0], *extra]:
        _load_module(pm, spec, load, blocked)
    for f in load.failures:
        log.warning("%s", f.message())
    return pm, load


def _load_module(pm: pluggy.PluginManager, spec: str, load: LoadInfo, blocked: set[str]) -> None:
    """Load one ``-p``/``$COMPRESSKIT_PLUGINS`` module (dotted name or ``.py`` file) as a plugin.

    A file is imported under ``compresskit_local_<stem>`` and put in ``sys.modules`` (dataclass
    ``Options`` and ``typing.get_type_hints`` look their module up there); failures are recorded
    like those of installed plugins, with the fix that applies to a module given on the command line.
    """
    import sys
    from pathlib import Path

    name = Path(spec).stem if spec.endswith(".py") else spec
    if name in blocked:
        return
    load.explicit.add(name)
    fix = f"fix or remove {spec!r} in -p / ${LOAD_ENV}"
    try:
        if spec.endswith(".py"):
            path = Path(spec)
            if not path.is_file():
                raise FileNotFoundError(f"no such plugin file {spec} (relative paths start at {Path.cwd()})")
            modname = f"compresskit_local_{name}"
            mspec = importlib.util.spec_from_file_location(modname, path)
            module = importlib.util.module_from_spec(mspec)
            sys.modules[modname] = module
            try:
                mspec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(modname, None)
                raise
        else:
            module = importlib.import_module(spec)
    except Exception as exc:
        hint = ""
        if isinstance(exc, ModuleNotFoundError) and Path(f"{spec}.py").is_file():
            hint = f" (a file {spec}.py is here: pass -p {spec}.py to load a file)"
        load.failures.append(PluginFailure(name, None, f"failed to import {spec!r}: {type(exc).__name__}: {exc}{hint}",
                                           fix=fix))
        return
    other = pm.get_plugin(name)
    if other is not None and other is not module:
        load.failures.append(PluginFailure(name, None, f"{spec!r} was not loaded: a plugin named {name!r} is already "
                                           "loaded", fix=f"rename it, or disable the other one with -p no:{name}"))
        return
    add_plugin(pm, module, name, load)


class Registry:
    """Name -> class maps for every plugin kind, built from a plugin manager's registration hooks."""

    def __init__(self, pm: pluggy.PluginManager, load: LoadInfo | None = None) -> None:
        self.pm = pm
        self.load = load or LoadInfo()
        self.failures = self.load.failures
        self.assets: list[Any] = []
        self._entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self._names: dict[str, dict[str, str]] = {k: {} for k in KINDS}  # normalised name/alias -> name
        impls = [(kind.name, impl) for kind in KINDS.values() for impl in getattr(pm.hook, kind.hook).get_hookimpls()]
        impls.sort(key=lambda ki: self._origin(ki[1].plugin_name).distribution != BUILTIN_DIST)  # built-ins first
        for kind, impl in impls:
            self._call_register(impl, self._registrar(kind, self._origin(impl.plugin_name)))
        for impl in pm.hook.register_assets.get_hookimpls():
            self._call_register(impl, self.assets.append)

    def _call_register(self, impl: Any, register: Any) -> None:
        try:
            impl.function(register=register)
        except Exception as exc:  # a raising registration hook must not take down the tool
            origin = self._origin(impl.plugin_name)
            self.failures.append(PluginFailure(impl.plugin_name, origin.distribution and f"{origin.distribution} "
                                               f"{origin.version}", f"{impl.function.__name__} raised "
                                               f"{type(exc).__name__}: {exc}"))
            log.warning("%s", self.failures[-1].message())

    @classmethod
    def from_entrypoints(cls, extra: Iterable[str] = (), disabled: Iterable[str] = ()) -> Registry:
        """Build a registry from every installed plugin (plus ``extra`` modules, minus ``disabled``)."""
        pm, load = get_plugin_manager(extra=extra, disabled=disabled)
        return cls(pm, load)

    def _origin(self, plugin_name: str) -> Origin:
        dist = self.load.distributions.get(plugin_name)
        return Origin(plugin_name, *dist) if dist else Origin(plugin_name)

    def _registrar(self, kind: str, origin: Origin):
        def register(cls: type, aliases: Iterable[str] = ()) -> None:
            try:
                self.add(kind, cls, origin, aliases)
            except (PluginDefinitionError, DuplicatePluginError) as exc:
                dist = f"{origin.distribution} {origin.version}" if origin.distribution else None
                self.failures.append(PluginFailure(origin.plugin, dist, f"{exc} (class skipped)"))
                log.warning("%s", self.failures[-1].message())

        return register

    def add(self, kind: str, cls: type, origin: Origin, aliases: Iterable[str] = ()) -> None:
        """Validate and record one class. See the hookspecs for the contract.

        Raises:
            PluginDefinitionError: wrong base class, no ``name``, or ``Options`` not a dataclass.
            DuplicatePluginError: the name or an alias is taken (the message names both plugins).
        """
        base = KINDS[kind].base
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginDefinitionError(f"{origin} registered {cls!r} as a {kind}, but it does not subclass {base.__name__}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginDefinitionError(f"{kind} class {cls.__name__} from {origin} has no `name` class attribute")
        if not dataclasses.is_dataclass(cls.Options):
            raise PluginDefinitionError(
                f"{kind} {name!r} from {origin}: Options must be a dataclass (use compresskit.options.option)"
            )
        aliases = tuple(aliases) + tuple(getattr(cls, "aliases", {}) or ())
        for key in (name, *aliases):
            norm = _normalise(key)
            if norm in self._names[kind]:
                other = self._entries[kind][self._names[kind][norm]]
                raise DuplicatePluginError(
                    f"{kind} {key!r} is registered by both {other.origin} and {origin}; the first is kept: "
                    f"uninstall one or disable it with {DISABLE_ENV}=<plugin name>"
                )
        self._entries[kind][name] = Entry(kind, name, cls, origin, aliases)
        for key in (name, *aliases):
            self._names[kind][_normalise(key)] = name

    def get(self, kind: str, name: str) -> Entry:
        """Look up a name or alias (case- and ``-``/``_``-insensitive).

        Raises:
            UnknownPluginError: with the closest matches and the full list.
        """
        norm = _normalise(name)
        if norm in self._names[kind]:
            return self._entries[kind][self._names[kind][norm]]
        names = sorted(self._names[kind])
        close = difflib.get_close_matches(norm, names, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        failed = "".join(f" ({f.message()})" for f in self.failures if f.severity == "error")
        raise UnknownPluginError(
            f"unknown {kind} {name!r}.{hint} Available: {', '.join(sorted(self._entries[kind])) or 'none'}. "
            f"See `compresskit list {KINDS[kind].plural}`.{failed}"
        )

    def add_commands(self, cli: Any) -> None:
        """Let every plugin add CLI commands (``register_commands``), one plugin at a time.

        A plugin whose hook raises, or that would replace a command that already exists (a
        built-in such as ``prune`` or another plugin's), is reported in :attr:`failures` and its
        changes are undone; the other plugins' commands stay.
        """
        for impl in self.pm.hook.register_commands.get_hookimpls():
            before = dict(cli.commands)
            problem = None
            try:
                impl.function(cli=cli)
            except Exception as exc:
                problem = f"register_commands raised {type(exc).__name__}: {exc}"
            replaced = sorted(n for n, c in before.items() if cli.commands.get(n) is not c)
            if problem is None and replaced:
                problem = f"register_commands would replace the existing command {replaced[0]!r} (command skipped)"
            if problem is not None:
                cli.commands.clear()
                cli.commands.update(before)
                origin = self._origin(impl.plugin_name)
                dist = f"{origin.distribution} {origin.version}" if origin.distribution else None
                self.failures.append(PluginFailure(impl.plugin_name, dist, problem))
                log.warning("%s", self.failures[-1].message())

    def explicit_failures(self) -> list[PluginFailure]:
        """Errors of plugins the user named (``-p``, ``$COMPRESSKIT_PLUGINS``): a command must not run
        without a plugin it was asked for; an installed plugin's failure only warns."""
        return [f for f in self.failures if f.severity == "error" and f.plugin in self.load.explicit]

    def check_explicit(self) -> None:
        """Raise :class:`PluginLoadError` naming every failed plugin the user named (see :meth:`explicit_failures`)."""
        failed = self.explicit_failures()
        if failed:
            raise PluginLoadError("; ".join(f.message() for f in failed) + " (nothing was run)")

    def entries(self, kind: str) -> list[Entry]:
        """Registered entries of one kind, sorted by name."""
        return [self._entries[kind][n] for n in sorted(self._entries[kind])]

    def plugins(self) -> list[dict[str, Any]]:
        """Loaded plugins with their distribution, version and implemented hooks (core excluded)."""
        out = []
        for name, module in sorted(self.pm.list_name_plugin(), key=lambda x: x[0]):
            if name.startswith(CORE_PLUGIN):
                continue
            origin = self._origin(name)
            hooks = sorted(h.name for h in self.pm.get_hookcallers(module) or [])
            out.append({"name": name, "distribution": origin.distribution, "version": origin.version, "hooks": hooks})
        return out
