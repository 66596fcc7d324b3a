"""A small TOML writer for recipes: keys, scalars (``inf``/``nan`` too), arrays, inline tables and
one level of ``[table]``. Reading uses the standard library's ``tomllib`` (``tomli`` before 3.11).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from compresskit.errors import OptionError


class TomlError(OptionError):
    """A value that TOML cannot hold (``None``, or a type the writer does not know)."""


_BARE = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_key(key: str) -> str:
    """A bare key when TOML allows one, else a quoted key."""
    return key if _BARE.match(key) else toml_value(key)


def toml_value(value: Any) -> str:
    """One TOML value: string, integer, float (``inf``/``nan`` too), boolean, array or inline table.

    Raises:
        TomlError: None (TOML has no null) or another type.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return '"' + "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 32 or ord(c) == 127 else c)
                             for c in value) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{toml_key(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TomlError(f"cannot write {value!r} ({type(value).__name__}) in TOML")


def dumps(data: Mapping[str, Any]) -> str:
    """TOML text of ``{key: scalar or array, table: {key: value}}``: values first, then one ``[table]`` each.

    ``None`` values are left out (TOML has no null: an absent key means the default).
    """
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in data.items() if v is not None and not isinstance(v, Mapping)]
    for name, table in data.items():
        if isinstance(table, Mapping):
            lines += ["", f"[{toml_key(name)}]"]
            lines += [f"{toml_key(str(k))} = {toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"
