"""Recipes: the settings of a run as a TOML file, read by ``compresskit prune --recipe FILE`` and
written from an output's ``compresskit.json`` by ``compresskit recipe DIR``.

A recipe holds ``compresskit prune`` options under their long names (``sparsity = 0.5``,
``eval-windows = 40``, ``error-report = false``; ``-`` and ``_`` are the same) and plugin options
in one table per scope (``[metric]`` ``alpha = 100``), for every ``-o SCOPE.KEY=VALUE`` scope. In
TOML a key cannot be both a value and a table, so a plugin chosen together with options is named
inside its table: ``[metric]`` ``name = "gblm"``, ``alpha = 100`` (``metric = "wanda"`` alone works too).
The keys come from the ``prune`` command itself, so an option added to the command is a recipe key
at once, checked and converted by the same click types. Precedence: options given on the command
line, then the recipe, then the defaults. Reading uses the standard library's ``tomllib``
(``tomli`` on Python 3.10); writing needs no library (:mod:`compresskit.cli.toml`). This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from typing import Any, Mapping

import click
from click.core import ParameterSource

from compresskit.cli.toml import dumps, toml_key, toml_value
from compresskit.errors import CompressKitError, OptionError
from compresskit.engine.kinds import BY_FIELD

SCOPES = (*BY_FIELD, "gradient")
"""Plugin option tables: one per ``-o`` scope (the plugin kinds' fields, plus the gradient engine)."""

TABLE_PARAMS = {"sparsity_map"}
"""Options that also take a TOML table (``[sparsity-map]`` ``"3.mlp.*" = 0.6``) besides a file path."""

NAME_KEY = "name"
"""Inside a plugin kind's table, the key that chooses the plugin (``[metric]`` ``name = "gblm"``)."""

NOT_RECIPE = {"recipe", "options", "help"}
"""``prune`` parameters that are no recipe keys (``options`` are the scope tables)."""

FIELD_TO_PARAM = {"report_error": "error_report", "eval_limit": "eval_windows", "eval_task_limit": "eval_limit",
                  "eval_task_source": "task_source"}
"""RunConfig fields whose ``prune`` option has another name (the rest share theirs)."""

NOT_ON_CLI = {"progress"}
"""RunConfig fields a recipe does not carry (they do not change what a run computes)."""

API_ONLY: set[str] = set()
"""RunConfig fields no ``prune`` option sets (none today): :func:`from_manifest` refuses a non-default value."""

PAPER = {"nsamples": 128, "seqlen": 2048, "eval_windows": 0}
"""What ``--paper`` (or ``paper = true``) sets, unless the same or a higher source sets it too."""

_GIVEN = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)


class RecipeError(OptionError):
    """A recipe file that cannot be read, or a key or value in it that is wrong."""


@dataclasses.dataclass
class Recipe:
    """A parsed recipe: top-level settings (keys with ``_``) and plugin options by scope."""

    settings: dict[str, Any]
    options: dict[str, dict[str, Any]]
    source: str = "<recipe>"


# --------------------------------------------------------------------------- reading


def _tomllib():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise CompressKitError("reading recipes needs Python >= 3.11 (tomllib) or `pip install tomli`") from None
    return tomllib


def _norm(key: str) -> str:
    return key.strip().replace("-", "_")


def read(path: str) -> Recipe:
    """Read a recipe file (``-``: standard input; ``<(compresskit recipe out/)`` works too).

    Raises:
        RecipeError: the file is missing or not valid TOML.
    """
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}; give an existing TOML file "
                          "(`compresskit recipe OUTPUT_DIR > recipe.toml` writes one)") from None
    return loads(text, "<stdin>" if path == "-" else path)


def loads(text: str, source: str = "<recipe>") -> Recipe:
    """Parse recipe text: top-level values are settings, tables are plugin options (or a sparsity map)."""
    lib = _tomllib()
    try:
        data = lib.loads(text)
    except lib.TOMLDecodeError as exc:
        hint = (" (a key cannot be both a value and a table: choose a plugin with options as [metric] then "
                'name = "gblm" and alpha = 100)') if "overwrite" in str(exc) else ""
        raise RecipeError(f"recipe {source} is not valid TOML ({exc}){hint}; `compresskit recipe OUTPUT_DIR` "
                          "writes a valid one to start from") from None
    settings: dict[str, Any] = {}
    options: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        name = _norm(key)
        if name in settings or name in options:
            raise RecipeError(f"recipe {source}: {key!r} is given twice ('-' and '_' are the same in keys)")
        if isinstance(value, dict) and name in SCOPES:
            options[name] = dict(value)
            if name in BY_FIELD and NAME_KEY in value:
                settings[name] = options[name].pop(NAME_KEY)
        else:
            settings[name] = value
    return Recipe(settings, options, source)


