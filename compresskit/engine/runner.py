"""The single layerwise runner shared by every metric, pattern, solver and adapter.

:func:`prune_model` walks the blocks (:func:`compresskit.engine.walk.walk_blocks`) and, per block:
asks every layer's target (``layer_sparsity`` hook), collects the block-local gradient
statistics (:mod:`compresskit.engine.blockgrad`, once per block, from the unpruned block) and the
statistics the metric, the solver and the error report need while the block runs over its
calibration inputs (per group of layers, all from the unpruned block), decides each layer (score -> mask, or the solver's own
selection; then the solver's update) and writes it; the walk then propagates the block's
outputs. Lifecycle hooks: ``run_started``, ``block_done``, ``run_finished`` (see
docs/explanation/runner.md).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from compresskit.engine import blockgrad, checks, distributed
from compresskit import stats as st
from compresskit.engine.device import synchronize
from compresskit.errors import CompressKitError, IncompatiblePatternError
from compresskit.interfaces import Solver
from compresskit.ops import reconstruction_error, sparsity
from compresskit.run import LayerReport, PruneReport, Run
from compresskit.engine.walk import walk_blocks

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)


def check_layers(run: Run) -> int:
    """Run ``pattern.check`` on every target layer at the uniform target (fail fast, before any
    calibration). Returns the number of prunable layers."""
    n = 0
    for i, block in enumerate(run.adapter.blocks(run.model)):
        for name, layer in run.adapter.prunable(block).items():
            run.pattern.check(f"block {i} {name}", tuple(layer.weight.shape), run.settings.sparsity)
            n += 1
    return n


ERROR_SAMPLES = 4
"""Calibration samples the error report reads when the run collects no full Gram matrix itself.

