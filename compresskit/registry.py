"""Plugin manager factory and the typed registry of metrics, patterns and adapters."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata as md
import logging
import os
from typing import Any, Iterable

import pluggy

from compresskit import hookspecs
from compresskit.errors import DuplicatePluginError, PluginDefinitionError, UnknownPluginError
from compresskit.interfaces import MaskPattern, ModelAdapter, ScoreMetric

log = logging.getLogger(__name__)

GROUP = "compresskit"
DISABLE_ENV = "COMPRESSKIT_DISABLE_PLUGINS"
KINDS: dict[str, type] = {"metric": ScoreMetric, "pattern": MaskPattern, "adapter": ModelAdapter}
_HOOK_OF = {"metric": "register_metrics", "pattern": "register_patterns", "adapter": "register_adapters"}


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
    """A plugin that failed to load and was skipped."""

    plugin: str
    distribution: str | None
    error: str


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def disabled_plugins() -> set[str]:
    """Names listed (comma-separated) in ``COMPRESSKIT_DISABLE_PLUGINS``."""
    return {p.strip() for p in os.environ.get(DISABLE_ENV, "").split(",") if p.strip()}


def get_plugin_manager(load_entrypoints: bool = True) -> tuple[pluggy.PluginManager, LoadInfo]:
    """Return a fresh plugin manager and what happened while loading (failures, versions).

    Entry points of the ``compresskit`` group are loaded one by one; a plugin named in
    ``COMPRESSKIT_DISABLE_PLUGINS`` is skipped, and one that raises on import is logged and
    skipped instead of breaking the whole tool.
    """
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    load = LoadInfo()
    if load_entrypoints:
        blocked = disabled_plugins()
        for ep in md.entry_points(group=GROUP):
            if ep.name in blocked or pm.get_plugin(ep.name) is not None:
                continue
            dist = getattr(ep, "dist", None)
            try:
                module = ep.load()
                pm.register(module, name=ep.name)
            except Exception as exc:  # a broken third-party plugin must not break the tool
                dname = f"{dist.name} {dist.version}" if dist else None
                log.warning("plugin %s (%s) failed to load (%s: %s); skipped", ep.name, dname, type(exc).__name__, exc)
                load.failures.append(PluginFailure(ep.name, dname, f"{type(exc).__name__}: {exc}"))
                continue
            if dist is not None:
                load.distributions[ep.name] = (dist.name, dist.version)
    pm.check_pending()
    return pm, load


@dataclasses.dataclass
class LoadInfo:
    """What happened while loading entry points: distributions of loaded plugins, failures."""

    distributions: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    failures: list[PluginFailure] = dataclasses.field(default_factory=list)


class Registry:
    """Name -> class maps for the three kinds, built from a plugin manager's hooks."""

    def __init__(self, pm: pluggy.PluginManager, load: LoadInfo | None = None) -> None:
        self.pm = pm
        self.load = load or LoadInfo()
        self.failures = self.load.failures
        self._entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self._names: dict[str, dict[str, str]] = {k: {} for k in KINDS}  # normalised name/alias -> name
        for kind, hook in _HOOK_OF.items():
            for impl in getattr(pm.hook, hook).get_hookimpls():
                origin = self._origin(impl.plugin_name, impl.plugin)
                impl.function(register=self._registrar(kind, origin))

    @classmethod
    def from_entrypoints(cls) -> Registry:
        """Build a registry from every installed plugin."""
        pm, load = get_plugin_manager()
        return cls(pm, load)

    def _origin(self, plugin_name: str, module: Any) -> Origin:
        dist = self.load.distributions.get(plugin_name)
        return Origin(plugin_name, *dist) if dist else Origin(plugin_name)

    def _registrar(self, kind: str, origin: Origin):
        def register(cls: type, aliases: Iterable[str] = ()) -> None:
            self.add(kind, cls, origin, aliases)

        return register

    def add(self, kind: str, cls: type, origin: Origin, aliases: Iterable[str] = ()) -> None:
        """Validate and record one class. See the hookspecs for the contract."""
        base = KINDS[kind]
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
                    f"{kind} {key!r} is registered by both {other.origin} and {origin}; "
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
        failed = "".join(f" (plugin {f.plugin} failed to load: {f.error})" for f in self.failures)
        raise UnknownPluginError(
            f"unknown {kind} {name!r}.{hint} Available: {', '.join(sorted(self._entries[kind])) or 'none'}. "
            f"See `compresskit list {kind}s`.{failed}"
        )

    def entries(self, kind: str) -> list[Entry]:
        """Registered entries of one kind, sorted by name."""
        return [self._entries[kind][n] for n in sorted(self._entries[kind])]

    def plugins(self) -> list[dict[str, Any]]:
        """Installed plugins with their distribution, version and implemented hooks."""
        out = []
        for name, module in sorted(self.pm.list_name_plugin(), key=lambda x: x[0]):
            origin = self._origin(name, module)
            hooks = sorted(h.name for h in self.pm.get_hookcallers(module) or [])
            out.append({"name": name, "distribution": origin.distribution, "version": origin.version, "hooks": hooks})
        return out