def _keys(command: click.Command) -> dict[str, click.Parameter]:
    """Recipe key (``_`` form) -> the command's parameter: its long option names and its name."""
    out: dict[str, click.Parameter] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name in NOT_RECIPE:
            continue
        for opt in [o for o in param.opts if o.startswith("--")] + [param.name]:
            out[_norm(opt.lstrip("-"))] = param
    return out


def key_name(param: click.Parameter) -> str:
    """The recipe key written for a parameter: its first long option without ``--`` (``eval-windows``)."""
    longs = [o for o in param.opts if o.startswith("--")]
    return longs[0][2:] if longs else param.name.replace("_", "-")


def _unknown(recipe: Recipe, key: str, keys: dict[str, click.Parameter]) -> RecipeError:
    valid = sorted({key_name(p) for p in keys.values()})
    candidates = {_norm(k): k for k in valid} | {s: f"[{s}]" for s in SCOPES}
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    renamed = {f: key_name(keys[p]) for f, p in FIELD_TO_PARAM.items() if p in keys}
    if key in renamed:
        hint = f" Did you mean {renamed[key]!r} (the option for RunConfig.{key})?"
    elif key == "recipe":
        hint = " A recipe cannot name another recipe."
    else:
        hint = f" Did you mean {candidates[close[0]]!r}?" if close else ""
    return RecipeError(f"recipe {recipe.source}: unknown key {key.replace('_', '-')!r}.{hint} Keys: "
                       f"{', '.join(valid)}; tables: {', '.join(f'[{s}]' for s in SCOPES)}")


def _convert(recipe: Recipe, key: str, value: Any, param: click.Parameter, ctx: click.Context) -> Any:
    label = f"recipe {recipe.source}: {key_name(param)}"
    if isinstance(value, dict):
        if param.name in TABLE_PARAMS:
            return value
        raise RecipeError(f"{label} is a table; give a value (or, for plugin options, use a [{'|'.join(SCOPES)}] table)")
    if isinstance(value, list) and not param.multiple:
        value = ",".join(str(v) for v in value)  # comma-separated options (task lists) take arrays
    values = value if isinstance(value, list) else [value]
    tp = param.type
    for v in values:
        if isinstance(tp, click.types.BoolParamType) or getattr(param, "is_flag", False):
            ok, what = isinstance(v, bool), "true or false"
        elif isinstance(tp, click.types.IntParamType):
            ok, what = isinstance(v, int) and not isinstance(v, bool), "an integer"
        elif isinstance(tp, click.types.FloatParamType):
            ok, what = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a finite number"
        else:
            ok, what = isinstance(v, str), "a string (in quotes)"
        if not ok:
            raise RecipeError(f"{label} must be {what}, got {v!r}")
    try:
        converted = [tp.convert(v, param, ctx) for v in values]
    except click.BadParameter as exc:
        raise RecipeError(f"{label}: {exc.message}") from None
    return tuple(converted) if param.multiple else converted[0]


# --------------------------------------------------------------------------- applying


