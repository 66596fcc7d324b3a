"""The Python API: ``plan`` resolves a config, ``prune`` runs it, ``check`` is the dry run,
``evaluate`` measures a model. The CLI is a thin layer over this module.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compresskit._version import __version__
from compresskit.config import RunConfig
from compresskit.errors import CompressKitError, IncompatiblePatternError, OptionError
from compresskit.interfaces import EvalRequest, Loaded, ModelAdapter
from compresskit.kinds import KINDS
from compresskit.options import as_dict, build
from compresskit.registry import Registry

if TYPE_CHECKING:
    import torch

    from compresskit.run import PruneReport, Run

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Plan:
    """Names resolved to configured plugin instances (before any model is loaded).

    ``plugins`` maps each kind (``adapter``, ``metric``, ``pattern``, ``solver``, ``allocation``)
    to its instance; ``gradient_stats`` are the gradient statistics to collect before pruning.
    """

    config: RunConfig
    registry: Registry
    plugins: dict[str, Any]
    sparsity: float
    origins: dict[str, str]
    gradient_stats: list[Any]

    @property
    def adapter(self) -> Any:
        return self.plugins["adapter"]

    @property
    def metric(self) -> Any:
        return self.plugins["metric"]

    @property
    def pattern(self) -> Any:
        return self.plugins["pattern"]

    @property
    def solver(self) -> Any:
        return self.plugins["solver"]

    @property
    def allocation(self) -> Any:
        return self.plugins["allocation"]


@dataclasses.dataclass
class PruneResult:
    """A pruned model with its report and manifest; ``save(dir)`` writes both atomically."""

    loaded: Loaded
    adapter: ModelAdapter
    report: PruneReport
    manifest: dict[str, Any]
    run: Run | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the model and ``compresskit.json`` into ``directory`` atomically."""
        from compresskit.output import save_output

        return save_output(directory, lambda tmp: self.adapter.save(self.loaded, tmp), self.manifest, overwrite)


def _options(kind: str, entries: dict[str, Any], values: dict[str, Any]) -> Any:
    """Build ``kind``'s ``Options``; an unknown key names the scope where that key does exist."""
    from compresskit.gradients import GradientOptions

    cls = entries[kind].cls
    try:
        return build(cls.Options, values, f"{KINDS[kind].field}.")
    except OptionError as exc:
        fields = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = next((k for k in values if k not in fields), None)
        if unknown is None:
            raise
        others = {KINDS[k].field: e.cls.Options for k, e in entries.items() if k != kind}
        others["gradient"] = GradientOptions
        scope = next((s for s, o in others.items() if unknown in {f.name for f in dataclasses.fields(o)}), None)
        hint = f" ('{unknown}' is an option of the {scope} scope: -o {scope}.{unknown}=...)" if scope else ""
        raise OptionError(f"{exc}{hint}") from None


