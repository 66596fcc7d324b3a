"""Conformance checks for metric, pattern and adapter plugins (public via :mod:`compresskit.testing`).

Each check verifies the rules of one interface (see docs/plugins/testing.md) on small seeded
tensors, then prunes ``random:tiny`` end to end through :func:`compresskit.api.prune`.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresskit.errors import CompressKitError, IncompatiblePatternError
from compresskit.interfaces import LayerContext, Loaded, MaskPattern, ModelAdapter, PruneDecision, ScoreMetric
from compresskit.registry import Origin, Registry

log = logging.getLogger(__name__)


class PluginConformanceError(CompressKitError, AssertionError):
    """A plugin class breaks a rule of its interface (the message says which and the fix)."""


def _fail(cls: type, rule: str, fix: str) -> None:
    raise PluginConformanceError(f"{cls.__module__}.{cls.__qualname__}: {rule}; {fix}")


def _registry_with(kind: str, cls: type, registry: Registry | None) -> Registry:
    """``registry`` (default: built-ins only) with ``cls`` added unless its name is taken by it."""
    from compresskit.testing import fresh_registry

    reg = registry or fresh_registry()
    try:
        if reg.get(kind, cls.name).cls is cls:
            return reg
    except KeyError:
        pass
    reg.add(kind, cls, Origin(f"{cls.__module__} (under test)"))
    return reg


# --------------------------------------------------------------------------- shared rules


def _check_class(cls: type, base: type) -> list[str]:
    if not (isinstance(cls, type) and issubclass(cls, base)):
        _fail(cls, f"does not subclass {base.__name__}", f"derive from compresskit.{base.__name__}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name != name.lower() or " " in name:
        _fail(cls, f"name {name!r} is not a lowercase registry key", "set `name = \"my_thing\"` (snake case)")
    if not isinstance(getattr(cls, "summary", None), str) or not cls.summary.strip():
        _fail(cls, "has no `summary`", "set a one-line `summary` shown by `compresskit list`")
    if not (cls.__doc__ or "").strip():
        _fail(cls, "has no docstring", "document the method (paper link, summary, example CLI line)")
    opts = cls.Options
    if not dataclasses.is_dataclass(opts) or not opts.__dataclass_params__.frozen:
        _fail(cls, "Options is not a frozen dataclass", "use @dataclasses.dataclass(frozen=True) with option() fields")
    for f in dataclasses.fields(opts):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _fail(cls, f"option {f.name!r} has no default", "declare it with compresskit.option(default, help)")
        if not str(f.metadata.get("help", "")).strip():
            _fail(cls, f"option {f.name!r} has no help text", "declare it with compresskit.option(default, help)")
    instance = cls()
    if not isinstance(instance.options, opts):
        _fail(cls, "cls() does not store a default Options instance", "call super().__init__(options)")
    return ["class attributes", "options"]


def _model_output(loaded: Loaded, adapter: ModelAdapter, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = adapter.forward(loaded.model, batch)
    out = getattr(out, "logits", out)
    return out[0] if isinstance(out, (tuple, list)) else out


def _end_to_end(cls: type, registry: Registry, **config: Any) -> dict[str, Any]:
    """Prune through :func:`compresskit.api.prune` and check the result is a sane pruned model."""
    from compresskit.api import prune

    base = dict(model="random:tiny", nsamples=4, seqlen=16, device="cpu", progress=False)
    result = prune(registry=registry, **{**base, **config})
    report = result.report
    if not report.layers:
        _fail(cls, "end-to-end prune reported no pruned layers", "check blocks()/prunable() of the adapter")
    target = result.manifest["resolved"]["sparsity"]
    if abs(report.overall_sparsity - target) > 0.02:
        _fail(cls, f"end-to-end sparsity {report.overall_sparsity:.4f} misses the target {target}",
              "make the mask prune the requested fraction")
    batch = result.adapter.calibration_batches(result.loaded, 1, 16, 123, None)[0]
    if not torch.isfinite(_model_output(result.loaded, result.adapter, batch).float()).all():
        _fail(cls, "the pruned model produces non-finite outputs", "keep scores finite and weights untouched by NaN")
    return {"overall_sparsity": report.overall_sparsity, "layers": len(report.layers)}


# --------------------------------------------------------------------------- metrics


def _metric_state(metric: ScoreMetric, layer: nn.Linear, chunks: list[torch.Tensor], hessian: Any) -> Any:
    """Accumulate ``chunks``; a Hessian metric without an accumulator of its own (SparseGPT) is
    given the layer's ``X^T X`` as its state, which is how it documents ``score``."""
    state = metric.init_state(layer)
    for x in chunks:
        metric.update(state, x.clone())
    return hessian if state is None and hessian is not None else state


