"""The gradient engine: per-sample gradients of the dense model, folded into additive statistics.

For every calibration batch (one sample each) this runs a forward and backward of
``adapter.loss(model, batch)`` on the *dense* model, before layerwise pruning, and folds the
gradient ``g`` of every prunable linear weight into each requested
:class:`~compresskit.stats.GradNorm` statistic (``grad_l1``: ``sum_n |s g_n|``; ``grad_l2``:
``sum_n (s g_n)^2``, finished as its square root; ``s`` the statistic's scale, 100 to
reproduce the GBLM reference files). The sums are the statistic's additive parts: two runs
over disjoint samples merge by addition. Each weight's gradient is folded and freed by a
post-accumulate-grad hook the moment autograd produces it, so at most one layer's gradient
exists at a time, and only the prunable weights require grad, so autograd never materialises
gradients of embeddings, norms or the head.

Memory: the pass holds the model, the accumulators and one sample's backward activations on the
compute device. ``gradient.groups`` runs it once per contiguous group of layers with only that
group's accumulators there (each group's sums summed across ranks under ``torchrun`` and put at
rest before the next group starts; the results are those of one pass, bit for bit), and
:mod:`compresskit.engine.gradplan` chooses checkpointing and groups to fit ``gradient.max_memory``
or a CUDA device's free memory.

Results are cached as safetensors under ``<cache_dir>/gradients/`` keyed by an exact
fingerprint (see :mod:`compresskit.engine.gradcache`); a reference-repo ``.pth`` file can be imported
instead of computing. :func:`obtain` is the entry point used by :func:`compresskit.prune`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Mapping
from typing import Any, Collection, Iterable, Iterator, Literal, Sequence

import torch
from torch import nn

from compresskit.engine import distributed, gradcache, gradplan
from compresskit.engine.blockgrad import requires_grad_only
from compresskit.engine.checks import check_tensor
from compresskit.engine.device import as_device, model_on, to_device, to_rest
from compresskit.errors import GradientError, OptionError
from compresskit.interfaces import Loaded, ModelAdapter
from compresskit.options import build, option
from compresskit.stats import REFERENCE_SCALE, GradNorm

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
    checkpointing: bool | Literal["auto"] = option(
        "auto",
        "activation checkpointing of each block during the backward pass: less memory, ~1 extra forward; "
        "auto: off unless the memory plan needs it (it never does on a CPU without gradient.max_memory)",
    )
    precision: Literal["float32", "reference", "float64"] = option(
        "float32",
        "accumulators: float32, or the reference's (l1 running sum rounded to float16 after every sample; "
        "l2 summed in float32, its square root rounded to float16), or float64 (--accumulate float64); "
        "results are returned as float32",
    )
    groups: int | Literal["auto"] = option(
        "auto",
        "split the prunable layers into this many contiguous groups and run the pass once per group, with "
        "only that group's accumulators on the device (same results, N times the passes); auto: 1 unless "
        "the memory plan needs more (it never does on a CPU without gradient.max_memory)",
    )
    max_memory: str | int | None = option(
        None,
        "memory budget of the gradient pass on the compute device (bytes, or a size such as 26GiB or 30GB); "
        "default: the free memory of a CUDA device, none on a CPU; the plan picks checkpointing and groups to fit",
    )

    def __post_init__(self) -> None:
        if self.groups != "auto" and (isinstance(self.groups, bool) or self.groups < 1):
            raise OptionError(f"gradient.groups must be an integer >= 1 or auto, got {self.groups!r}")
        if self.max_memory is not None:
            from compresskit.engine.stream.memory import parse_size

            try:
                parse_size(self.max_memory)
            except OptionError:
                raise OptionError(f"gradient.max_memory={self.max_memory!r} is not a size; write e.g. 26GiB, "
                                  "30GB or 28000000000 (bytes)") from None


def obtain(
    adapter: ModelAdapter,
    loaded: Loaded,
    batches: Sequence[dict[str, torch.Tensor]],
    stats: Sequence[GradNorm],
    device: torch.device,
    options: dict[str, Any] | None = None,
    progress: bool = True,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Finished gradient statistics: imported, reused from the cache, or computed.

    Args:
        adapter: the model family (blocks, prunable layers, loss, gradient keys).
        loaded: the dense model, before any pruning.
        batches: calibration batches of one sample each (the same ones the runner uses).
        stats: the :class:`~compresskit.stats.GradNorm` statistics to produce.
        device: compute device of the forward/backward passes.
        options: a dict validated against :class:`GradientOptions`.
        progress: show a progress bar over samples.

    Returns:
        ``(grads, info)``: ``grads[gradient_key][stat.name]`` is a float32 ``[out, in]`` tensor at
        rest on the CPU (:func:`compresskit.engine.device.to_rest`; the runner moves each layer's to
        the compute device). ``grads`` is a mapping that finishes a layer's statistics when it is
        read; in a single process their sums are read from the cache file then (``rest`` is
        ``"disk"`` in ``info``), otherwise held in memory. ``info`` holds facts for the manifest
        (norms, scale, samples, cache, rest, seconds, and the memory ``plan`` with its
        ``checkpointing``, ``groups`` and estimate).

    Raises:
        GradientError: an invalid import file, a layer that received no gradient, more groups than
            layers, or a memory budget no plan fits (the message names the least that does).
        OptionError: an unknown or badly typed option.
    """
    opts = build(GradientOptions, dict(options or {}), "gradient.")
    stats = [dataclasses.replace(s, precision=opts.precision) for s in stats]
    for s in stats:
        if s.norm not in NORMS:
            raise GradientError(f"gradient statistic norm {s.norm!r} is not one of {', '.join(NORMS)}")
    t0 = time.perf_counter()
    model = loaded.model
    expected = {k: tuple(p.shape) for k, p in targets(adapter, model).items()}
    info: dict[str, Any] = {"nsamples": len(batches), "precision": opts.precision,
                            "checkpointing": opts.checkpointing is True, "groups": 1, "plan": None,
                            "statistics": {s.name: {"norm": s.norm, "scale": s.scale} for s in stats}}
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in expected}
    if opts.import_path:
        if len(stats) != 1:
            raise GradientError("--gradients imports one reference file, but the metric needs "
                                f"{len(stats)} gradient statistics; compute them instead (drop --gradients)")
        stat = stats[0]
        grads = gradcache.import_reference(opts.import_path, expected, stat.norm)
        factor = stat.scale / REFERENCE_SCALE
        if factor != 1.0:
            log.info("rescaling imported gradients by %g (file carries scale %g, metric wants %g)",
                     factor, REFERENCE_SCALE, stat.scale)
            grads = {k: v * factor for k, v in grads.items()}
        for k, v in grads.items():
            out[k][stat.name] = to_rest(v)
        info["nsamples"] = None
        info["statistics"][stat.name].update(cache="imported", path=str(opts.import_path), fingerprint=None,
                                             file_scale=REFERENCE_SCALE, rescaled_by=factor)
        info["seconds"] = time.perf_counter() - t0
        return out, info
    ctx = distributed.current()
    on_disk = not ctx.enabled  # one process: the sums rest in the cache file (several ranks: in memory)
    sums: dict[str, Mapping[str, torch.Tensor]] = {}
    todo = []
    for s in stats:
        fp = gradcache.fingerprint(adapter, loaded, batches, s, device)
        path = gradcache.cache_path(opts.cache_dir, fp, s.norm)
        cached = None
        if not opts.recompute:
            cached = gradcache.open_sums(path, expected, fp) if on_disk else \
                ctx.from_writer(lambda: gradcache.load(path, expected, fp))
        if cached is not None:
            log.info("reusing cached gradients from %s", path)
            sums[s.key()] = cached
        else:
            todo.append((s, fp, path))
        state = "hit" if cached is not None else "recomputed" if opts.recompute else "computed"
        info["statistics"][s.name].update(cache=state, fingerprint=fp, path=str(path))
    if todo:
        sums.update(_computed(todo, opts, adapter, loaded, batches, device, progress, info, on_disk))
    for s in stats:
        info["statistics"][s.name]["rest"] = "disk" if isinstance(sums[s.key()], gradcache.SumFile) else "memory"
    info["seconds"] = time.perf_counter() - t0
    return Finished(stats, sums, list(expected)), info


