"""The command line's last word on an unexpected exception: one line naming where it came from.

Errors compresskit expects are :class:`~compresskit.errors.CompressKitError` subclasses whose
message already says the fix. Anything else is a bug, in compresskit or in a plugin; instead of
a raw traceback the CLI prints what was raised and, when the innermost frame that belongs to an
installed plugin is found in the traceback, which plugin and how to disable it. ``-v`` (or
``COMPRESSKIT_TRACEBACK=1``) prints the full traceback as well.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any

TRACEBACK_ENV = "COMPRESSKIT_TRACEBACK"


def _plugin_files(registry: Any) -> list[tuple[str, str, bool]]:
    """``(plugin name, file or package directory, built in?)`` of every registered plugin module."""
    from compresskit.engine.registry import BUILTIN_DIST, CORE_PLUGIN

    out = []
    for name, module in registry.pm.list_name_plugin():
        if name.startswith(CORE_PLUGIN):
            continue
        f = getattr(module, "__file__", None)
        if not f:
            continue
        p = Path(f).resolve()
        where = str(p.parent) + os.sep if p.name == "__init__.py" else str(p)
        builtin = registry.load.distributions.get(name, (None,))[0] == BUILTIN_DIST
        out.append((name, where, builtin))
    return out


def blame(exc: BaseException, registry: Any) -> tuple[str, bool] | None:
    """``(plugin name, built in?)`` of the innermost traceback frame inside a plugin's module."""
    if registry is None:
        return None
    files = _plugin_files(registry)
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = str(Path(frame.filename).resolve())
        for name, where, builtin in files:
            if path == where or (where.endswith(os.sep) and path.startswith(where)):
                return name, builtin
    return None


def unexpected(exc: BaseException, registry: Any = None) -> str:
    """One line for an exception compresskit did not expect (see the module docstring)."""
    from compresskit.engine.registry import DISABLE_ENV

    text = " ".join(str(exc).split())[:300]
    what = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if isinstance(exc, OSError) and getattr(exc, "filename", None):
        return f"{what} (a file system problem with {exc.filename}; check the path, its permissions and free space)"
    found = blame(exc, registry)
    if found and not found[1]:
        return (f"plugin {found[0]} failed: {what}; disable it with {DISABLE_ENV}={found[0]} "
                f"(or set {TRACEBACK_ENV}=1 for the traceback)")
    return f"unexpected {what}. This is a bug: please report it with the traceback ({TRACEBACK_ENV}=1 or -v)"


def want_traceback() -> bool:
    """True when the user asked for tracebacks (``-v`` or ``COMPRESSKIT_TRACEBACK=1``)."""
    import logging

    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0") or logging.getLogger().getEffectiveLevel() <= logging.INFO
