"""``compresskit new-plugin NAME --kind KIND``: a ready plugin package from the templates in
``compresskit/templates/plugin``.

The package installs and passes its tests as written: ``pyproject.toml`` with the ``compresskit``
entry point, ``src/compresskit_<name>/plugin.py`` (the class, its ``Options`` and the
registration hook), ``tests/test_<name>.py`` (the kind's conformance check from
:mod:`compresskit.testing` plus a worked example) and a README. Templates are
:class:`string.Template` files (``${name}``, ``${Class}``, ...). This module imports no torch.
"""

from __future__ import annotations

import keyword
import os
import re
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

from compresskit._version import __version__
from compresskit.errors import CompressKitError, OptionError
from compresskit.engine.kinds import KINDS

TEMPLATES = Path(__file__).parent / "templates" / "plugin"

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

USAGE = {
    "metric": "compresskit prune --adapter llama --model random:tiny --metric {name} --sparsity 0.5",
    "pattern": "compresskit prune --adapter llama --model random:tiny --metric wanda --pattern {name} --sparsity 0.5",
    "adapter": "compresskit prune --adapter {name} --model random:tiny --metric wanda --sparsity 0.5",
    "solver": "compresskit prune --adapter llama --model random:tiny --metric wanda --update {name}",
    "allocation": "compresskit prune --adapter llama --model random:tiny --metric wanda --allocation {name}",
}
WHAT = {"metric": "score", "pattern": "masking rule", "adapter": "toy model family", "solver": "weight update",
        "allocation": "per-layer targets"}
EXTRA = {"adapter": {"model.py.tmpl": "src/{package}/model.py"}}
EXTRA_ROWS = {"adapter": "| `src/{package}/model.py` | the template's tiny model (torch imported only when a model loads) |\n"}


def plugin_name(name: str) -> str:
    """The registry name for ``NAME``: lower case, ``-`` -> ``_``.

    Raises:
        OptionError: not a valid Python identifier in snake case.
    """
    norm = name.strip().lower().replace("-", "_")
    if not _NAME.match(norm) or keyword.iskeyword(norm):
        raise OptionError(f"plugin name {name!r} must be snake case starting with a letter (letters, digits, _), "
                          "e.g. my_metric")
    return norm


def names(name: str, kind: str) -> dict[str, str]:
    """Every substitution of the templates for plugin ``name`` of ``kind``."""
    if kind not in KINDS:
        raise OptionError(f"unknown plugin kind {kind!r}; choose one of {', '.join(KINDS)}")
    snake = plugin_name(name)
    words = snake.split("_")
    suffix = kind.capitalize()
    cls = "".join(w.capitalize() for w in words if w)
    if not cls.endswith(suffix):
        cls += suffix
    major, minor = (int(p) for p in re.match(r"(\d+)\.(\d+)", __version__).groups())
    base = KINDS[kind].base.__name__
    package = f"compresskit_{snake}"
    return {"name": snake, "kind": kind, "Class": cls, "Base": base, "package": package,
            "dist": f"compresskit-{snake.replace('_', '-')}", "hook": KINDS[kind].hook,
            "check": f"check_{kind}", "version": __version__, "next_minor": f"{major}.{minor + 1}",
            "kind_what": WHAT[kind], "usage": USAGE[kind].format(name=snake),
            "extra_rows": EXTRA_ROWS.get(kind, "").format(package=package)}


def render(name: str, kind: str) -> dict[str, str]:
    """The package's files (relative path -> text) for plugin ``name`` of ``kind``."""
    subs = names(name, kind)
    files = {"pyproject.toml.tmpl": "pyproject.toml", "README.md.tmpl": "README.md",
             "__init__.py.tmpl": "src/{package}/__init__.py", f"{kind}.py.tmpl": "src/{package}/plugin.py",
             f"test_{kind}.py.tmpl": "tests/test_{name}.py", **EXTRA.get(kind, {})}
    return {dest.format(**subs): string.Template((TEMPLATES / src).read_text()).substitute(subs)
            for src, dest in files.items()}


def write(name: str, kind: str, directory: str | os.PathLike | None = None, registry: Any = None) -> Path:
    """Write the package into ``directory`` (default ``./compresskit-<name>``), all files or none.

    Args:
        registry: when given, a name its ``kind`` already has is refused (it would clash).

    Raises:
        OptionError: a bad name or kind, or a name that is taken.
        CompressKitError: the directory exists and is not empty.
    """
    subs = names(name, kind)
    if registry is not None:
        try:
            taken = registry.get(kind, subs["name"])
        except KeyError:
            taken = None
        if taken is not None:
            raise OptionError(f"{kind} {subs['name']!r} is already registered by {taken.origin}; choose another name")
    target = Path(directory or subs["dist"])
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise CompressKitError(f"{target} exists and is not empty; choose another --output or remove it")
    files = render(name, kind)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private
        for rel, text in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text)
        if target.exists():
            target.rmdir()
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