def _computed(todo: list, opts: GradientOptions, adapter: ModelAdapter, loaded: Loaded, batches: Sequence[dict],
              device: torch.device, progress: bool, info: dict[str, Any], on_disk: bool
              ) -> dict[str, Mapping[str, torch.Tensor]]:
    """Run the pass (planned, in groups) for the statistics of ``todo`` and cache them; their sums,
    read from the cache file (``on_disk``, the file written) or in memory."""
    model, stats = loaded.model, [s for s, _, _ in todo]
    layers = target_layers(adapter, model)
    sizes = gradplan.accumulator_sizes(layers, stats)
    keys, fresh = list(layers), {s.key(): {} for s in stats}
    writer, root = distributed.current().is_writer, todo[0][2].parent
    if writer:
        gradcache.sweep(root)
    room = not writer or gradcache.has_room(root, sum(sizes))  # else neither cache file nor groups on disk
    on_disk = on_disk and room
    spill = None
    try:
        if on_disk:
            try:  # finished groups go to disk, not to host memory
                spill = gradcache.Spill(root)
            except OSError as exc:
                log.warning("could not write finished gradient groups to disk (%s); they rest in memory", exc)
        plan = gradplan.plan_pass(adapter, model, layers, sizes, batches, device,
                                  None if opts.checkpointing == "auto" else opts.checkpointing,
                                  None if opts.groups == "auto" else opts.groups, opts.max_memory,
                                  groups_on_disk=spill is not None)
        info.update(checkpointing=plan.checkpointing, groups=plan.groups, plan=plan.as_info())
        ranges = gradplan.split(sizes, plan.groups)
        if spill is not None and len(ranges) == 1:  # one group: the cache file is written from it directly
            spill.close()
            spill = None
        with model_on(model, device):  # the model stays on the device for every group
            for g, (start, stop) in enumerate(ranges):
                group, desc = keys[start:stop], f"gradients {g + 1}/{len(ranges)}" if len(ranges) > 1 else "gradients"
                part = distributed.sum_over_samples(  # under torchrun: each rank its shard, summed across ranks
                    lambda shard: compute(adapter, model, shard, stats, device, plan.checkpointing, progress,
                                          keys=group, desc=desc),
                    batches)
                for s in stats:  # never cache (or prune with) an overflowed sum
                    for k, p in part[s.key()].items():
                        check_tensor(p["sum"], f"gradient statistic {s.name!r} computed for layer {k!r}",
                                     "the per-sample gradients overflowed: load the model in float32 (-o adapter."
                                     "dtype=float32) and keep -o gradient.precision=float32")
                spill = _rest(part, fresh, spill, single=len(ranges) == 1 and on_disk)
        out: dict[str, Mapping[str, torch.Tensor]] = {}
        for s, fp, path in todo:
            source = spill.reader(s.key()) if spill is not None else fresh[s.key()]
            meta = {"statistic": s.key(), "nsamples": str(len(batches)), "source": loaded.source}
            saved = writer and room and gradcache.save(path, source, fp, meta)
            if writer and not saved:
                info["statistics"][s.name]["path"] = None
            out[s.key()] = gradcache.SumFile.at(path) if saved and on_disk else to_rest(dict(source))
        return out
    finally:
        if spill is not None:
            spill.close()


