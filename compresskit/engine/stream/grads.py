"""Exact GBLM gradients of the full model's loss with one block resident at a time.

The per-sample loss gradient of a weight in block ``b`` depends on the whole network, but only
through block ``b``'s inputs (forward) and the gradient of the loss with respect to its
outputs (backward). So, per calibration sample ``n``:

1. **forward**, block by block over every sample: ``h[b+1][n] = block_b(h[b][n])``, keeping
   each block's inputs ``h[b]`` (in memory within the budget, on disk beyond it);
2. **head**: the loss from the last hidden state ``h[B][n]`` gives ``g[B][n] = dL/dh[B][n]``
   (only the final norm and head are read; the blocks are bypassed);
3. **backward**, from the last block to the first: recompute ``block_b(h[b][n])`` with autograd,
   backpropagate ``g[b+1][n]``; each prunable weight's gradient is folded into the block's
   :class:`~compresskit.stats.GradNorm` parts the moment autograd produces it, and the input
   gradient ``g[b][n]`` is kept for block ``b-1``.

Each block is read twice, whatever the number of samples, and the gradients are those of the
in-memory engine (:func:`compresskit.engine.gradients.compute`) up to float32 rounding. Every step is
a commit point of the work directory, so a killed run resumes at the block it was in.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from compresskit.engine import gradcache
from compresskit.engine.gradients import folding_hook
from compresskit.engine.device import to_device, to_rest
from compresskit.errors import GradientError
from compresskit.stats import REFERENCE_SCALE, GradNorm
from compresskit.engine.stream import tensorfile
from compresskit.engine.stream.activations import Activations, Inputs
from compresskit.engine.walk import block_output, patched_forwards, walk_blocks

if TYPE_CHECKING:
    from compresskit.engine.stream.session import Session

log = logging.getLogger(__name__)


def obtain(s: Session, batches: Sequence[dict], stats: Sequence[GradNorm], import_path: str | None = None
           ) -> tuple[BlockGradients, dict[str, Any]]:
    """Compute (or resume, or import) the statistics; returns the lazy mapping the runner reads and facts."""
    t0 = time.perf_counter()
    keys = {s.adapter.gradient_key(b, n): b for b, block in enumerate(s.blocks) for n in s.adapter.prunable(block)}
    info: dict[str, Any] = {"nsamples": len(batches), "precision": stats[0].precision, "checkpointing": False,
                            "statistics": {st.name: {"norm": st.norm, "scale": st.scale, "cache": "streamed"}
                                           for st in stats}}
    phase = s.work.progress.get("phase")
    if phase in (None, "forward", "backward"):
        if import_path:
            _import(s, stats, keys, import_path)
            info["nsamples"] = None
            info["statistics"][stats[0].name].update(cache="imported", path=str(import_path))
        else:
            compute(s, batches, stats)
    info["seconds"] = time.perf_counter() - t0
    return BlockGradients(s.work.grads, stats, keys, s.store.counter), info


def compute(s: Session, batches: Sequence[dict], stats: Sequence[GradNorm]) -> None:
    """Steps 1-3 of the module docstring; every block's parts end up in ``grads/block-NNNNN``."""
    model, blocks, work = s.model, s.blocks, s.work
    batches = [to_device(b, s.device) for b in batches]
    with s.adapter.run_context(model), _bar(s, 2 * len(blocks) + 1) as bar:
        hidden, ctx = s.capture(batches)
        st = work.progress
        if st.get("phase") == "forward":
            gin = [s.store.open(n).to(s.device) for n in st["gin"]]
            bar.update(st["next"])
        elif st.get("phase") == "backward":
            gin = [s.store.open(n).to(s.device) for n in st["gin"]]
            bar.update(len(blocks) + 1 + len(blocks) - 1 - st["next"])
        else:
            gin = [hidden]
            hidden.persist()
        del hidden
        fmt = st.get("block_output")
        if st.get("phase") != "backward":
            fmt = _forward(s, gin, ctx, fmt, bar)
            gout = _head(s, gin.pop(), ctx, batches, fmt)
            work.commit(phase="backward", next=len(blocks) - 1, gin=[g.name for g in gin], gout=gout.name,
                        block_output=fmt)
            work.keep_only({g.name for g in gin} | {gout.name})
            bar.update(1)
        else:
            gout = s.store.open(st["gout"]).to(s.device)
        for b in range(work.progress["next"], -1, -1):
            gout = _backward(s, b, Inputs(gin[b], ctx), gout, stats)
            gin.pop().drop()
            names = [g.name for g in gin] + ([gout.name] if gout is not None else [])
            work.commit(phase="backward" if b else "prune", next=b - 1 if b else 0, gin=names[:-1] if b else [],
                        gout=names[-1] if b else None, block_output=fmt)
            work.keep_only(set(names))
            bar.update(1)


