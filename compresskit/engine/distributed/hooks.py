"""What a run does with the distributed context: accumulators, sums across ranks, checks, digests.

Small functions called by the runner, the gradient engine and :func:`compresskit.prune`; each is
a no-op (or a plain call) in a single process.
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from compresskit.engine.distributed.context import Context
from compresskit.engine.distributed.lifecycle import current
from compresskit.errors import DistributedError

if TYPE_CHECKING:
    import torch


def accumulators(tree: dict[str, Any], dtype: str = "float32") -> dict[str, Any]:
    """Promote the float32 parts of ``tree`` to float64 accumulators when ``dtype`` is float64 (in place)."""
    if dtype == "float32":
        return tree
    import torch

    for key, value in tree.items():
        if isinstance(value, Mapping):
            accumulators(value, dtype)
        elif value.dtype == torch.float32:
            tree[key] = value.double()
    return tree


def combine(tree: dict[str, Any], what: str = "statistics") -> dict[str, Any]:
    """Sum ``tree``'s parts across ranks (under ``torchrun``), then cast float64 accumulators to
    float32, so statistics finish as in a float32 run (in place; returns ``tree``)."""
    current().all_reduce(tree, what)
    _to_float32(tree)
    return tree


def _to_float32(tree: dict[str, Any]) -> None:
    import torch

    for key, value in tree.items():
        if isinstance(value, Mapping):
            _to_float32(value)
        elif value.dtype == torch.float64:
            tree[key] = value.float()


def sum_over_samples(compute: Callable[[list[Any]], dict[str, Any]], batches: Sequence[Any],
                     what: str = "gradient statistics") -> dict[str, Any]:
    """``compute(batches)`` in a single process; under ``torchrun`` each rank computes the parts of
    its shard and the parts are summed across ranks."""
    ctx = current()
    if not ctx.enabled:
        return compute(list(batches))
    return ctx.all_reduce(compute(ctx.shard(batches)), what)  # type: ignore[return-value]


def owners(group: Sequence[str], layers: Mapping[str, Any], world_size: int) -> dict[str, int]:
    """Which rank decides each layer of ``group``: largest first, each to the least-loaded rank
    (cost ``out * in * in``, the size of the error and OBS products). Same answer on every rank."""
    load, out = [0] * world_size, {}
    cost = {n: layers[n].weight.numel() * layers[n].weight.shape[-1] for n in group}
    for name in sorted(group, key=lambda n: (-cost[n], list(group).index(n))):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        out[name], load[rank] = rank, load[rank] + cost[name]
    return out


def decided_here(group: Sequence[str], layers: Mapping[str, Any]) -> list[str]:
    """The layers of ``group`` this rank decides: all of them in a single process; under ``torchrun``
    the ranks split them (:func:`owners`) and :func:`share_decisions` sends the results around."""
    ctx = current()
    if not ctx.enabled:
        return list(group)
    ctx.decide_started = time.perf_counter()
    own = owners(group, layers, ctx.world_size)
    return [n for n in group if own[n] == ctx.rank]


def share_decisions(run: Any, group: Sequence[str], layers: Mapping[str, Any]) -> None:
    """After every rank decided its layers of ``group``: each pruned weight goes from the rank that
    decided it to all others, and every rank gets every layer's report row, in group order."""
    ctx = current()
    if not ctx.enabled:
        return
    own = owners(group, layers, ctx.world_size)
    rows = run.report.layers
    mine = rows[len(rows) - sum(own[n] == ctx.rank for n in group):]
    del rows[len(rows) - len(mine):]
    by_name = {row.name: row for part in ctx.gather(mine) for row in part}
    for name in group:  # the same order on every rank
        ctx.broadcast(layers[name].weight.data, own[name])
    rows.extend(by_name[n] for n in group)
    ctx.decide_seconds += time.perf_counter() - ctx.decide_started


def digest(tensors: Iterable[tuple[str, torch.Tensor]], *extra: Any) -> str:
    """A cheap exact digest of named tensors: shape, dtype, nonzeros and the wrapped int64 sum of
    their bit patterns (integer sums do not depend on order or hardware), plus ``extra``."""
    import torch

    views = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    h = hashlib.sha256(repr(extra).encode())
    for name, t in tensors:
        d = t.detach().contiguous().reshape(-1)
        if d.is_floating_point():
            d = d.view(views[d.element_size()])
        total = int(d.sum(dtype=torch.int64)) if d.numel() else 0
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{int(t.count_nonzero())}|{total}|".encode())
    return h.hexdigest()


def check_plan(ctx: Context, config: Any, plan: Any) -> None:
    """Refuse what a sharded run cannot do the same as a single process (before any model is loaded)."""
    if not ctx.enabled:
        return
    from compresskit.interfaces import Solver

    ctx.require_samples(config.nsamples)
    grads = config.gradient_options
    if plan.gradient_stats and str(grads.get("precision", "")) == "reference" and not grads.get("import_path"):
        raise DistributedError("gradient.precision=reference reproduces the reference code's sequential float16 "
                               "running sum, which ranks summing their own shards cannot; drop "
                               "-o gradient.precision=reference, or compute the gradients once in a single process")
    if plan.solver is not None and type(plan.solver).solve_block is not Solver.solve_block:
        raise DistributedError(f"solver {plan.solver.name!r} tunes whole blocks on the calibration inputs "
                               "(solve_block), which each rank holds only a shard of; run it in a single process")


def run_started(ctx: Context, run: Any, manifest: dict[str, Any], nsamples: int) -> None:
    """After the calibration data is drawn: check that every rank holds the same model and data,
    and record the world size and per-rank sample counts in the manifest (``distributed``)."""
    if not ctx.enabled:
        return
    ctx.agree({"the model": digest(run.model.state_dict().items()),
               "the calibration data": manifest["calibration"]["fingerprint"]})
    manifest["distributed"] = ctx.describe(nsamples, run.settings.device)


def run_finished(ctx: Context, run: Any, manifest: dict[str, Any]) -> None:
    """After pruning: check that every rank made the same decisions (pruned weights and targets)."""
    if not ctx.enabled:
        return
    adapter = run.adapter
    layers = [(f"{i}.{n}", m.weight) for i, b in enumerate(adapter.blocks(run.model)) for n, m in adapter.prunable(b).items()]
    ctx.agree({"the pruned weights": digest(layers, sorted(run.targets.items()))})
    manifest["distributed"].update(weights_agree=True, decide_seconds=ctx.decide_seconds,
                                   communication={"seconds": ctx.comm_seconds, "bytes": ctx.comm_bytes})