def check_metric(cls: type, registry: Registry | None = None, end_to_end: bool = True,
                 adapter: str = "llama", pattern: str = "unstructured") -> list[str]:
    """Check a :class:`~compresskit.interfaces.ScoreMetric` subclass against its contract.

    Checks: class attributes and typed ``Options``; ``score`` returns finite float scores of the
    weight's shape without modifying the weight; ``update`` is batch-size independent (one batch
    of 8 vs two of 4) and order independent; ``prune`` returns a boolean mask; and, unless
    ``end_to_end`` is False, a real run on ``random:tiny`` through :func:`compresskit.api.prune`.

    Args:
        cls: the metric class.
        registry: registry to run the end-to-end prune with (default: built-ins plus ``cls``).
        end_to_end: run the end-to-end prune.
        adapter: adapter for the end-to-end prune.
        pattern: pattern for the end-to-end prune.

    Returns:
        Names of the checks that passed.

    Raises:
        PluginConformanceError: on the first broken rule.
    """
    from compresskit.testing import random_inputs, random_linear

    passed = _check_class(cls, ScoreMetric)
    for flag in ("needs_calibration", "needs_gradients", "needs_hessian"):
        if not isinstance(getattr(cls, flag), bool):
            _fail(cls, f"`{flag}` is not a bool", f"set `{flag} = True` or False as a class attribute")
    metric = cls()
    if metric.needs_gradients and metric.gradient_norm() not in ("l1", "l2"):
        _fail(cls, "needs_gradients is set but gradient_norm() is not 'l1' or 'l2'", "return the statistic you need")
    layer = random_linear()
    x = random_inputs(tokens=8, in_features=layer.in_features)
    grad = random_linear(seed=7).weight.detach().abs() if metric.needs_gradients else None
    hessian = x.t() @ x if metric.needs_hessian else None
    one, two, rev = (_metric_state(metric, layer, chunks, hessian) for chunks in ([x], [x[:4], x[4:]], [x[4:], x[:4]]))
    weight = layer.weight.detach().clone()
    scores = metric.score(weight, one, grad)
    if not torch.equal(weight, layer.weight.detach()):
        _fail(cls, "score() modified the weight it was given", "work on weight.abs()/clones, never in place")
    if not isinstance(scores, torch.Tensor) or scores.shape != weight.shape or not scores.is_floating_point():
        _fail(cls, f"score() returned {getattr(scores, 'shape', type(scores))}, not a float tensor of shape "
              f"{tuple(weight.shape)}", "return one importance value per weight")
    if not torch.isfinite(scores).all():
        _fail(cls, "score() returned non-finite values", "guard divisions (e.g. add an epsilon)")
    for label, other in (("two batches of 4", two), ("reversed order", rev)):
        if not torch.allclose(scores, metric.score(weight, other, grad), rtol=1e-4, atol=1e-6):
            _fail(cls, f"update() is not batch-size/order independent ({label} give other scores than one batch "
                  "of 8)", "accumulate sums (and counts) rather than per-batch means")
    passed += ["score shape/finite/no mutation", "update batch-size and order independence"]
    ctx = LayerContext(name="probe", block_index=0, grad=grad, hessian=hessian, tokens=x.shape[0])
    decision = metric.prune(weight.clone(), one, ctx, _ProbeRowPattern(), 0.5)
    if not isinstance(decision, PruneDecision) or decision.mask.dtype != torch.bool or decision.mask.shape != weight.shape:
        _fail(cls, "prune() did not return a PruneDecision with a boolean mask of the weight's shape",
              "return PruneDecision(mask=pattern.mask(scores, sparsity))")
    if decision.weight is not None and (decision.weight.shape != weight.shape or decision.weight[decision.mask].any()):
        _fail(cls, "prune() returned replacement weights that are not zero where the mask prunes",
              "zero the pruned entries of the replacement weight")
    passed.append("prune decision")
    if end_to_end:
        reg = _registry_with("metric", cls, registry)
        _end_to_end(cls, reg, adapter=adapter, metric=cls.name, pattern=pattern, sparsity=0.5)
        passed.append(f"end-to-end prune ({adapter}, {pattern})")
    return passed