def _forward(s: Session, gin: list[Activations], ctx: list, fmt: str | None, bar) -> str:
    """Dense forward from block ``len(gin) - 1``; appends each block's outputs to ``gin`` (persisted)."""
    seen: list[str] = [fmt] if fmt else []

    def record(module, args, out) -> None:
        if not seen:
            seen.append("tuple" if isinstance(out, (tuple, list)) else "tensor")

    handles = [b.register_forward_hook(record) for b in s.blocks]

    def done(step) -> None:
        step.inputs.hidden.persist()
        gin.append(step.inputs.hidden)
        s.work.commit(phase="forward", next=step.index + 1, gin=[g.name for g in gin], block_output=seen[0])
        s.work.keep_only({g.name for g in gin})
        bar.update(1)

    try:
        start = len(gin) - 1
        for _ in walk_blocks(s.adapter, s.model, None, s.device, start=start, inputs=Inputs(gin[-1], ctx),
                             on_step=done, residency=s.residency()):
            pass
    finally:
        for h in handles:
            h.remove()
    return seen[0]


def _head(s: Session, last: Activations, ctx: list, batches: Sequence[dict], fmt: str) -> Activations:
    """``dL/dh`` at the last hidden state of every sample (final norm and head read on demand)."""
    residency = s.residency()
    blocks = s.blocks
    residency.outside_in(s.model, blocks)
    gout = s.store.sequence()
    head_loss = getattr(s.adapter, "head_loss", None)
    try:
        for n, batch in enumerate(batches):
            h = last[n].detach().clone().requires_grad_(True)
            with torch.enable_grad(), bypassed(blocks, h, fmt == "tuple"):
                loss = head_loss(s.model, h, batch) if head_loss is not None else s.adapter.loss(s.model, batch)
                _check_loss(loss)
                (g,) = torch.autograd.grad(loss, [h])
            gout.append(g)
    finally:
        residency.outside_out(s.model, blocks)
    gout.persist()
    last.drop()
    return gout


def _backward(s: Session, b: int, inputs: Inputs, gout: Activations, stats: Sequence[GradNorm]) -> Activations | None:
    """Backward through block ``b``: fold its weight gradients (saved), return the input gradients."""
    block = s.blocks[b]
    residency = s.residency()
    residency.enter(b, block)
    layers = s.adapter.prunable(block)
    keys = {n: s.adapter.gradient_key(b, n) for n in layers}
    acc = {st.key(): {n: st.init(layer) for n, layer in layers.items()} for st in stats}
    folded: set[str] = set()
    new = s.store.sequence() if b > 0 else None
    with contextlib.ExitStack() as stack:
        for name, layer in layers.items():
            layer.weight.requires_grad_(True)
            hook = folding_hook(name, [(st, acc[st.key()][name]) for st in stats], folded)
            stack.callback(layer.weight.register_post_accumulate_grad_hook(hook).remove)
        stack.enter_context(torch.enable_grad())
        for n in range(len(inputs)):
            (x, *rest), kwargs = inputs[n]
            x = x.detach().requires_grad_(b > 0)
            folded.clear()
            out = block_output(block, (x, *rest), kwargs)
            out.backward(gout[n].to(out.dtype))
            missing = [k for k in layers if k not in folded]
            if missing:
                raise GradientError(f"no gradient reached {keys[missing[0]]!r}: the layer is not on the loss path; "
                                    "exclude it from adapter.prunable() or fix adapter.loss()")
            if new is not None:
                new.append(x.grad)
            del out, x
    parts = {f"{sk}::{keys[n]}::{part}": t for sk, per in acc.items() for n, p in per.items() for part, t in p.items()}
    tensorfile.write(s.work.grads / block_file(b), parts, counter=s.store.counter)
    del parts, acc
    residency.leave(b, block)
    if new is not None:
        new.persist()
    return new


