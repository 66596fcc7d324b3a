"""The gradient engine of GBLM-Pruner: per-sample gradients of the dense model, aggregated.

For every calibration batch (one sample each) this runs a forward and backward of
``adapter.loss(model, batch)`` on the *dense* model, before layerwise pruning, and folds the
gradient ``g`` of every prunable linear weight into a float32 accumulator:

* ``l1``: ``G = sum_n |s * g_n|``
* ``l2``: ``G = sqrt(sum_n (s * g_n)^2)``

where ``s = metric.gradient_scale()`` (1 for GBLM's paper semantics, 100 for the reference
code, whose gradient files bake that factor in; see SPEC 2.2). The accumulators are float32;
``precision="reference"`` reproduces the reference's instead (l1 running sum rounded to
float16 after every sample, l2 square root rounded to float16). Only the accumulator the
requested norm needs is allocated (4 bytes per prunable weight, on the compute device), and
each weight's gradient is folded and freed by a post-accumulate-grad hook the moment autograd
produces it, so at most one layer's gradient exists at a time. Only the prunable weights require grad
during the pass, so autograd never materialises gradients of embeddings, norms or the head.

Results are cached as safetensors under ``<cache_dir>/gradients/`` keyed by an exact
fingerprint (see :mod:`compresskit.gradcache`); a reference-repo ``.pth`` file can be imported
instead of computing. :func:`obtain` is the entry point used by :func:`compresskit.prune`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from typing import Any, Iterable, Iterator, Literal, Sequence

import torch
from torch import nn

from compresskit import gradcache
from compresskit.device import to_device
from compresskit.errors import GradientError
from compresskit.interfaces import Loaded, ModelAdapter, ScoreMetric
from compresskit.options import build, option

log = logging.getLogger(__name__)

NORMS = ("l1", "l2")


@dataclasses.dataclass(frozen=True)
class GradientOptions:
    """How gradient statistics are obtained (``RunConfig.gradient_options``).

    The CLI sets ``import_path`` with ``--gradients FILE`` and ``recompute`` with ``--recompute-gradients``.
    """

    recompute: bool = option(False, "ignore any cached gradients and compute them again (the cache is refreshed)")
    import_path: str | None = option(
        None,
        "import a GBLM reference-repo gradient file (gradients_aggregrate_norm_l1|l2_model_<name>.pth; "
        "scale 100 included) instead of computing",
    )
    cache_dir: str | None = option(None, "cache root (default: $COMPRESSKIT_CACHE or ~/.cache/compresskit)")
    checkpointing: bool = option(
        False, "activation checkpointing of each block during the backward pass: less memory, ~1 extra forward"
    )
    precision: Literal["float32", "reference"] = option(
        "float32",
        "accumulators: float32, or the reference's (l1 running sum rounded to float16 after every sample; "
        "l2 summed in float32, its square root rounded to float16); results are returned as float32",
    )


def obtain(
    adapter: ModelAdapter,
    loaded: Loaded,
    batches: Sequence[dict[str, torch.Tensor]],
    metric: ScoreMetric,
    device: torch.device,
    options: dict[str, Any] | None = None,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Gradient statistics for ``metric``: imported, reused from the cache, or computed.

    Args:
        adapter: the model family (blocks, prunable layers, loss, gradient keys).
        loaded: the dense model, before any pruning.
        batches: calibration batches of one sample each (the same ones the runner uses).
        metric: names the norm (``gradient_norm()``) and the per-sample scale.
        device: compute device of the forward/backward passes.
        options: a dict validated against :class:`GradientOptions`.
        progress: show a progress bar over samples.

    Returns:
        ``(grads, info)``: float32 ``[out, in]`` CPU tensors keyed by ``adapter.gradient_key``,
        and facts for the manifest (norm, scale, nsamples, fingerprint, cache, path, seconds).

    Raises:
        GradientError: unknown norm, an invalid import file, or a layer that received no gradient.
        OptionError: an unknown or badly typed option.
    """
    opts = build(GradientOptions, dict(options or {}), "gradient.")
    norm, scale = metric.gradient_norm(), float(metric.gradient_scale())
    if norm not in NORMS:
        raise GradientError(f"metric {metric.name!r} asks for gradient norm {norm!r}; "
                            "its gradient_norm() must return 'l1' or 'l2'")
    t0 = time.perf_counter()
    model = loaded.model
    expected = {k: tuple(p.shape) for k, p in targets(adapter, model).items()}
    info: dict[str, Any] = {"norm": norm, "scale": scale, "nsamples": len(batches), "precision": opts.precision,
                            "checkpointing": opts.checkpointing}
    if opts.import_path:
        grads = gradcache.import_reference(opts.import_path, expected, norm)
        factor = scale / gradcache.REFERENCE_SCALE
        if factor != 1.0:
            log.info("rescaling imported gradients by %g (file carries scale %g, metric wants %g)",
                     factor, gradcache.REFERENCE_SCALE, scale)
            grads = {k: v * factor for k, v in grads.items()}
        info.update(cache="imported", path=str(opts.import_path), file_scale=gradcache.REFERENCE_SCALE,
                    rescaled_by=factor, nsamples=None, fingerprint=None)
    else:
        fp = gradcache.fingerprint(adapter, loaded, batches, norm, scale, device, opts.precision)
        path = gradcache.cache_path(opts.cache_dir, fp, norm)
        grads = None if opts.recompute else gradcache.load(path, expected, fp)
        if grads is not None:
            log.info("reusing cached gradients from %s", path)
            info["cache"] = "hit"
        else:
            grads = compute(adapter, model, batches, norm, device, scale, opts.checkpointing, progress, opts.precision)
            meta = {"norm": norm, "scale": repr(scale), "nsamples": str(len(batches)), "source": loaded.source}
            info["cache"] = "recomputed" if opts.recompute else "computed"
            if not gradcache.save(path, grads, fp, meta):
                path = None
        info.update(fingerprint=fp, path=str(path) if path else None)
    info["seconds"] = time.perf_counter() - t0
    return grads, info