class _ProbeRowPattern(MaskPattern):
    """Lowest half per row, stable; used to probe a metric's ``prune`` without a registry."""

    name = "probe_rows"
    summary = "test probe"

    def mask(self, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        k = int(scores.shape[-1] * sparsity)
        idx = torch.sort(scores, dim=-1, stable=True)[1][..., :k]
        return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)


# --------------------------------------------------------------------------- patterns


def check_pattern(cls: type, registry: Registry | None = None, end_to_end: bool = True,
                  metric: str = "wanda", adapter: str = "llama") -> list[str]:
    """Check a :class:`~compresskit.interfaces.MaskPattern` subclass against its contract.

    Checks: class attributes and typed ``Options``; ``mask`` returns a boolean tensor of the
    scores' shape without modifying them, prunes the requested count (per row up to rounding,
    exactly ``n`` per aligned group of ``m`` for N:M patterns), and is monotone (raising a kept
    weight's score keeps it, lowering a pruned one's keeps it pruned); ``check`` accepts valid
    layers and rejects a contradicting ``--sparsity`` (and indivisible widths for N:M) with
    :class:`~compresskit.errors.IncompatiblePatternError`; and an end-to-end prune.

    Args:
        cls: the pattern class.
        registry: registry for the end-to-end prune (default: built-ins plus ``cls``).
        end_to_end: run the end-to-end prune on ``random:tiny``.
        metric: metric for the end-to-end prune.
        adapter: adapter for the end-to-end prune.

    Returns:
        Names of the checks that passed.

    Raises:
        PluginConformanceError: on the first broken rule.
    """
    passed = _check_class(cls, MaskPattern)
    pattern = cls()
    implied, nm = pattern.implied_sparsity, pattern.nm
    out_f, in_f = 16, 64
    targets = [implied] if implied is not None else [0.25, 0.5, 0.75]
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(out_f, in_f, generator=g)
    for s in targets:
        pattern.check("probe", (out_f, in_f), s)
        before = scores.clone()
        mask = pattern.mask(scores, s)
        if not torch.equal(before, scores):
            _fail(cls, "mask() modified the scores", "never write into the scores tensor")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != scores.shape:
            _fail(cls, "mask() must return a bool tensor of the scores' shape", "return e.g. scores < threshold")
        if abs(mask.float().mean().item() - s) > 1.0 / in_f + 1e-6:
            _fail(cls, f"mask() pruned {mask.float().mean().item():.4f} of the weights at sparsity {s}",
                  "prune floor(sparsity * group size) weights per comparison group")
        if nm is not None:
            n, m = nm
            if not (mask.reshape(out_f, -1, m).sum(-1) == n).all():
                _fail(cls, f"mask() does not prune exactly {n} in every aligned group of {m}",
                      "take the n lowest scores of each group of m consecutive input columns")
        kept, pruned = (~mask).nonzero()[0].tolist(), mask.nonzero()[0].tolist()
        up = scores.clone()
        up[tuple(kept)] = scores.max() + 1.0
        down = scores.clone()
        down[tuple(pruned)] = scores.min() - 1.0
        if pattern.mask(up, s)[tuple(kept)] or not pattern.mask(down, s)[tuple(pruned)]:
            _fail(cls, "mask() is not monotone in the scores", "prune the lowest scores (higher score = keep)")
    passed.append("mask shape/dtype/count/monotone")
    if implied is not None:
        _expect_incompatible(cls, pattern, "probe", (out_f, in_f), min(implied + 0.1, 0.95), "a contradicting --sparsity")
    if nm is not None:
        _expect_incompatible(cls, pattern, "probe_layer", (out_f, nm[1] * 4 + 1), implied, "an indivisible in_features")
    passed.append("check")
    if end_to_end:
        reg = _registry_with("pattern", cls, registry)
        _end_to_end(cls, reg, adapter=adapter, metric=metric, pattern=cls.name, sparsity=implied)
        passed.append(f"end-to-end prune ({adapter}, {metric})")
    return passed


def _expect_incompatible(cls, pattern, layer, shape, sparsity, what) -> None:
    try:
        pattern.check(layer, shape, sparsity)
    except IncompatiblePatternError as exc:
        if layer != "probe" and layer not in str(exc):
            _fail(cls, f"check() error for {what} does not name the layer", "include layer_name in the message")
        return
    _fail(cls, f"check() accepted {what}", "raise IncompatiblePatternError naming the layer and the fix")


# --------------------------------------------------------------------------- adapters


