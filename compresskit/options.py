"""Typed plugin options: frozen dataclasses whose fields carry a help text.

Every plugin declares ``Options`` as a frozen dataclass built with :func:`option`.
Values given as strings (``-o metric.alpha=0``) are converted by the field's type, and
``Literal`` types double as the list of allowed choices. A union such as ``int | Literal["auto"]``
tries its members in order (``auto`` -> ``"auto"``, ``3`` -> ``3``).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal, get_args, get_origin

from compresskit.errors import OptionError


def option(default: Any, help: str) -> Any:
    """Declare one option field with a default and a one-line description."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of a plugin that has nothing to configure."""


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    """One option as shown by ``compresskit info``."""

    name: str
    type: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None


def describe(options_cls: type) -> list[OptionInfo]:
    """List the fields of an Options dataclass with their types, defaults and help."""
    hints = typing.get_type_hints(options_cls)
    out = []
    for f in dataclasses.fields(options_cls):
        tp = hints[f.name]
        choices = _choices(tp)
        members = _members(tp)
        if len(members) > 1:
            tname = "|".join(_name(m).replace(" or ", "|").replace("'", "") for m in members)
        else:
            tname = "choice" if choices else getattr(_base(tp), "__name__", str(tp))
        out.append(OptionInfo(f.name, tname, f.default, f.metadata.get("help", ""), choices))
    return out


def build(options_cls: type, values: dict[str, Any], scope: str = "") -> Any:
    """Validate ``values`` against ``options_cls`` and return an instance.

    Raises:
        OptionError: an unknown key (with the valid keys) or a value of the wrong type.
    """
    hints = typing.get_type_hints(options_cls)
    names = [f.name for f in dataclasses.fields(options_cls)]
    kwargs = {}
    for key, raw in values.items():
        if key not in names:
            import difflib

            valid = ", ".join(names) or "(this plugin has no options)"
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise OptionError(f"unknown option '{scope}{key}'{hint}; valid options: {valid}")
        kwargs[key] = _convert(hints[key], raw, f"{scope}{key}")
    return options_cls(**kwargs)


def as_dict(options: Any) -> dict[str, Any]:
    """Plain-dict view of an Options instance (for manifests)."""
    return dataclasses.asdict(options)


def _choices(tp: Any) -> tuple[Any, ...] | None:
    return get_args(tp) if get_origin(tp) is Literal else None


def _base(tp: Any) -> Any:
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        return args[0]
    return tp


def _name(tp: Any) -> str:
    """``int``, or a Literal's choices: ``'auto'`` (``'a' or 'b'``)."""
    if _choices(tp) is not None:
        return " or ".join(repr(c) for c in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _members(tp: Any) -> list[Any]:
    """The types a union field accepts, ``None`` left out (a plain type: itself)."""
    if get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return [a for a in get_args(tp) if a is not type(None)]
    return [tp]


def _convert(tp: Any, raw: Any, label: str) -> Any:
    members = _members(tp)
    if len(members) > 1 and not (raw is None or (isinstance(raw, str) and raw.lower() == "none")):
        for m in members:  # e.g. int | Literal["auto"]: the first member that takes the value
            try:
                return _convert(m, raw, label)
            except OptionError:
                continue
        names = [_name(m) for m in members]
        raise OptionError(f"option {label} expects {' or '.join(names)}, got {raw!r}")
    choices = _choices(tp)
    if choices is not None:
        for c in choices:
            if raw == c or (isinstance(raw, str) and str(c) == raw):
                return c
        raise OptionError(f"option {label}={raw!r} is not one of {', '.join(map(str, choices))}")
    if raw is None or (isinstance(raw, str) and raw.lower() == "none" and type(None) in get_args(tp)):
        if type(None) in get_args(tp):
            return None
    base = _base(tp)
    if not isinstance(raw, str):
        if base is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, base):
            return raw
        raise OptionError(f"option {label} expects {base.__name__}, got {raw!r}")
    try:
        if base is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return base(raw)
    except (TypeError, ValueError):
        raise OptionError(f"option {label} expects {getattr(base, '__name__', base)}, got {raw!r}") from None