def _rest(part: dict, fresh: dict, spill: gradcache.Spill | None, single: bool) -> gradcache.Spill | None:
    """Put one finished group's sums where they rest until cached: in ``spill`` (read back into
    ``fresh`` if writing fails) or in ``fresh``; a single group on disk stays where it was computed
    (the cache file is written from it directly, a tensor at a time). Returns the spill still in use."""
    for key, per_layer in part.items():
        sums = {k: p["sum"] for k, p in per_layer.items()}
        if spill is not None:
            try:
                spill.add(key, sums)
                continue
            except OSError as exc:
                log.warning("could not write a finished gradient group to disk (%s); the groups rest in memory", exc)
                for k2 in list(spill.files):
                    fresh[k2].update(to_rest(dict(spill.reader(k2))))
                spill.close()
                spill = None
        fresh[key].update(sums if single else to_rest(sums))
    return spill


class Finished(Mapping):
    """``grads[gradient_key][stat.name]``: each layer's finished statistics, computed from its sums
    when the runner asks for that layer (the sums read from the cache file or held in memory)."""

    def __init__(self, stats: Sequence[GradNorm], sums: dict[str, Mapping[str, torch.Tensor]], keys: list[str]):
        self.stats, self.sums, self.keys = list(stats), sums, keys

    def __getitem__(self, key: str) -> dict[str, torch.Tensor]:
        if key not in self.sums[self.stats[0].key()]:
            raise KeyError(key)
        return {s.name: to_rest(s.finish({"sum": self.sums[s.key()][key]})) for s in self.stats}

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def target_layers(adapter: ModelAdapter, model: nn.Module) -> dict[str, nn.Linear]:
    """Every prunable linear layer, keyed by ``adapter.gradient_key(block, name)``."""
    return {adapter.gradient_key(i, name): layer for i, block in enumerate(adapter.blocks(model))
            for name, layer in adapter.prunable(block).items()}


