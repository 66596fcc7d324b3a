"""The walk over blocks: capture block 0's inputs, replay a block over them, propagate outputs.

Every pass that goes block by block uses this one function: the pruning runner, pre-passes
such as an allocation's dense statistics, and any later streamed engine::

    for step in walk_blocks(adapter, model, batches, device):
        outs = step.forward(taps={"mlp.down_proj": lambda x, samples: ...})
        ...                                   # change the block's weights if you like
    # after each step the walk computes the next block's inputs from the (changed) block

Where the blocks and the rest of the model live during a walk is a :class:`Residency`: by default
every block is moved to the compute device for its step and back to the offload device after
it, and the calibration activations are plain lists; the streamed engine
(:mod:`compresskit.engine.stream`) passes one that reads each block from the checkpoint, writes it to
the output and keeps activations within a memory budget.

Block 0's inputs are captured with a forward pre-hook that records the positional *and every
keyword* argument (attention masks, position ids, rotary ``position_embeddings``, cache
positions...) and then stops the forward with a private exception, so nothing is hard-coded per
model family or ``transformers`` version. Only the current block lives on the compute device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from compresskit.engine.device import (as_device, model_device, move_module, move_outside, resting_tensors, return_to,
                                       synchronize, to_device)
from compresskit.engine.prefetch import Prefetcher, wanted

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compresskit.interfaces import ModelAdapter

BlockInput = tuple[tuple, dict]
"""One sample's ``(args, kwargs)`` for a block call."""

Tap = Callable[["torch.Tensor", int], None]
"""Receives a layer's input flattened to float32 ``[tokens, in_features]`` and its sample count."""


class _Captured(Exception):
    """Private sentinel that stops the forward pass once block 0's inputs are recorded."""


class Residency:
    """Where the model lives during a walk, and where the block outputs go (the default: in memory).

    Subclasses change where blocks come from and go to (the streamed engine reads them from the
    checkpoint and writes them to the output) and what holds a pass's outputs (a list, or a
    sequence that spills to disk). Every method is called by :func:`walk_blocks` and
    :func:`capture_block_inputs` only.
    """

    def __init__(self, device: Any, offload: Any = None, prefetch: bool | None = None) -> None:
        self.device = as_device(device)
        self.offload = as_device(offload or "cpu")
        if prefetch is None:
            prefetch = wanted(self.device, self.offload)
        self.prefetcher = Prefetcher(self.device) if prefetch else None

    def outside_in(self, model: nn.Module, blocks: list[nn.Module]) -> None:
        """Before the capture: everything outside the blocks (embeddings, head) onto the compute device."""
        move_outside(model, blocks, self.device)

    def outside_out(self, model: nn.Module, blocks: list[nn.Module]) -> None:
        """After the last block: everything outside the blocks back to the offload device."""
        move_outside(model, blocks, self.offload)

    @contextlib.contextmanager
    def capturing(self, first: nn.Module) -> Iterator[None]:
        """Block 0's placement while its inputs are captured (it is called, but never computes)."""
        home = model_device(first)
        rest = resting_tensors(first) if home != self.device else None
        move_module(first, self.device)
        try:
            yield
        finally:
            return_to(first, rest, home)

    def enter(self, index: int, block: nn.Module) -> None:
        """Make block ``index`` ready on the compute device for its step (its prefetched copies
        when :meth:`ahead` started them)."""
        moves = self.device != self.offload or self.prefetcher is not None
        self._resting = resting_tensors(block) if moves else None
        if self.prefetcher is None or not self.prefetcher.install(index, block):
            move_module(block, self.device)

    def ahead(self, index: int, block: nn.Module) -> None:
        """Block ``index`` comes next: start copying it to the compute device (with prefetching,
        see :mod:`compresskit.engine.prefetch`)."""
        if self.prefetcher is not None:
            self.prefetcher.start(index, block)

    def finish(self) -> None:
        """The walk is over (or abandoned): nothing stays in flight."""
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None

    def leave(self, index: int, block: nn.Module) -> None:
        """The step of block ``index`` is over (its outputs are computed): its tensors go back into
        the ones it rested in (:func:`~compresskit.engine.device.return_to`)."""
        rest, self._resting = getattr(self, "_resting", None), None
        if self.prefetcher is not None and rest is not None and self.prefetcher.write_back(rest):
            return  # written back by the prefetcher's worker while the next block computes
        return_to(block, rest, self.offload)

    def captures(self) -> list:
        """An empty container for the captured block-0 inputs (``append((args, kwargs))``)."""
        return []

    def outputs(self) -> list:
        """An empty container for one pass's block outputs (``append``, ``len``, indexing)."""
        return []

    def advance(self, inputs: Sequence[BlockInput], outputs: Sequence[torch.Tensor]) -> Sequence[BlockInput]:
        """The next block's inputs from this block's inputs and outputs."""
        return advance(inputs, outputs)