def plan(config: RunConfig, registry: Registry | None = None) -> Plan:
    """Resolve plugin names, validate every option and every combination, before loading anything."""
    from compresskit import stats as st

    reg = registry or Registry.from_entrypoints()
    config.validate()
    pattern_name, pattern_opts = config.pattern_spec()
    names = {"adapter": config.adapter, "metric": config.metric, "pattern": pattern_name,
             "solver": config.update, "allocation": config.allocation}
    values = {"adapter": config.adapter_options, "metric": config.metric_options, "pattern": pattern_opts,
              "solver": config.update_options, "allocation": config.allocation_options}
    entries = {k: reg.get(k, names[k]) for k in KINDS}
    metric_cls = entries["metric"].cls
    if metric_cls.mask_solver is not None:  # the metric's mask comes out of that solver's sweep
        if _norm(config.update) not in ("none", _norm(metric_cls.mask_solver)):
            raise OptionError(f"metric {metric_cls.name!r} chooses its mask inside the {metric_cls.mask_solver!r} "
                              f"solver; --update {config.update} cannot apply: drop --update")
        entries["solver"] = reg.get("solver", metric_cls.mask_solver)
    opts = {k: _options(k, entries, values[k]) for k in entries}
    plugins = {k: e.cls(opts[k]) for k, e in entries.items() if k != "adapter"}
    plugins["adapter"] = entries["adapter"].cls(opts["adapter"], alias=config.adapter)
    plugins["pattern"] = _resolve_group(config, plugins["metric"], plugins["pattern"], pattern_opts)
    pattern = plugins["pattern"]
    implied = pattern.implied_sparsity
    if implied is not None:
        if config.sparsity is not None and abs(config.sparsity - implied) > 1e-9:
            raise IncompatiblePatternError(
                f"--sparsity {config.sparsity} contradicts pattern {config.pattern}, which implies {implied:g}; "
                "drop --sparsity or use --pattern unstructured")
        if config.sparsity_map or _norm(config.allocation) != "uniform":
            what = "--sparsity-map" if config.sparsity_map else f"--allocation {config.allocation}"
            raise IncompatiblePatternError(f"{what} sets per-layer targets, but pattern {config.pattern} fixes every "
                                           f"layer at {implied:g}; use --pattern unstructured or drop {what}")
    sparsity = implied if implied is not None else (0.5 if config.sparsity is None else config.sparsity)
    if plugins["metric"].mask_solver is not None and not _overrides(plugins["solver"], "select_and_solve"):
        raise CompressKitError(f"solver {plugins['solver'].name!r} cannot choose masks for {config.metric!r}")
    needs = st.resolve([*plugins["metric"].statistics(), *plugins["solver"].statistics()])
    grads = [s for s in needs if s.source == "gradients"]
    gradient_stats = _gradient_stats(config, plugins["adapter"], grads)
    origins = {k: str(e.origin) for k, e in entries.items()}
    return Plan(config, reg, plugins, sparsity, origins, gradient_stats)


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _overrides(obj: Any, method: str) -> bool:
    from compresskit.interfaces import Solver

    return getattr(type(obj), method) is not getattr(Solver, method)


def _resolve_group(config: RunConfig, metric: Any, pattern: Any, pattern_opts: dict[str, Any]) -> Any:
    """Apply the metric's comparison group to the pattern, unless the user chose one explicitly."""
    want = metric.comparison_group()
    if want is None:
        return pattern
    explicit = want != type(metric)().comparison_group()  # asked for by a non-default metric option
    regrouped = pattern.with_group(want)
    if regrouped is None:
        if explicit:
            raise IncompatiblePatternError(f"metric {metric.name!r} options ask for comparison group {want!r}, which "
                                           f"pattern {config.pattern!r} does not offer; use --pattern unstructured "
                                           "or drop that metric option")
        return pattern
    user_group = pattern_opts.get("scope")
    if user_group is not None and str(user_group) != want:
        if explicit:
            raise OptionError(f"metric {metric.name!r} options ask for comparison group {want!r} but -o pattern.scope="
                              f"{user_group} says otherwise; drop one of them")
        return pattern
    return regrouped


def _gradient_stats(config: RunConfig, adapter: ModelAdapter, grads: list[Any]) -> list[Any]:
    from compresskit.gradients import GradientOptions

    opts = build(GradientOptions, config.gradient_options, "gradient.")
    if not grads:
        if config.gradient_options:
            raise OptionError(f"gradient options ({', '.join(config.gradient_options)}) were given but metric "
                              f"{config.metric!r} uses no gradients; drop --gradients / -o gradient.*")
        return []
    if type(adapter).loss is ModelAdapter.loss:
        raise CompressKitError(f"metric {config.metric!r} needs gradients but adapter {adapter.name!r} defines no loss")
    return [dataclasses.replace(g, precision=opts.precision) for g in grads]