def _check_loss(loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise GradientError(f"the calibration loss is {loss.item()}; check the model weights and dtype "
                            "(float16 models can overflow: load with -o adapter.dtype=float32)")


@contextlib.contextmanager
def bypassed(blocks: Sequence[torch.nn.Module], hidden: torch.Tensor, as_tuple: bool) -> Iterator[None]:
    """Every block returns its first argument unchanged, the last one returns ``hidden``: a model
    forward then computes only what comes after the blocks (final norm, head, loss) from ``hidden``."""
    last = len(blocks) - 1

    def make(i: int, block: torch.nn.Module):
        def fwd(*args, **kwargs):
            out = hidden if i == last else args[0]
            return (out,) if as_tuple else out

        return fwd

    with patched_forwards(blocks, make):
        yield


FINISHED = "finished"
"""Part name of an imported (already finished) statistic."""


def block_file(b: int) -> str:
    return f"block-{b:05d}.safetensors"


class BlockGradients(Mapping):
    """``gradients[gradient_key][stat.name]``: finished statistics read from the block files on access
    (at rest on the CPU: the runner moves each layer's to the compute device)."""

    def __init__(self, directory, stats: Sequence[GradNorm], keys: dict[str, int],
                 counter: tensorfile.Counter | None = None) -> None:
        self.directory, self.stats, self.keys, self.counter = directory, list(stats), keys, counter

    def __getitem__(self, key: str) -> dict[str, torch.Tensor]:
        b = self.keys[key]
        f = tensorfile.TensorFile(self.directory / block_file(b))
        out = {}
        for st in self.stats:
            prefix = f"{st.key()}::{key}::"
            parts = {k[len(prefix):]: f.read(k, self.counter) for k in f.keys() if k.startswith(prefix)}
            out[st.name] = to_rest(parts[FINISHED] if FINISHED in parts else st.finish(parts))
        return out

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def _import(s: Session, stats: Sequence[GradNorm], keys: dict[str, int], path: str) -> None:
    """A reference gradient file split into block files (the whole file is read into memory once)."""
    if len(stats) != 1:
        raise GradientError("--gradients imports one reference file, but the metric needs "
                            f"{len(stats)} gradient statistics; compute them instead (drop --gradients)")
    (st,) = stats
    expected = {}
    for b, block in enumerate(s.blocks):
        for n, layer in s.adapter.prunable(block).items():
            expected[s.adapter.gradient_key(b, n)] = tuple(layer.weight.shape)
    grads = gradcache.import_reference(path, expected, st.norm)
    factor = st.scale / REFERENCE_SCALE
    for b in range(len(s.blocks)):
        parts = {f"{st.key()}::{k}::{FINISHED}": (v * factor if factor != 1.0 else v) for k, v in grads.items()
                 if keys[k] == b}  # the file holds finished values (no additive parts to merge)
        tensorfile.write(s.work.grads / block_file(b), parts, counter=s.store.counter)
    s.work.commit(phase="prune", next=0)


@contextlib.contextmanager
def _bar(s: Session, total: int):
    if not s.progress:
        class _No:
            def update(self, n: int) -> None: ...

        yield _No()
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="gradients (streamed)", unit="step", leave=False)
    try:
        yield bar
    finally:
        bar.close()