def targets(adapter: ModelAdapter, model: nn.Module) -> dict[str, nn.Parameter]:
    """Weight of every prunable linear layer, keyed by ``adapter.gradient_key(block, name)``."""
    return {k: layer.weight for k, layer in target_layers(adapter, model).items()}


def compute(
    adapter: ModelAdapter,
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    stats: Sequence[GradNorm],
    device: torch.device,
    checkpointing: bool = False,
    progress: bool = True,
    keys: Collection[str] | None = None,
    desc: str = "gradients",
) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Additive parts of every statistic for every prunable weight (see the module docstring).

    ``keys`` (gradient keys; default: every prunable layer) limits the pass to those layers: only
    their weights require grad and only they get accumulators, so a pass per group of layers
    (``gradient.groups``) holds one group's accumulators at a time, with the same results.

    The model runs in eval mode with ``adapter.run_context`` (KV cache off) on ``device`` and
    is moved back afterwards; ``requires_grad`` flags, the mode and the device are restored even
    on error.

    Returns:
        ``parts[stat.key()][gradient_key]`` = the statistic's parts (on ``device``; under
        ``torchrun`` they are summed across ranks there, on the GPU with NCCL).
    """
    layers = target_layers(adapter, model)
    if keys is not None:
        unknown = [k for k in keys if k not in layers]
        if unknown:
            raise GradientError(f"{unknown[0]!r} is not a prunable layer's gradient key; use keys of targets()")
        layers = {k: layers[k] for k in keys}
    params = {k: layer.weight for k, layer in layers.items()}
    batches = list(batches)
    with contextlib.ExitStack() as stack:
        stack.enter_context(model_on(model, device))
        stack.enter_context(_eval_mode(model))
        stack.enter_context(requires_grad_only(model, params.values()))
        stack.enter_context(adapter.run_context(model))
        if checkpointing:
            stack.enter_context(checkpointed(adapter.blocks(model)))
        stack.enter_context(torch.enable_grad())
        acc = {s.key(): {k: s.init(layer) for k, layer in layers.items()} for s in stats}
        folded: set[str] = set()
        for key, p in params.items():  # fold each gradient as soon as autograd produces it
            hook = folding_hook(key, [(s, acc[s.key()][key]) for s in stats], folded)
            stack.callback(p.register_post_accumulate_grad_hook(hook).remove)
        for batch in _progress(batches, progress, desc):
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
    return acc


def folding_hook(key: str, targets: list[tuple[GradNorm, dict[str, torch.Tensor]]], folded: set[str]):
    """Post-accumulate-grad hook: fold ``p.grad`` into every statistic and free it at once, so
    only one layer's gradient exists at a time (instead of all of them until the backward ends)."""

    def hook(p: torch.Tensor) -> None:
        for stat, parts in targets:
            stat.fold(parts, p.grad)
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

    from compresskit.engine.walk import patched_forwards

    with patched_forwards(blocks, lambda i, block: functools.partial(checkpoint, block.forward, use_reentrant=False)):
        yield


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _progress(batches: list, enabled: bool, desc: str = "gradients"):
    if not enabled:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc=desc, unit="sample", leave=False)
