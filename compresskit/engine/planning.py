"""Resolving a run: ``plan`` turns a :class:`~compresskit.config.RunConfig` into plugin instances,
:class:`PruneResult` is what a prune returns, ``_manifest`` starts its ``compresskit.json``.

The API (:mod:`compresskit.api`) and the streamed engine (:mod:`compresskit.engine.stream`) both build on
this module; it imports neither.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compresskit._version import __version__
from compresskit.config import RunConfig
from compresskit.errors import CompressKitError, IncompatiblePatternError, OptionError
from compresskit.interfaces import EvalRequest, Loaded, ModelAdapter
from compresskit.engine.kinds import KINDS
from compresskit.options import as_dict, build
from compresskit.engine.registry import Registry

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

    def check_run(self, run: Run) -> None:
        """Before any calibration: every layer accepts the pattern, a sparsity map covers every layer,
        and a uniform target that rounds to little is warned about (recorded in ``run.notes``)
        or refused when it prunes nothing."""
        from compresskit.engine import checks
        from compresskit.engine.runner import check_layers
        from compresskit.engine.targets import check_covers, layer_id

        c, model = self.config, run.loaded.model
        check_layers(run)
        if not c.sparsity_map and _norm(c.allocation) == "uniform":  # else per-layer targets decide
            rounding = checks.rounding_report(self.adapter, model, self.pattern, self.sparsity)
            if rounding:
                log.warning("%s", rounding)
                run.notes.setdefault("compresskit", {}).setdefault("warnings", []).append(rounding)
        if c.sparsity_map:
            from compresskit.engine.targets import lookup

            blocks = self.adapter.blocks(model)
            check_covers(c.sparsity_map, [layer_id(i, n) for i, b in enumerate(blocks) for n in self.adapter.prunable(b)])
            rounding = checks.map_rounding_report(self.pattern, [
                (layer_id(i, n), tuple(layer.weight.shape), _or(lookup(c.sparsity_map, layer_id(i, n)), self.sparsity))
                for i, b in enumerate(blocks) for n, layer in self.adapter.prunable(b).items()])
            if rounding:
                log.warning("%s", rounding)
                run.notes.setdefault("compresskit", {}).setdefault("warnings", []).append(rounding)

    def new_run(self, loaded: Loaded, device: Any) -> Run:
        """The run state for ``loaded`` on ``device``: this plan's plugins and the config's settings."""
        from compresskit.run import Run, RunnerSettings

        c = self.config
        settings = RunnerSettings(sparsity=self.sparsity, device=device, propagate=c.propagate,
                                  report_error=c.report_error, progress=c.progress, accumulate=c.accumulate)
        return Run(self.adapter, self.metric, self.pattern, loaded, settings, self.solver, self.allocation,
                   hook=self.registry.pm.hook, sparsity_map=c.sparsity_map, pm=self.registry.pm)


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

    def _write_dense(self, tmp: Path) -> None:
        """The model's dense files into ``tmp`` (a streamed result links its shards instead)."""
        self.adapter.save(self.loaded, tmp)

    def save(self, directory: str | Path, overwrite: bool = False, format: str = "dense", progress: bool = True) -> Path:
        """Write the model and ``compresskit.json`` into ``directory`` atomically.

        ``format`` other than ``dense`` (one of the adapter's ``save_formats``) saves a dense copy
        in a temporary sibling and exports it from there. Under ``torchrun`` rank 0 alone writes;
        the other ranks return at once.
        """
        import shutil
        import tempfile

        from compresskit.engine import distributed
        from compresskit.output import check_target, save_output, signals_as_exceptions

        if not distributed.current().is_writer:
            return Path(directory)
        if format == "dense":
            return save_output(directory, self._write_dense, self.manifest, overwrite)
        self.adapter.check_save_format(format)
        out = check_target(directory, overwrite, (self.manifest.get("config") or {}).get("model"))
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.dense-", dir=out.parent))
        try:
            with signals_as_exceptions():  # SIGTERM during the export also removes the scratch copy
                save_output(scratch / "dense", self._write_dense, self.manifest)
                self.adapter.export(scratch / "dense", out, format, overwrite=overwrite, progress=progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return out



def _options(kind: str, entries: dict[str, Any], values: dict[str, Any]) -> Any:
    """Build ``kind``'s ``Options``; an unknown key names the scope where that key does exist."""
    from compresskit.engine.gradients import GradientOptions

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
    from compresskit.engine.gradients import GradientOptions

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


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "timm", "pluggy", "safetensors", "datasets"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def _or(value: float | None, default: float) -> float:
    return default if value is None else value