def targets(adapter: ModelAdapter, model: nn.Module) -> dict[str, nn.Parameter]:
    """Weight of every prunable linear layer, keyed by ``adapter.gradient_key(block, name)``."""
    out: dict[str, nn.Parameter] = {}
    for i, block in enumerate(adapter.blocks(model)):
        for name, layer in adapter.prunable(block).items():
            out[adapter.gradient_key(i, name)] = layer.weight
    return out


def fold(acc: torch.Tensor, grad: torch.Tensor, norm: str, scale: float = 1.0) -> None:
    """Add one per-sample gradient to a float32 accumulator: ``|s g|`` (l1) or ``(s g)^2`` (l2)."""
    g = grad.float()
    if scale != 1.0:
        g = g * scale
    if norm == "l1":
        acc.add_(g.abs())
    else:
        acc.addcmul_(g, g)


def finish(acc: torch.Tensor, norm: str, precision: str = "float32") -> torch.Tensor:
    """Final float32 statistic from an accumulator: the l1 sum itself, or sqrt of the l2 sum.

    With ``precision="reference"`` the l2 result is rounded to float16 as the reference stores it
    (the l1 accumulator is already float16, see :func:`accumulator`).
    """
    out = acc.sqrt_() if norm == "l2" else acc
    if precision == "reference":
        out = out.half()
    return out.float()


def accumulator(shape: torch.Size, norm: str, device: torch.device, precision: str = "float32") -> torch.Tensor:
    """Zeroed accumulator: float32, except the reference's float16 running l1 sum (``fold`` adds
    in float32 and rounds the sum back to float16 after every sample, as the reference does)."""
    dtype = torch.float16 if precision == "reference" and norm == "l1" else torch.float32
    return torch.zeros(shape, dtype=dtype, device=device)


