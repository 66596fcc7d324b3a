"""``RunConfig``: everything that defines a run, typed and validated; the CLI takes its defaults here.

Plugin names are strings resolved by :func:`compresskit.api.plan`; plugin options are plain
dicts validated against each plugin's ``Options`` there. ``pattern`` accepts the N:M shorthand
(``"2:4"``) as the CLI does. This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Literal, Mapping

from compresskit.errors import OptionError
from compresskit.engine.targets import check_fraction, parse_sparsity_map

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
PROPAGATE = ("pruned", "dense")
ACCUMULATE = ("float32", "float64")


@dataclasses.dataclass
class RunConfig:
    """Everything that defines a run.

    ``sparsity=None`` means "the pattern's implied sparsity, else 0.5". A mapping given as
    ``sparsity`` is taken as ``sparsity_map`` (``{layer glob: sparsity}``, see
    :mod:`compresskit.engine.targets`). ``update`` names the solver (``none``: zero the pruned weights
    and change nothing else; ``obs``: SparseGPT's reconstruction), ``allocation`` how the target
    is spread over layers. ``eval_limit`` ``None`` is the adapter's CPU-sized cap, ``0`` everything.
    ``select`` (``"metric.alpha=0,1,10"``) prunes once per value of one option and keeps the model
    with the lowest loss on ``select_nsamples`` held-out calibration samples (:mod:`compresskit.engine.select`).
    ``accumulate`` is the dtype of every statistic's sums (``float64``: finished in float32, so
    the result hardly depends on summation order, e.g. on how many ``torchrun`` ranks shared the
    samples; it sets the gradient precision to ``float64`` too).
    ``max_memory`` (bytes or a size such as ``"1.3GB"``), ``work_dir`` and ``resume`` ask for a
    streamed run (:mod:`compresskit.engine.stream`: one block in memory, resumable); a model that does not
    fit in memory streams without them.
    """

    adapter: str = "llama"
    model: str | None = None
    metric: str = "gblm"
    pattern: str = "unstructured"
    sparsity: float | None = None
    sparsity_map: dict[str, float] | None = None
    update: str = "none"
    allocation: str = "uniform"
    nsamples: int = 32
    seqlen: int = 256
    seed: int = 0
    calibration: str | None = None
    device: str = "auto"
    propagate: Literal["pruned", "dense"] = "pruned"
    report_error: bool = True
    evaluate: bool = False
    eval_data: str | None = None
    eval_limit: int | None = None
    eval_tasks: tuple[str, ...] = ()
    eval_task_limit: int | None = None
    eval_task_source: str = "packaged"
    adapter_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    metric_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    pattern_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    update_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    allocation_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    gradient_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    progress: bool = True
    select: str | None = None
    select_nsamples: int = 16
    accumulate: Literal["float32", "float64"] = "float32"
    max_memory: str | int | None = None
    work_dir: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, Mapping):
            if self.sparsity_map is not None:
                raise OptionError("give the per-layer map either as sparsity=... or as sparsity_map=..., not both")
            self.sparsity_map, self.sparsity = dict(self.sparsity), None
        self.validate()

    def validate(self) -> None:
        """Check every field's type and range; :class:`OptionError` names the field and the fix."""
        for name in ("adapter", "metric", "pattern", "update", "allocation", "device"):
            _expect(self, name, str, "a name")
        for name in ("model", "calibration", "eval_data"):
            if getattr(self, name) is not None:
                _expect(self, name, str, "a string")
        _expect(self, "nsamples", int, "an integer >= 1")
        _expect(self, "seqlen", int, "an integer >= 2")
        _expect(self, "seed", int, "an integer")
        if self.nsamples < 1 or self.seqlen < 2:
            raise OptionError(f"nsamples must be >= 1 and seqlen >= 2 (got {self.nsamples}, {self.seqlen})")
        if self.sparsity is not None:
            check_fraction(self.sparsity, "sparsity")
        if self.sparsity_map is not None:
            self.sparsity_map = parse_sparsity_map(self.sparsity_map)
        if self.propagate not in PROPAGATE:
            raise OptionError(f"propagate must be one of {', '.join(PROPAGATE)}, got {self.propagate!r}")
        _expect(self, "select_nsamples", int, "an integer >= 1")
        if self.select_nsamples < 1:
            raise OptionError(f"select_nsamples must be >= 1, got {self.select_nsamples}")
        if self.select is not None:
            from compresskit.engine.select import parse

            parse(self.select)
        if self.eval_limit is not None:
            _expect(self, "eval_limit", int, "an integer >= 0 (0: everything)")
            if self.eval_limit < 0:
                raise OptionError(f"eval_limit (--eval-windows) must be >= 0 (0: every window), got {self.eval_limit}")
        if self.accumulate not in ACCUMULATE:
            raise OptionError(f"accumulate must be one of {', '.join(ACCUMULATE)}, got {self.accumulate!r}")
        precision = self.gradient_options.get("precision") if isinstance(self.gradient_options, dict) else None
        if self.accumulate == "float64" and precision not in (None, "float64"):
            raise OptionError(f"accumulate=float64 keeps gradient sums in float64 too, but gradient.precision={precision} "
                              "asks otherwise; drop one of them")
        if self.max_memory is not None:
            from compresskit.engine.stream.memory import parse_size

            parse_size(self.max_memory)
        if self.work_dir is not None:
            _expect(self, "work_dir", str, "a directory path")
        for name in ("report_error", "evaluate", "progress", "resume"):
            _expect(self, name, bool, "True or False")
        if self.eval_task_limit is not None:
            _expect(self, "eval_task_limit", int, "an integer >= 0 (0: every example)")
            if self.eval_task_limit < 0:
                raise OptionError(f"eval_task_limit must be >= 0 (0: every example), got {self.eval_task_limit}")
        if isinstance(self.eval_tasks, str):
            self.eval_tasks = tuple(t.strip() for t in self.eval_tasks.split(",") if t.strip())
        self.eval_tasks = tuple(self.eval_tasks)
        for name in ("adapter", "metric", "pattern", "update", "allocation", "gradient"):
            if not isinstance(getattr(self, f"{name}_options"), dict):
                raise OptionError(f"{name}_options must be a dict of option names to values")

    def gradient_settings(self) -> dict[str, Any]:
        """``gradient_options`` with the precision ``accumulate=float64`` implies."""
        if self.accumulate == "float64":
            return {**self.gradient_options, "precision": "float64"}
        return dict(self.gradient_options)

    def pattern_spec(self) -> tuple[str, dict[str, Any]]:
        """The pattern name and options, with the ``N:M`` shorthand expanded (``2:4`` -> ``nm``, n=2, m=4).

        Raises:
            OptionError: the shorthand contradicts an explicit ``n``/``m`` option.
        """
        m = _NM.match(self.pattern)
        if not m:
            return self.pattern, dict(self.pattern_options)
        short = {"n": int(m.group(1)), "m": int(m.group(2))}
        for key, value in short.items():
            given = self.pattern_options.get(key)
            if given is not None and str(given) != str(value):
                raise OptionError(f"--pattern {self.pattern} sets {key}={value} but -o pattern.{key}={given} says "
                                  f"otherwise; drop one of them")
        return "nm", {**self.pattern_options, **short}


def _expect(config: RunConfig, name: str, tp: type, what: str) -> None:
    value = getattr(config, name)
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise OptionError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")


def _check_keys(values: Mapping[str, Any]) -> None:
    import difflib

    names = [f.name for f in dataclasses.fields(RunConfig)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise OptionError(f"unknown run setting {key!r}.{hint} Valid settings: {', '.join(names)}")


def from_dict(values: Mapping[str, Any]) -> RunConfig:
    """A :class:`RunConfig` from a plain dict; unknown keys are errors with the closest valid key."""
    _check_keys(values)
    return RunConfig(**values)


def replace(config: RunConfig | None, **overrides: Any) -> RunConfig:
    """``config`` (default: a new one) with ``overrides``; unknown keys are errors with the closest valid key."""
    _check_keys(overrides)
    return dataclasses.replace(config or RunConfig(), **overrides)