def capture_block_inputs(adapter: ModelAdapter, model: nn.Module, batches: Sequence[dict], device: torch.device,
                         residency: Residency | None = None) -> list[BlockInput]:
    """Run the model on each batch until block 0 and record its ``(args, kwargs)`` on ``device``.

    Every module outside the blocks is moved to ``device`` (and stays there); the blocks stay put.
    """
    import torch

    residency = residency or Residency(device)
    blocks = list(adapter.blocks(model))
    residency.outside_in(model, blocks)
    first = blocks[0]
    records = residency.captures()

    def hook(module, args, kwargs):
        records.append((to_device(args, device), to_device(kwargs, device)))
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with residency.capturing(first), torch.no_grad():
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


def flatten_inputs(x: torch.Tensor) -> torch.Tensor:
    """Detach, cast to float32 and flatten a layer input to ``[tokens, in_features]``."""
    return x.detach().reshape(-1, x.shape[-1]).float()


def sample_count(x: torch.Tensor) -> int:
    """Calibration samples in one layer input: its batch dimension (1 for a 2-D input)."""
    return int(x.shape[0]) if x.dim() > 2 else 1


def replay(block: nn.Module, inputs: Iterable[BlockInput], layers: dict[str, nn.Module] | None = None,
           taps: dict[str, Tap] | None = None, sink: Any = None) -> list[torch.Tensor]:
    """Run ``block`` over every input (no gradients); ``taps[name]`` sees ``layers[name]``'s inputs.

    Layers called one after the other on the same input tensor (q/k/v, gate/up) get one
    flattened float32 copy, the same object, so a tap can tell a shared input by identity. The
    outputs are appended to ``sink`` (default: a new list), which is returned.
    """
    import torch

    last: list = [None, -1, None]  # the previous tapped input, its version and its flattened copy

    def flat(x: torch.Tensor) -> torch.Tensor:
        if last[0] is not x or last[1] != x._version:  # _version: changed in place since
            last[:] = [x, x._version, flatten_inputs(x)]
        return last[2]

    handles = []
    for name, tap in (taps or {}).items():
        def hook(module, args, _tap=tap):
            _tap(flat(args[0]), sample_count(args[0]))

        handles.append(layers[name].register_forward_pre_hook(hook))
    try:
        out = [] if sink is None else sink
        with torch.no_grad():
            for a, k in inputs:
                out.append(block_output(block, a, k))
                last[:] = [None, -1, None]
        return out
    finally:
        for h in handles:
            h.remove()


def advance(inputs: Sequence[BlockInput], outputs: Sequence[torch.Tensor]) -> list[BlockInput]:
    """The next block's inputs: each output replaces the first positional argument."""
    return [((o, *a[1:]), k) for o, (a, k) in zip(outputs, inputs)]