def resolve_eval_limit(adapter: ModelAdapter, limit: int | None) -> int | None:
    """``None`` -> the adapter's CPU-sized default cap; ``0`` -> no cap (evaluate everything)."""
    if limit is None:
        return adapter.default_eval_limit
    return None if limit == 0 else limit


def _start(config: RunConfig, registry: Registry | None) -> tuple[Plan, Run]:
    """Plan, load, and check every layer (shared by :func:`prune` and :func:`check`)."""
    from compresskit.device import resolve_device
    from compresskit.run import Run, RunnerSettings
    from compresskit.runner import check_layers
    from compresskit.targets import check_covers, layer_id

    p = plan(config, registry)
    device = resolve_device(config.device)
    loaded = p.adapter.load(p.adapter.resolve_source(config.model))
    settings = RunnerSettings(sparsity=p.sparsity, device=device, propagate=config.propagate,
                              report_error=config.report_error, progress=config.progress)
    run = Run(p.adapter, p.metric, p.pattern, loaded, settings, p.solver, p.allocation, hook=p.registry.pm.hook,
              sparsity_map=config.sparsity_map, pm=p.registry.pm)
    check_layers(run)  # fail fast, before calibration
    if config.sparsity_map:
        blocks = p.adapter.blocks(loaded.model)
        check_covers(config.sparsity_map, [layer_id(i, n) for i, b in enumerate(blocks) for n in p.adapter.prunable(b)])
    return p, run


def check(config: RunConfig | None = None, registry: Registry | None = None, **overrides: Any) -> dict[str, Any]:
    """The dry run: resolve plugins, load the model, check every layer against the pattern.

    Returns:
        ``{"layers", "blocks", "pattern", "sparsity"}`` of the checked model.
    """
    config = dataclasses.replace(config or RunConfig(), **overrides)
    if _streamed(config, registry):
        from compresskit.stream import engine

        return engine.check(config, registry)
    p, run = _start(config, registry)
    blocks = p.adapter.blocks(run.model)
    return {"layers": sum(len(p.adapter.prunable(b)) for b in blocks), "blocks": len(blocks),
            "pattern": p.pattern.name, "sparsity": p.sparsity}


def prune(config: RunConfig | None = None, registry: Registry | None = None, **overrides: Any) -> PruneResult:
    """Prune a model end to end and return the result (not yet saved).

    A run with ``max_memory``, ``work_dir`` or ``resume``, or whose local checkpoint does not fit
    in memory, is streamed one block at a time (:func:`compresskit.stream.engine.prune`; its
    result holds the model on disk until ``save``).

    Args:
        config: a :class:`RunConfig`; keyword ``overrides`` replace its fields.
        registry: plugin registry (default: every installed plugin).

    Example:
        >>> result = prune(adapter="llama", model="random:tiny", metric="wanda", sparsity=0.5)
    """
    from compresskit.cache import tensor_fingerprint
    from compresskit.runner import prune_model

    config = dataclasses.replace(config or RunConfig(), **overrides)
    if _streamed(config, registry):  # one block in memory at a time (compresskit.stream)
        from compresskit.stream import engine

        return engine.prune(config, registry)
    t0 = time.perf_counter()
    p, run = _start(config, registry)
    source, device = run.loaded.source, run.settings.device
    calibration = config.calibration or p.adapter.default_calibration(source)
    run.batches = p.adapter.calibration_batches(run.loaded, config.nsamples, config.seqlen, config.seed, calibration)
    manifest = _manifest(config, p, run, calibration, tensor_fingerprint(run.batches))
    request = EvalRequest(config.eval_data, resolve_eval_limit(p.adapter, config.eval_limit), str(device),
                          config.seqlen, config.eval_tasks, config.progress)
    if config.evaluate:
        manifest["evaluation"] = {"dense": _evaluate_loaded(p.adapter, run.loaded, request)}
    if p.gradient_stats:
        from compresskit import gradients

        run.gradients, manifest["gradients"] = gradients.obtain(
            p.adapter, run.loaded, run.batches, p.gradient_stats, device, config.gradient_options, config.progress)
    report = prune_model(run)
    manifest["report"] = report.to_dict()
    manifest["notes"] = run.notes
    manifest["total_seconds"] = time.perf_counter() - t0
    if config.evaluate:
        manifest["evaluation"]["pruned"] = _evaluate_loaded(p.adapter, run.loaded, request)
    return PruneResult(run.loaded, p.adapter, report, manifest, run)