A full float32 Gram matrix per distinct layer input costs about as much arithmetic as the block
forwards (at LLaMA-7B shape and 128 x 2048 tokens, ~90 TFLOP per block), and only SparseGPT and
the OBS update need it; every other run measures its layer errors on the first few samples."""


def needed_statistics(run: Run) -> list[st.Statistic]:
    """Distinct input and gradient statistics of the metric, the solver and the error report
    (the full ``gram`` where the metric or solver collects it, else :class:`~compresskit.stats.ErrorGram`)."""
    specs = list(run.metric.statistics())
    if run.solver is not None:
        specs += list(run.solver.statistics())
    resolved = st.resolve(specs)
    if run.settings.report_error and not any(s.key() == "gram" for s in resolved):
        resolved.append(st.ErrorGram(max(0, ERROR_SAMPLES - run.sample_offset)))  # this process's share
    return resolved


def prune_model(run: Run) -> PruneReport:
    """Prune ``run.loaded.model`` in place, block by block, and return ``run.report``."""
    if run.hook is None:
        from compresskit.engine.registry import new_plugin_manager

        run.pm = run.pm or new_plugin_manager()
        run.hook = run.pm.hook
    report, t0 = run.report, time.perf_counter()
    needed = needed_statistics(run)
    report.error_samples = ERROR_SAMPLES if any(isinstance(s, st.ErrorGram) for s in needed) else None
    specs = [s for s in needed if s.source == "inputs"]
    block_specs = [s for s in needed if s.source == "block_gradients"]  # see compresskit.engine.blockgrad
    block_solver = run.solver is not None and type(run.solver).solve_block is not Solver.solve_block
    place = run.placement
    run.hook.run_started(run=run)
    bar = _progress(len(run.adapter.blocks(run.model)), run.settings.progress, f"pruning {run.metric.name}",
                    run.start_block)
    clock = [t0]

    def block_finished(step) -> None:  # after the walk computed the next block's inputs
        report.block_seconds.append(time.perf_counter() - clock[0])
        run.inputs = step.inputs
        bar.update(1)
        run.hook.block_done(run=run, block_index=step.index)
        clock[0] = time.perf_counter()

    with run.adapter.run_context(run.model):
        data = run.batches if specs or block_specs or block_solver else None
        walk = walk_blocks(run.adapter, run.model, data, place.compute, place.at_rest, run.settings.propagate,
                           start=run.start_block, inputs=(run.inputs or None) if data is not None else None,
                           on_step=block_finished, residency=run.residency,
                           keep_dense=block_solver or run.settings.propagate == "dense")
        for step in walk:
            if run.block_index is None:
                report.capture_seconds = time.perf_counter() - t0
                clock[0] = time.perf_counter()
            run.block_index, run.inputs = step.index, step.inputs
            for name in step.layers:
                _check_target(run, step.index, name, step.layers[name])
            if block_solver and step.dense_outputs is None:
                step.forward()  # the dense block's outputs: the block solver's targets
            rounds = run.solver.block_rounds() if block_solver else 1
            originals: dict[str, tuple] | None = {} if rounds > 1 else None  # first round's (dense, gram)
            for r in range(rounds):
                first_row = len(report.layers)
                decided = _prune_block(run, step, specs, block_specs, originals, keep=block_solver)
                if block_solver:
                    final = {} if rounds == 1 else {"final": r == rounds - 1}
                    run.solver.solve_block(step.block, step.layers, {n: d[1] for n, d in decided.items()},
                                           step.inputs, step.dense_outputs, **final)
                    if r < rounds - 1:  # an intermediate round: its rows are replaced by the next round's
                        del report.layers[first_row:]
                        continue
                    _refresh_rows(run, step.layers, decided)
    bar.close()
    run.block_index = None
    report.seconds = time.perf_counter() - t0
    run.hook.run_finished(run=run)
    return report


def _prune_block(run: Run, step, specs: list[st.Statistic], block_specs: list[st.Statistic],
                 originals: dict[str, tuple] | None, keep: bool) -> dict[str, tuple]:
    """Collect one block's statistics group by group and prune its layers; with ``keep``, each
    layer's ``(row, mask, dense, gram)`` for the block solver. ``originals`` (several rounds
    only) keeps each layer's weights and error Gram of the first round: the error of the last
    round's weights is measured against those (the runner's usual inputs), as with one round."""
    decided = {}
    block_parts = {}
    if block_specs:  # summed over every rank's samples under torchrun, like the input statistics
        block_parts = distributed.combine(
            blockgrad.collect(step.block, step.layers, step.inputs, block_specs, run.settings.accumulate))
    for group in run.adapter.groups(step.block):
        parts = _collect(step, group, specs, run.settings.accumulate)
        for name in distributed.decided_here(group, step.layers):  # under torchrun: this rank's share
            layer_parts = {**parts.get(name, {}), **block_parts.get(name, {})}
            first = None if originals is None else originals.get(name)
            row, mask, dense, gram = _prune_layer(run, step.index, name, step.layers[name], layer_parts,
                                                  specs + block_specs, None if first is None else first[0])
            if originals is not None:
                dense, gram = originals.setdefault(name, (dense, gram))
            if keep:
                decided[name] = (row, mask, dense, gram)
        distributed.share_decisions(run, group, step.layers)
    return decided


def _check_target(run: Run, block_index: int, name: str, layer: nn.Linear) -> None:
    target = run.target(block_index, name)
    if target != run.settings.sparsity:  # the uniform target was checked before calibration
        try:
            run.pattern.check(f"block {block_index} {name}", tuple(layer.weight.shape), target)
        except IncompatiblePatternError as exc:
            raise IncompatiblePatternError(f"{exc} (per-layer target {target:g} from the sparsity map, "
                                           "--allocation or a layer_sparsity plugin)") from exc


def _collect(step, group: list[str], specs: list[st.Statistic], accumulate: str = "float32"
             ) -> dict[str, dict[str, st.Parts]]:
    """Run the block over its inputs once and return every layer's statistic parts, summed over
    every rank's samples under ``torchrun`` (:func:`compresskit.engine.distributed.combine`).

    Statistics are folded once per distinct input: layers tapped one after the other with the
    same input tensor (q/k/v, gate/up) share one set of parts (the same dict object). A statistic
    with a ``sample_limit`` folds only that many samples, and when every statistic has one the
    forward stops there (nothing reads the outputs of this pass).
    """
    if not specs:
        return {}
    counts = st.Counts()
    shared: dict[str, dict] = {}  # "q|k|v" -> parts of the layers fed one input tensor
    seen: dict[str, int] = {}  # samples folded into shared[key]
    pending: list = []  # [input, samples, names]: the input being tapped, not folded yet

    def zero(name: str) -> dict:
        layer = step.layers[name]
        return distributed.accumulators({s.key(): s.init(layer) for s in specs}, accumulate) | \
            {"counts": counts.init(layer)}

    def flush() -> None:
        if not pending:
            return
        x, samples, names = pending
        key = "|".join(names)
        if key not in shared:
            shared[key], seen[key] = zero(names[0]), 0
        parts = shared[key]
        for s in specs:
            if s.sample_limit is None or seen[key] < s.sample_limit:
                s.update(parts[s.key()], x)
        counts.count(parts["counts"], x.shape[0], samples)
        seen[key] += samples
        pending.clear()

    def tap(name: str):
        def fold(x: torch.Tensor, samples: int) -> None:
            if pending and pending[0] is x:
                pending[2].append(name)
            else:
                flush()
                pending[:] = [x, samples, [name]]

        return fold

    limits = [s.sample_limit for s in specs]  # one sample at least: it shows which layers share an input
    step.forward({n: tap(n) for n in group}, limit=None if None in limits else max(1, *limits))
    flush()
    for name in group:  # a layer the forward never reached keeps zero statistics
        if not any(name in key.split("|") for key in shared):
            shared[name] = zero(name)
    distributed.combine(shared)
    out: dict[str, dict[str, st.Parts]] = {}
    for key, parts in shared.items():
        for name in key.split("|"):
            out[name] = st.merge(out[name], parts) if name in out else parts
    return out


def layer_stats(run: Run, block_index: int, name: str, parts: dict[str, st.Parts], specs: list[st.Statistic]) -> st.LayerStats:
    """Finish a layer's collected parts and add its gradient statistics (which rest on the CPU or
    on disk: moved to the compute device here, the one crossing a metric's statistics make)."""
    values = {s.name: s.finish(parts[s.key()]) for s in specs if s.key() in parts}
    values.update(run.placement.to_compute(dict(run.gradients.get(run.adapter.gradient_key(block_index, name), {}))))
    counts = st.Counts().finish(parts["counts"]) if "counts" in parts else {"tokens": 0, "samples": 0}
    return st.LayerStats(values, block_index, name, counts["tokens"], counts["samples"])