def compute(
    adapter: ModelAdapter,
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    norm: str,
    device: torch.device,
    scale: float = 1.0,
    checkpointing: bool = False,
    progress: bool = True,
    precision: str = "float32",
) -> dict[str, torch.Tensor]:
    """Aggregate per-sample gradients of the prunable weights (see the module docstring).

    The model runs in eval mode with ``adapter.run_context`` (KV cache off) on ``device`` and
    is moved back afterwards; ``requires_grad`` flags, the mode and the device are restored even
    on error. Returns float32 CPU tensors.
    """
    params = targets(adapter, model)
    batches = list(batches)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_on_device(model, device))
        stack.enter_context(_eval_mode(model))
        stack.enter_context(_grad_only(model, params.values()))
        stack.enter_context(adapter.run_context(model))
        if checkpointing:
            stack.enter_context(checkpointed(adapter.blocks(model)))
        stack.enter_context(torch.enable_grad())
        acc = {k: accumulator(p.shape, norm, device, precision) for k, p in params.items()}
        folded: set[str] = set()
        for key, p in params.items():  # fold each gradient as soon as autograd produces it
            stack.callback(p.register_post_accumulate_grad_hook(_folder(key, acc[key], norm, scale, folded)).remove)
        for batch in _progress(batches, progress):
            loss = adapter.loss(model, to_device(batch, device))
            if not torch.isfinite(loss):
                raise GradientError(f"the calibration loss is {loss.item()}; check the model weights and dtype "
                                    "(float16 models can overflow: load with -o adapter.dtype=float32)")
            folded.clear()
            loss.backward()
            del loss
            missing = [k for k in params if k not in folded]
            if missing:
                raise GradientError(f"no gradient reached {missing[0]!r}: the layer is not on the loss path; "
                                    "exclude it from adapter.prunable() or fix adapter.loss()")
    return {k: finish(a, norm, precision).cpu() for k, a in acc.items()}


def _folder(key: str, acc: torch.Tensor, norm: str, scale: float, folded: set[str]):
    """Post-accumulate-grad hook: fold ``p.grad`` into ``acc`` and free it at once, so only one
    layer's gradient exists at a time (instead of all of them until the backward ends)."""

    def hook(p: torch.Tensor) -> None:
        fold(acc, p.grad, norm, scale)
        p.grad = None
        folded.add(key)

    return hook


@contextlib.contextmanager
def checkpointed(blocks: Sequence[nn.Module]) -> Iterator[None]:
    """Activation checkpointing of each block (non-reentrant ``torch.utils.checkpoint``).

    Model-agnostic (HF decoder layers and timm blocks alike) and works in eval mode, unlike
    HF's ``gradient_checkpointing_enable`` which is active only in train mode. Each block keeps
    only its inputs during the forward and is recomputed in the backward: activation memory
    drops from all blocks' intermediates to one block's, for about one extra forward pass.
    The gradients are identical (same kernels, recomputed deterministically).
    """
    from torch.utils.checkpoint import checkpoint

    patched = []
    try:
        for block in blocks:
            own = block.__dict__.get("forward")  # an instance-level forward (e.g. accelerate hooks)
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
            patched.append((block, own))
        yield
    finally:
        for block, own in patched:
            if own is None:
                del block.forward
            else:
                block.forward = own


@contextlib.contextmanager
def _grad_only(model: nn.Module, wanted: Iterable[nn.Parameter]) -> Iterator[None]:
    """Only ``wanted`` parameters require grad inside; every flag (and ``.grad``) restored after."""
    params = list(model.parameters())
    old = [(p, p.requires_grad, p.grad) for p in params]
    keep = {id(p) for p in wanted}
    try:
        for p in params:
            p.requires_grad_(id(p) in keep)
            p.grad = None
        yield
    finally:
        for p, flag, grad in old:
            p.requires_grad_(flag)
            p.grad = grad


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _on_device(model: nn.Module, device: torch.device) -> Iterator[None]:
    home = next(model.parameters()).device
    if home == device:
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to(home)


def _progress(batches: list, enabled: bool):
    if not enabled:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc="gradients", unit="sample", leave=False)