def _streamed(config: RunConfig, registry: Registry | None) -> bool:
    from compresskit.stream import wanted

    return wanted(config, registry)


def _manifest(config: RunConfig, p: Plan, run: Run, calibration: str | None, fingerprint: str) -> dict[str, Any]:
    return {
        "compresskit_version": __version__,
        "config": dataclasses.asdict(config),
        "resolved": {
            "model": run.loaded.source,
            "sparsity": p.sparsity,
            "device": str(run.settings.device),
            **{f"{KINDS[k].field}_options": as_dict(p.plugins[k].options) for k in KINDS},
            "pattern_name": p.pattern.name,
            "structure": dataclasses.asdict(p.pattern.structure),
            "solver": p.solver.name,
        },
        "plugins": p.origins,
        "model_info": run.loaded.info,
        "seed": config.seed,
        "calibration": {**p.adapter.describe_data(calibration), "nsamples": config.nsamples,
                        "seqlen": config.seqlen, "fingerprint": fingerprint},
        "versions": _versions(),
    }


def _evaluate_loaded(adapter: ModelAdapter, loaded: Loaded, request: EvalRequest) -> dict[str, Any]:
    """Evaluate on ``request.device`` and put the model back where it was."""
    import torch

    from compresskit.device import model_device

    home = model_device(loaded.model)
    loaded.model.to(torch.device(request.device))
    try:
        return adapter.evaluate(loaded, request)
    finally:
        loaded.model.to(home)


def evaluate(model: str | Path | Loaded, adapter: str | None = None, data: str | None = None, seqlen: int = 256,
             limit: int | None = None, device: str = "auto", tasks: tuple[str, ...] | str = (), progress: bool = True,
             registry: Registry | None = None, adapter_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate a model source, an output directory, or a loaded model (perplexity, accuracy, tasks).

    Args:
        model: a compresskit output directory, any source the adapter loads, or a :class:`Loaded`.
        adapter: model family; default: the output's manifest, else ``llama``.
        limit: cap on windows/batches (None: the adapter's default cap; 0: everything).
        device: ``auto`` (CUDA if present), ``cpu``, ``cuda:1``, ...

    Returns:
        The adapter's result dict plus ``model``, ``adapter`` and ``device``.
    """
    from compresskit.device import resolve_device
    from compresskit.output import read_manifest

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise OptionError(f"the evaluation limit must be an integer >= 0 (0: everything), got {limit!r}")
    reg = registry or Registry.from_entrypoints()
    manifest = read_manifest(model) if isinstance(model, (str, Path)) and Path(model).is_dir() else None
    recorded = (manifest or {}).get("config", {})
    entry = reg.get("adapter", adapter or recorded.get("adapter") or "llama")
    options = adapter_options if adapter_options is not None else (recorded.get("adapter_options", {}) if not adapter else {})
    ad = entry.cls(build(entry.cls.Options, options, "adapter."))
    loaded = model if isinstance(model, Loaded) else ad.load(str(model))
    dev = resolve_device(device)
    tasks = tuple(t.strip() for t in tasks.split(",") if t.strip()) if isinstance(tasks, str) else tuple(tasks)
    res = _evaluate_loaded(ad, loaded, EvalRequest(data, resolve_eval_limit(ad, limit), str(dev), seqlen, tasks, progress))
    name = loaded.source if isinstance(model, Loaded) else str(model)
    return {"model": name, "adapter": ad.name, "device": str(dev), **res}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "timm", "pluggy", "safetensors", "datasets"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out