def resolve(ctx: click.Context, params: dict[str, Any], options: dict[str, dict[str, Any]],
            recipe: Recipe | None) -> tuple[dict[str, Any], dict[str, dict[str, Any]], list[str]]:
    """The ``prune`` parameters after the recipe and ``--paper``: command line > recipe > defaults.

    Args:
        ctx: the running command's context (which parameters the user gave: click's parameter source).
        params: the command's parameters as click parsed them.
        options: ``-o`` values by scope; the recipe's tables fill the keys the command line leaves out.
        recipe: the parsed recipe, or None.

    Returns:
        ``(params, options, notes)``; notes say what the recipe lost to the command line.

    Raises:
        RecipeError: an unknown key (with the closest valid one) or a value of the wrong type.
    """
    given = {name for name in params if ctx.get_parameter_source(name) in _GIVEN}
    params, options, notes = dict(params), {s: dict(v) for s, v in options.items()}, []
    from_recipe: set[str] = set()
    if recipe is not None:
        keys = _keys(ctx.command)
        for key, value in recipe.settings.items():
            if key not in keys:
                raise _unknown(recipe, key, keys)
            param = keys[key]
            converted = _convert(recipe, key, value, param, ctx)
            if param.name not in given:
                params[param.name] = converted
                from_recipe.add(param.name)
        for scope, values in recipe.options.items():
            named = recipe.settings.get(scope)
            if scope in given and named is not None and _norm(str(named)).lower() != _norm(str(params[scope])).lower():
                if values:
                    notes.append(f"--{scope} {params[scope]} replaces the recipe's {scope} {named}; its [{scope}] "
                                 f"options ({', '.join(values)}) are not used")
                continue
            options[scope] = {**values, **options.get(scope, {})}
    if params.get("paper"):
        explicit = given if "paper" in given else given | from_recipe
        for key, value in PAPER.items():
            if key in params and key not in explicit:
                params[key] = value
    return params, options, notes


def from_manifest(manifest: Mapping[str, Any], command: click.Command, where: str = "") -> str:
    """The recipe of a finished run, from its ``compresskit.json``: ``prune --recipe`` reruns it.

    Written: every setting of the run's ``config`` under its ``prune`` option name (None values
    left out: they are the defaults), ``model`` as resolved (so a changed adapter default cannot
    change the rerun), and each scope's options as the run was given them, typed as resolved;
    the other resolved options follow as comments.

    Raises:
        CompressKitError: the manifest has no ``config``, or a setting with a non-default value
            that no ``prune`` option expresses.
    """
    from compresskit.config import RunConfig

    config, resolved = manifest.get("config"), manifest.get("resolved", {})
    if not isinstance(config, Mapping):
        raise CompressKitError(f"{where or 'the manifest'} has no 'config' section; it was not written by "
                               "`compresskit prune` (re-run the prune that made it)")
    params = {p.name: p for p in command.params if isinstance(p, click.Option)}
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}
    top: dict[str, Any] = {}
    notes: list[str] = []
    for field, value in config.items():
        if field.endswith("_options") or field in NOT_ON_CLI:
            continue
        name = FIELD_TO_PARAM.get(field, field)
        if field == "model" and value is None and resolved.get("model"):
            value = resolved["model"]
            notes.append(f"model: the adapter's default when the run was made ({value})")
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        if name not in params:
            if field in defaults and value == defaults[field]:
                continue
            raise CompressKitError(f"{where or 'the manifest'}: setting {field}={value!r} has no `compresskit prune` "
                                   "option, so a recipe cannot carry it; rerun it through the Python API "
                                   "(compresskit.prune(**config))")
        top[key_name(params[name])] = list(value) if isinstance(value, (list, tuple)) else value
    order = {key_name(p): i for i, p in enumerate(command.params)}
    kinds = {key_name(params[f]): f for f in BY_FIELD if f in params}
    named = {kinds[k]: top.pop(k) for k in list(top) if k in kinds}
    top = dict(sorted(top.items(), key=lambda kv: order.get(kv[0], len(order))))
    lines = [f"# compresskit recipe{f' of {where}' if where else ''}, from its compresskit.json "
             f"(run with compresskit {manifest.get('compresskit_version', '?')})",
             "# Rerun: compresskit prune --recipe THIS.toml --output DIR   (options given there override these)"]
    lines += [f"# {note}" for note in notes]
    lines += dumps(top).rstrip("\n").split("\n")
    for scope in SCOPES:
        given = dict(config.get(f"{scope}_options") or {})
        typed = dict(resolved.get(f"{scope}_options") or {})
        table = ({NAME_KEY: named[scope]} if scope in named else {}) | {k: typed.get(k, v) for k, v in given.items()}
        rest = {k: v for k, v in typed.items() if k not in given}
        if not table and not rest:
            continue
        lines += ["", f"[{scope}]"]
        lines += [f"{toml_key(str(k))} = {toml_value(v)}" for k, v in table.items()]
        if rest:
            lines.append("# resolved, not set by the run:")
            lines += [f"# {toml_key(k)} = {toml_value(v) if v is not None else '(none)'}" for k, v in rest.items()]
    return "\n".join(lines) + "\n"
