"""Conformance checks for the plugins that shape a whole run: adapters, allocations, lifecycle hooks."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from compresskit.errors import OptionError
from compresskit.interfaces import Allocation, Loaded, ModelAdapter
from compresskit.engine.registry import Registry
from compresskit.testing._base import _check_class, _end_to_end, _fail, _instance, _registry_with
from compresskit.testing.factories import fresh_registry

__all__ = ["check_adapter", "check_allocation", "check_hooks"]


# --------------------------------------------------------------------------- allocations and hooks


def _check_targets(cls: type, result, sparsity: float) -> None:
    for row in result.report.layers:
        if not 0.0 <= row.target < 1.0:
            _fail(cls, f"target {row.target} of layer {row.block}.{row.name} is outside [0, 1)", "return fractions")


def check_allocation(cls: type, registry: Registry | None = None, options: dict[str, Any] | None = None,
                     sparsity: float = 0.5) -> list[str]:
    """Check a :class:`~compresskit.interfaces.Allocation` subclass: class rules, then an end-to-end
    prune of ``random:tiny`` where every layer's target is a fraction in ``[0, 1)`` and is achieved
    within the rounding of the pattern's comparison groups (less than one weight per row).

    Raises:
        PluginConformanceError: on the first broken rule.
    """
    passed = _check_class(cls, Allocation, options)
    reg = _registry_with("allocation", cls, registry)
    try:
        result = _end_to_end(cls, reg, metric="wanda", allocation=cls.name, sparsity=sparsity,
                             allocation_options=dict(options or {}))
    except OptionError as exc:  # the runner refuses a target outside [0, 1) before pruning the layer
        if "must be in [0, 1)" not in str(exc):
            raise
        _fail(cls, f"a target is outside [0, 1) ({exc})", "return fractions in [0, 1) from sparsity(), or None")
    _check_targets(cls, result, sparsity)
    return passed + ["targets", "end-to-end prune"]


def check_hooks(module: Any, registry: Registry | None = None, sparsity: float = 0.5) -> list[str]:
    """Check a plugin module's lifecycle hooks: it registers without failures (known hook names),
    and a prune of ``random:tiny`` with it installed runs every hook and achieves the targets
    its ``layer_sparsity`` returns.

    Raises:
        PluginConformanceError: on the first broken rule.
    """
    reg = registry or fresh_registry(module)
    name = getattr(module, "__name__", repr(module))
    if not any(p is module for _, p in reg.pm.list_name_plugin()):
        _fail(type(module), f"plugin {name} did not register ({'; '.join(f.message() for f in reg.failures)})",
              "spell every hook as in compresskit.hookspecs and mark it with compresskit.hookimpl")
    from compresskit.api import prune

    result = prune(registry=reg, model="random:tiny", metric="wanda", sparsity=sparsity, nsamples=4, seqlen=16,
                   device="cpu", progress=False)
    _check_targets(type(module), result, sparsity)
    for row in result.report.layers:
        if abs(row.sparsity - row.target) > 1.0 / row.shape[1]:
            _fail(type(module), f"layer {row.block}.{row.name} reached {row.sparsity:.4f}, not its target "
                  f"{row.target:.4f}", "return a fraction in [0, 1) from layer_sparsity")
    return ["registers", "targets achieved"]


# --------------------------------------------------------------------------- adapters


def check_adapter(cls: type, source: str = "random:tiny", registry: Registry | None = None, end_to_end: bool = True,
                  metric: str = "wanda", options: dict[str, Any] | None = None) -> list[str]:
    """Check a :class:`~compresskit.interfaces.ModelAdapter` subclass against its contract.

    Checks: class attributes and typed ``Options``; ``load(source)`` gives an eval-mode model;
    ``blocks`` is non-empty and every block has prunable ``nn.Linear`` layers that ``groups``
    covers exactly once; ``calibration_batches`` is deterministic in the seed; capturing block
    0's inputs and replaying them through every block reproduces the plain forward's last block
    output; ``loss`` (when defined) is a finite scalar with gradients; ``save`` writes files; and
    an end-to-end prune.

    Raises:
        PluginConformanceError: on the first broken rule.
    """
    import torch
    from torch import nn

    from compresskit.engine.device import as_device
    from compresskit.engine.walk import block_output, capture_block_inputs

    passed = _check_class(cls, ModelAdapter, options)
    if not isinstance(cls.aliases, dict) or not isinstance(cls.default_model, str):
        _fail(cls, "aliases must be a dict and default_model a str", "fix the class attributes")
    adapter = _instance(cls, options)
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
        if sorted(n for grp in adapter.groups(block) for n in grp) != sorted(layers):
            _fail(cls, f"groups(block {i}) does not cover each prunable layer exactly once", "list every name once")
    passed.append("blocks/prunable/groups")
    batches = adapter.calibration_batches(loaded, 2, 16, 0, None)
    again = adapter.calibration_batches(loaded, 2, 16, 0, None)
    if len(batches) != 2 or any(not torch.equal(a[k], b[k]) for a, b in zip(batches, again) for k in a):
        _fail(cls, "calibration_batches() must return nsamples batches, identical for the same seed",
              "draw samples from a torch.Generator seeded with `seed`")
    passed.append("calibration determinism")
    with adapter.run_context(model):
        last: list = []
        handle = blocks[-1].register_forward_hook(lambda m, a, out: last.append(out[0] if isinstance(out, tuple) else out))
        try:
            with torch.no_grad():
                adapter.forward(model, batches[0])
        finally:
            handle.remove()
        if len(last) != 1:
            _fail(cls, "forward() did not run the last block exactly once", "run the full model in forward()")
        args, kwargs = capture_block_inputs(adapter, model, batches[:1], as_device("cpu"))[0]
        with torch.no_grad():
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
        _end_to_end(cls, reg, adapter=cls.name, model=source, metric=metric, pattern="unstructured", sparsity=0.5,
                    adapter_options=dict(options or {}))
        passed.append(f"end-to-end prune ({metric})")
    return passed