def check_adapter(cls: type, source: str = "random:tiny", registry: Registry | None = None,
                  end_to_end: bool = True, metric: str = "wanda") -> list[str]:
    """Check a :class:`~compresskit.interfaces.ModelAdapter` subclass against its contract.

    Checks: class attributes and typed ``Options``; ``load(source)`` gives an eval-mode model;
    ``blocks`` is non-empty and every block has prunable ``nn.Linear`` layers that ``groups``
    covers exactly once; ``calibration_batches`` is deterministic in the seed; capturing block 0's
    inputs and replaying them through every block reproduces the plain forward's last block
    output; ``run_context`` restores the model; ``loss`` (when defined) is a finite scalar with
    gradients; ``save`` writes files; and an end-to-end prune.

    Args:
        cls: the adapter class.
        source: a model source every adapter must understand (``random:tiny``).
        registry: registry for the end-to-end prune (default: built-ins plus ``cls``).
        end_to_end: run the end-to-end prune.
        metric: metric for the end-to-end prune.

    Returns:
        Names of the checks that passed.

    Raises:
        PluginConformanceError: on the first broken rule.
    """
    from compresskit.runner import block_output, capture_block_inputs

    passed = _check_class(cls, ModelAdapter)
    if not isinstance(cls.aliases, dict) or not isinstance(cls.default_model, str):
        _fail(cls, "aliases must be a dict and default_model a str", "fix the class attributes")
    adapter = cls()
    loaded = adapter.load(source)
    model = loaded.model
    if not isinstance(loaded, Loaded) or not isinstance(model, nn.Module) or model.training:
        _fail(cls, f"load({source!r}) must return a Loaded with an eval-mode nn.Module", "call model.eval()")
    blocks = list(adapter.blocks(model))
    if not blocks:
        _fail(cls, "blocks() returned no blocks", "return the repeated blocks, e.g. model.blocks")
    for i, block in enumerate(blocks):
        layers = adapter.prunable(block)
        if not layers or not all(isinstance(m, nn.Linear) for m in layers.values()):
            _fail(cls, f"prunable(block {i}) must map names to nn.Linear layers", "use compresskit.ops.find_linears")
        flat = [n for grp in adapter.groups(block) for n in grp]
        if sorted(flat) != sorted(layers):
            _fail(cls, f"groups(block {i}) does not cover each prunable layer exactly once", "list every name once")
    passed.append("blocks/prunable/groups")
    batches = adapter.calibration_batches(loaded, 2, 16, 0, None)
    again = adapter.calibration_batches(loaded, 2, 16, 0, None)
    if len(batches) != 2 or any(not torch.equal(a[k], b[k]) for a, b in zip(batches, again) for k in a):
        _fail(cls, "calibration_batches() must return nsamples batches, identical for the same seed",
              "draw samples from a torch.Generator seeded with `seed`")
    passed.append("calibration determinism")
    with adapter.run_context(model):
        last: list[torch.Tensor] = []
        handle = blocks[-1].register_forward_hook(lambda m, a, out: last.append(out[0] if isinstance(out, tuple) else out))
        try:
            with torch.no_grad():
                adapter.forward(model, batches[0])
        finally:
            handle.remove()
        if len(last) != 1:
            _fail(cls, "forward() did not run the last block exactly once", "run the full model in forward()")
        records = capture_block_inputs(adapter, model, batches[:1], torch.device("cpu"))
        with torch.no_grad():
            args, kwargs = records[0]
            for block in blocks:
                args = (block_output(block, args, kwargs), *args[1:])
        if not torch.allclose(args[0], last[0], rtol=1e-4, atol=1e-5):
            _fail(cls, "replaying captured block-0 inputs through the blocks differs from the plain forward",
                  "make blocks() return the model's blocks in execution order")
    passed += ["forward", "capture and replay"]
    if type(adapter).loss is not ModelAdapter.loss:
        loss = adapter.loss(model, batches[0])
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not torch.isfinite(loss) or not loss.requires_grad:
            _fail(cls, "loss() must return a finite scalar tensor with a graph", "return the model's training loss")
        model.zero_grad(set_to_none=True)
        passed.append("loss")
    with tempfile.TemporaryDirectory() as tmp:
        adapter.save(loaded, Path(tmp))
        if not any(Path(tmp).iterdir()):
            _fail(cls, "save() wrote nothing", "write the model (safetensors) into the directory")
    passed.append("save")
    if end_to_end:
        reg = _registry_with("adapter", cls, registry)
        _end_to_end(cls, reg, adapter=cls.name, model=source, metric=metric, pattern="unstructured", sparsity=0.5)
        passed.append(f"end-to-end prune ({metric})")
    return passed