def decide(run: Run, weight: torch.Tensor, stats: st.LayerStats, target: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, new weight)`` of one layer: the metric's scores through the pattern (or the
    solver's own selection for a ``mask_solver`` metric), then the solver's update."""
    metric, solver = run.metric, run.solver
    if metric.mask_solver is not None:
        mask, new = solver.select_and_solve(weight.clone(), stats, metric, run.pattern, target)
        checks.check_new_weights(new, stats, solver.name)
        return mask, new
    scores = metric.score(weight.clone(), stats)
    checks.check_scores(scores, stats, metric.name)
    mask = run.pattern.mask(scores, target)
    if solver is None:
        return mask, weight.masked_fill(mask, 0.0)
    mask, new = solver.refine_and_solve(weight, mask, stats, run.pattern, target)
    checks.check_new_weights(new, stats, solver.name)
    return mask, new


def _prune_layer(run: Run, i: int, name: str, layer: nn.Linear, parts: dict, specs: list[st.Statistic],
                 dense: torch.Tensor | None = None):
    """Decide and write one layer; returns ``(report row, mask, dense weight, gram or None)``.
    ``dense``: the weights its error is measured against (default: the layer's current ones)."""
    t = time.perf_counter()
    w = layer.weight.data
    current = w.float().clone()
    dense = current if dense is None else dense
    stats = layer_stats(run, i, name, parts, specs)
    checks.check_layer_stats(stats, [s.name for s in specs])
    target = run.target(i, name)
    try:
        mask, new = decide(run, current, stats, target)
    except CompressKitError as exc:
        raise type(exc)(f"block {i} {name}: {exc}") from exc
    w.copy_(new.to(w.dtype))
    gram = stats.get("gram", stats.get("error_gram")) if run.settings.report_error else None
    err = reconstruction_error(dense, w.float(), gram) if gram is not None else None
    synchronize(w.device)
    row = LayerReport(i, name, tuple(w.shape), target, sparsity(w), time.perf_counter() - t, err)
    run.report.layers.append(row)
    return row, mask, dense, gram


def _refresh_rows(run: Run, layers: dict[str, nn.Linear], decided: dict[str, tuple]) -> None:
    """After a block solver changed the weights: check the masks held, redo sparsity and error."""
    for name, (row, mask, dense, gram) in decided.items():
        w = layers[name].weight.data
        checks.check_tensor(w, f"block {row.block} {name}: the weights from block solver {run.solver.name!r}",
                            "the block solver diverged; fix it or run without it")
        if w[mask].any():
            raise CompressKitError(f"solver {run.solver.name!r} changed pruned weights of block {row.block} {name}; "
                                   "a block solver must keep masked weights at zero")
        row.sparsity = sparsity(w)
        if gram is not None:
            row.error = reconstruction_error(dense, w.float(), gram)


class _NoBar:
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool, desc: str, initial: int = 0):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="block", leave=False)
