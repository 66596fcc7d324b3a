"""Shared pieces of the conformance checks: the error type, class rules, the end-to-end prune."""

from __future__ import annotations

import dataclasses
from typing import Any

from compresskit.errors import CompressKitError
from compresskit.options import build
from compresskit.engine.registry import Origin, Registry
from compresskit.testing.factories import fresh_registry


class PluginConformanceError(CompressKitError, AssertionError):
    """A plugin class breaks a rule of its interface (the message says which and the fix)."""


def _fail(cls: type, rule: str, fix: str) -> None:
    raise PluginConformanceError(f"{cls.__module__}.{cls.__qualname__}: {rule}; {fix}")


def _registry_with(kind: str, cls: type, registry: Registry | None) -> Registry:
    """``registry`` (default: built-ins only) with ``cls`` added unless its name is taken by it."""
    reg = registry or fresh_registry()
    try:
        if reg.get(kind, cls.name).cls is cls:
            return reg
    except KeyError:
        pass
    reg.add(kind, cls, Origin(f"{cls.__module__} (under test)"))
    return reg


def _instance(cls: type, options: dict[str, Any] | None) -> Any:
    return cls(build(cls.Options, options or {}, "")) if options else cls()


def _check_class(cls: type, base: type, options: dict[str, Any] | None) -> list[str]:
    if not (isinstance(cls, type) and issubclass(cls, base)):
        _fail(cls, f"does not subclass {base.__name__}", f"derive from compresskit.{base.__name__}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name != name.lower() or " " in name:
        _fail(cls, f"name {name!r} is not a lowercase registry key", "set `name = \"my_thing\"` (snake case)")
    if not isinstance(getattr(cls, "summary", None), str) or not cls.summary.strip():
        _fail(cls, "has no `summary`", "set a one-line `summary` shown by `compresskit list`")
    if not (cls.__doc__ or "").strip():
        _fail(cls, "has no docstring", "document the plugin (paper link, summary, example CLI line)")
    opts = cls.Options
    if not dataclasses.is_dataclass(opts) or not opts.__dataclass_params__.frozen:
        _fail(cls, "Options is not a frozen dataclass", "use @dataclasses.dataclass(frozen=True) with option() fields")
    for f in dataclasses.fields(opts):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _fail(cls, f"option {f.name!r} has no default", "declare it with compresskit.option(default, help)")
        if not str(f.metadata.get("help", "")).strip():
            _fail(cls, f"option {f.name!r} has no help text", "declare it with compresskit.option(default, help)")
    for inst in (cls(), _instance(cls, options)):
        if not isinstance(inst.options, opts):
            _fail(cls, "cls(options) does not store its Options instance", "call super().__init__(options)")
    return ["class attributes", "options"]


ADAPTIVE_SLACK = 0.02
"""How far Wanda's adaptive rule may miss a layer's target: its bisection stops within 0.001 of
the target *or* when the bracket on its mass fraction closes, so it gives no rounding bound."""


def rounding(structure: dict[str, Any], shape: tuple[int, int]) -> float:
    """How far a layer's achieved sparsity may be from its target when the mask meets the target
    the way its structure promises: ``floor`` per comparison group, so less than one group's share.

    ``row`` and ``nm``: one weight per row (``1/in``); ``layer``: one weight of the matrix;
    a third-party group of width ``m``: one group per row (``m/in``); ``adaptive``: ``1/in`` plus
    ``ADAPTIVE_SLACK``.
    """
    out_f, in_f = shape
    group, m = structure.get("group"), max(int(structure.get("m") or 1), 1)
    if group == "layer":
        return 1.0 / (out_f * in_f)
    if group in ("row", "nm"):
        return 1.0 / in_f
    if group == "adaptive":
        return 1.0 / in_f + ADAPTIVE_SLACK
    return m / in_f


def _end_to_end(cls: type, registry: Registry, **config: Any) -> Any:
    """Prune through :func:`compresskit.api.prune` and check the result is a sane pruned model."""
    import torch

    from compresskit.api import prune

    base = dict(model="random:tiny", nsamples=4, seqlen=16, device="cpu", progress=False)
    result = prune(registry=registry, **{**base, **config})
    report = result.report
    if not report.layers:
        _fail(cls, "end-to-end prune reported no pruned layers", "check blocks()/prunable() of the adapter")
    structure = result.manifest["resolved"]["structure"]
    for row in report.layers:
        if abs(row.sparsity - row.target) >= rounding(structure, row.shape):  # floor: strictly less
            _fail(cls, f"end-to-end sparsity {row.sparsity:.4f} of layer {row.block}.{row.name} misses its target "
                  f"{row.target:.4f} by more than the rounding of its {structure['group']!r} groups",
                  "make the mask prune the requested fraction")
    batch = result.adapter.calibration_batches(result.loaded, 1, 16, 123, None)[0]
    with torch.no_grad():
        out = result.adapter.forward(result.loaded.model, batch)
    out = getattr(out, "logits", out)
    out = out[0] if isinstance(out, (tuple, list)) else out
    if not torch.isfinite(out.float()).all():
        _fail(cls, "the pruned model produces non-finite outputs", "keep scores finite and weights untouched by NaN")
    return result