@dataclasses.dataclass
class BlockStep:
    """One block of a walk: the block (on the compute device), its index and its inputs.

    ``forward(taps)`` runs the block over its inputs (first call's outputs are remembered as
    ``dense_outputs`` unless ``keep_dense`` is False, then they are dropped); set ``outputs``
    yourself to decide the next block's inputs.
    """

    index: int
    block: nn.Module
    inputs: Sequence[BlockInput]
    layers: dict[str, nn.Module]
    dense_outputs: Sequence[torch.Tensor] | None = None
    outputs: Sequence[torch.Tensor] | None = None
    sink: Callable[[], Any] = list
    keep_dense: bool = True

    def forward(self, taps: dict[str, Tap] | None = None, limit: int | None = None) -> Sequence[torch.Tensor]:
        """Outputs of the block over every input, feeding each tapped layer's inputs to its tap.

        ``limit``: the taps need only the first this many inputs; honoured when nobody keeps the
        outputs of this pass (then it returns nothing useful), ignored otherwise.
        """
        if not self.keep_dense and taps:
            inputs = self.inputs if limit is None else itertools.islice(self.inputs, limit)
            return replay(self.block, inputs, self.layers, taps, sink=_Discard())
        outs = replay(self.block, self.inputs, self.layers, taps, sink=self.sink())
        if self.dense_outputs is None:
            self.dense_outputs = outs
        return outs


def walk_blocks(adapter: ModelAdapter, model: nn.Module, batches: Sequence[dict] | None, device: torch.device,
                offload: torch.device | None = None, propagate: str = "pruned", start: int = 0,
                inputs: Sequence[BlockInput] | None = None, on_step: Callable[[BlockStep], Any] | None = None,
                residency: Residency | None = None, keep_dense: bool = True) -> Iterator[BlockStep]:
    """Visit the blocks in order with their calibration inputs (see the module docstring).

    Args:
        batches: calibration batches; None walks the blocks without inputs (data-free passes).
        device: compute device (one block at a time); ``offload``: where blocks rest (CPU).
        propagate: the next block's inputs come from the block as it is after the step
            (``pruned``, the reference LLM procedure) or from its first forward (``dense``).
        start: resume at this block (with ``inputs``).
        inputs: the inputs of block ``start``; given, the capture is skipped.
        on_step: called after each step's outputs are computed (progress, checkpoints).
        residency: where blocks and activations live (default: :class:`Residency`, in memory).
        keep_dense: keep the first forward's outputs of a step that had taps (``dense_outputs``);
            False drops them (nothing but ``propagate="dense"`` or a block solver reads them).
    """
    residency = residency or Residency(device, offload)
    blocks = list(adapter.blocks(model))
    if inputs is None and batches is not None and start < len(blocks):
        inputs = capture_block_inputs(adapter, model, batches, device, residency)
    try:
        for i in range(start, len(blocks)):
            block = blocks[i]
            residency.enter(i, block)
            if i + 1 < len(blocks):
                residency.ahead(i + 1, blocks[i + 1])
            step = BlockStep(i, block, inputs or [], adapter.prunable(block), sink=residency.outputs,
                             keep_dense=keep_dense or propagate == "dense")
            yield step
            if inputs is not None and step.outputs is None:
                if propagate == "dense":
                    step.outputs = step.dense_outputs if step.dense_outputs is not None else step.forward()
                else:
                    step.outputs = replay(block, inputs, sink=residency.outputs())
            if inputs is not None:
                inputs = residency.advance(inputs, step.outputs)
                step.inputs = inputs
            residency.leave(i, block)
            synchronize(residency.device)
            if on_step is not None:
                on_step(step)
    finally:
        residency.finish()
    residency.outside_out(model, blocks)


class _Discard:
    """A sink that drops what it is given (outputs nobody reads)."""

    def append(self, _item: Any) -> None: ...




@contextlib.contextmanager
def patched_forwards(blocks: Sequence[nn.Module], make: Callable[[int, nn.Module], Callable[..., Any]]) -> Iterator[None]:
    """Inside: block ``i``'s ``forward`` is ``make(i, block)``; after, each block's own forward is back
    (an instance-level forward, e.g. accelerate's hooks, included)."""
    patched = []
    try:
        for i, block in enumerate(blocks):
            own = block.__dict__.get("forward")
            block.forward = make(i, block)
            patched.append((block, own))
        yield
    finally:
        for block, own in patched:
            if own is None:
                del block.forward
            else:
                block.forward = own
