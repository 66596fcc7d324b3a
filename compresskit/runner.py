"""The single layerwise runner shared by every metric, pattern and adapter.

Lifecycle (see docs/explanation/runner.md): check every target layer against the pattern;
capture the inputs of block 0 with *all* positional and keyword arguments; then per block:
feed calibration inputs through the block with hooks on its linear layers (metric statistics,
and the Gram matrix when needed), prune each layer (score -> mask -> optional OBS update ->
apply), and recompute the block's outputs as the next block's inputs (from the pruned block by
default, as in the reference LLM procedure). Only the current block lives on the compute device.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Literal, Mapping

import torch
from torch import nn

from compresskit.device import move_outside, synchronize, to_device
from compresskit.interfaces import LayerContext, Loaded, MaskPattern, ModelAdapter, ScoreMetric
from compresskit.ops import flatten_inputs, gram_update, reconstruction_error, sparsity

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunnerSettings:
    """Knobs of the layerwise procedure.

    Attributes:
        sparsity: target fraction of zeros (N:M patterns imply their own).
        device: compute device; blocks visit it one at a time.
        offload: where the model rests between blocks (CPU).
        propagate: ``pruned`` (reference LLM procedure: the next block sees the pruned block's
            outputs) or ``dense`` (Wanda's vision script: statistics from the dense network).
        update: ``none`` or ``obs`` (SparseGPT's weight reconstruction with the chosen mask).
        report_error: record ``||WX - W'X||^2/||WX||^2`` per layer (needs the Gram matrix).
        progress: show a progress bar over blocks.
    """

    sparsity: float = 0.5
    device: torch.device = torch.device("cpu")
    offload: torch.device = torch.device("cpu")
    propagate: Literal["pruned", "dense"] = "pruned"
    update: Literal["none", "obs"] = "none"
    report_error: bool = True
    progress: bool = True


@dataclasses.dataclass
class LayerReport:
    block: int
    name: str
    shape: tuple[int, int]
    sparsity: float
    seconds: float
    error: float | None = None


@dataclasses.dataclass
class PruneReport:
    """What the run did: per-layer sparsity, error and time, per-block time, totals."""

    layers: list[LayerReport] = dataclasses.field(default_factory=list)
    block_seconds: list[float] = dataclasses.field(default_factory=list)
    capture_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def overall_sparsity(self) -> float:
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers) / max(total, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall_sparsity": self.overall_sparsity,
            "seconds": self.seconds,
            "capture_seconds": self.capture_seconds,
            "block_seconds": self.block_seconds,
            "layers": [dataclasses.asdict(r) for r in self.layers],
        }


class _Captured(Exception):
    """Private sentinel that stops the forward pass once block 0's inputs are recorded."""


def check_layers(adapter: ModelAdapter, model: nn.Module, pattern: MaskPattern, target: float) -> None:
    """Run ``pattern.check`` on every target layer (fail fast, before any calibration)."""
    for i, block in enumerate(adapter.blocks(model)):
        for name, layer in adapter.prunable(block).items():
            pattern.check(f"block {i} {name}", tuple(layer.weight.shape), target)


def capture_block_inputs(
    adapter: ModelAdapter, model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device
) -> list[tuple[tuple, dict]]:
    """Run the model on each batch until block 0 and record its (args, kwargs) on ``device``."""
    blocks = list(adapter.blocks(model))
    move_outside(model, blocks, device)
    first = blocks[0]
    first.to(device)
    records: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        records.append((to_device(args, device), to_device(kwargs, device)))
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    adapter.forward(model, to_device(batch, device))
                except _Captured:
                    continue
                raise RuntimeError(f"adapter {adapter.name!r}: the forward pass never reached block 0")
    finally:
        handle.remove()
    return records


def block_output(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """Call a block and normalise its output: first element of a tuple, or the tensor."""
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def prune_model(
    loaded: Loaded,
    adapter: ModelAdapter,
    metric: ScoreMetric,
    pattern: MaskPattern,
    batches: list[dict[str, torch.Tensor]],
    settings: RunnerSettings,
    grads: Mapping[str, torch.Tensor] | None = None,
    on_block: Callable[[int, int], None] | None = None,
) -> PruneReport:
    """Prune ``loaded.model`` in place, block by block, and return the report.

    Args:
        loaded: the model and its processor, from ``adapter.load``.
        batches: calibration batches (ignored when no forward pass is needed).
        grads: gradient statistics keyed by ``adapter.gradient_key`` (gradient metrics only).
        on_block: optional callback ``(block_index, n_blocks)`` after each block.
    """
    model, report = loaded.model, PruneReport()
    target = pattern.implied_sparsity if pattern.implied_sparsity is not None else settings.sparsity
    check_layers(adapter, model, pattern, target)
    if metric.needs_gradients and grads is None:
        raise ValueError(f"metric {metric.name!r} needs gradient statistics; use compresskit.prune() to collect them")
    need_hessian = metric.needs_hessian or settings.update == "obs" or settings.report_error
    need_forward = metric.needs_calibration or need_hessian
    dev = settings.device
    t0 = time.perf_counter()
    blocks = list(adapter.blocks(model))
    with adapter.run_context(model):
        inputs: list[tuple[tuple, dict]] = []
        if need_forward:
            inputs = capture_block_inputs(adapter, model, batches, dev)
        report.capture_seconds = time.perf_counter() - t0
        bar = _progress(len(blocks), settings.progress, f"pruning {metric.name}")
        for i, block in enumerate(blocks):
            tb = time.perf_counter()
            block.to(dev)
            dense_out = _prune_block(i, block, adapter, metric, pattern, inputs, settings, target, grads, report, need_forward, need_hessian)
            if need_forward:
                with torch.no_grad():
                    outs = dense_out if settings.propagate == "dense" else [block_output(block, a, k) for a, k in inputs]
                inputs = [((o, *a[1:]), k) for o, (a, k) in zip(outs, inputs)]
            block.to(settings.offload)
            synchronize(dev)
            report.block_seconds.append(time.perf_counter() - tb)
            bar.update(1)
            if on_block:
                on_block(i, len(blocks))
        bar.close()
    move_outside(model, blocks, settings.offload)
    report.seconds = time.perf_counter() - t0
    return report


def _prune_block(i, block, adapter, metric, pattern, inputs, settings, target, grads, report, need_forward, need_hessian):
    layers = adapter.prunable(block)
    dense_out = None
    for group in adapter.groups(block):
        states = {n: metric.init_state(layers[n]) if metric.needs_calibration else None for n in group}
        grams = {n: torch.zeros(layers[n].in_features, layers[n].in_features, device=settings.device) for n in group} if need_hessian else {}
        tokens = dict.fromkeys(group, 0)
        if need_forward:
            handles = [layers[n].register_forward_pre_hook(_feeder(n, metric, states, grams, tokens)) for n in group]
            try:
                with torch.no_grad():
                    outs = [block_output(block, a, k) for a, k in inputs]
            finally:
                for h in handles:
                    h.remove()
            if dense_out is None:
                dense_out = outs
        for name in group:
            _prune_layer(i, name, layers[name], metric, pattern, states[name], grams.get(name), tokens[name], settings, target, grads, adapter, report)
    return dense_out


def _feeder(name, metric, states, grams, tokens):
    def hook(module, args):
        x = flatten_inputs(args[0])
        if metric.needs_calibration:
            metric.update(states[name], x)
        if name in grams:
            gram_update(grams[name], x)
        tokens[name] += x.shape[0]

    return hook


def _prune_layer(i, name, layer, metric, pattern, state, gram, tokens, settings, target, grads, adapter, report):
    t = time.perf_counter()
    w = layer.weight.data
    dense = w.float().clone()
    grad = None
    if metric.needs_gradients:
        key = adapter.gradient_key(i, name)
        if key not in grads:
            raise KeyError(f"no gradient statistic for {key!r}; the gradient cache does not match this model")
        grad = grads[key].to(w.device, torch.float32)
    ctx = LayerContext(name=name, block_index=i, grad=grad, hessian=gram, tokens=tokens)
    decision = metric.prune(dense.clone(), state, ctx, pattern, target)
    new = decision.weight if decision.weight is not None else dense.masked_fill(decision.mask, 0.0)
    if settings.update == "obs" and decision.weight is None:
        from compresskit.obs import obs_update

        new = obs_update(dense, decision.mask, gram)
    w.copy_(new.to(w.dtype))
    err = reconstruction_error(dense, w.float(), gram) if settings.report_error and gram is not None else None
    synchronize(settings.device)
    report.layers.append(LayerReport(i, name, tuple(w.shape), sparsity(w), time.perf_counter() - t, err))


class _NoBar:
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="block", leave=False)
