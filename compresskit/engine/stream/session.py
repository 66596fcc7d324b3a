"""What a streamed run shares between its passes, and the residency that streams blocks.

:class:`Streamed` is the :class:`compresskit.engine.walk.Residency` of streamed passes: a block's
weights are read from the checkpoint when the walk enters it and put back on the meta device
when it leaves (after ``write`` saved the pruned block, for the pruning pass); everything
outside the blocks (embeddings, final norm, head) is read only when a forward calls it and
released at the next block; block outputs go to the :class:`~compresskit.engine.stream.activations.ActivationStore`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from compresskit.engine.device import to_device
from compresskit.engine.stream.activations import ActivationStore, Activations, Inputs, contexts
from compresskit.engine.stream.memory import trim
from compresskit.engine.walk import Residency, capture_block_inputs

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compresskit.interfaces import Loaded, ModelAdapter
    from compresskit.engine.stream.checkpoint import ModelTensors
    from compresskit.engine.stream.workdir import WorkDir


@dataclasses.dataclass
class Session:
    """One streamed run's shared state: the weight-less model, its checkpoint, device, store, work dir."""

    adapter: ModelAdapter
    loaded: Loaded
    tensors: ModelTensors
    device: torch.device
    store: ActivationStore
    work: WorkDir
    progress: bool = True

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.adapter.blocks(self.model))

    def residency(self, write: Callable[[int, dict[str, torch.Tensor]], None] | None = None) -> Streamed:
        return Streamed(self, write)

    def capture(self, batches: Sequence[dict]) -> tuple[Activations, list[tuple[tuple, dict]]]:
        """Block 0's inputs: the hidden states (in the store) and each sample's other arguments."""
        residency = self.residency()
        records = capture_block_inputs(self.adapter, self.model, batches, self.device, residency)
        residency.outside_out(self.model, self.blocks)
        return records.hidden, records.contexts


class Streamed(Residency):
    """Blocks read from the checkpoint on entry and released on exit (see the module docstring)."""

    def __init__(self, session: Session, write: Callable[[int, dict[str, torch.Tensor]], None] | None = None) -> None:
        super().__init__(session.device, prefetch=False)  # blocks come from the checkpoint, not from memory
        self.s, self.write = session, write
        self._hooks: list[Any] = []
        self._outside: list[str] = []

    def outside_in(self, model: nn.Module, blocks: list[nn.Module]) -> None:
        inside = {id(m) for b in blocks for m in b.modules()}
        tensors = self.s.tensors
        for module in model.modules():
            if id(module) in inside:
                continue
            for key, b in module._buffers.items():
                if b is not None and not b.is_meta and b.device != self.device:
                    module._buffers[key] = to_device(b, self.device)
            names = tensors.owner_names(module)
            if names:
                self._hooks.append(module.register_forward_pre_hook(self._loader(names)))

    def _loader(self, names: list[str]):
        def hook(module, args) -> None:
            self.s.tensors.load(names, self.device)
            self._outside.extend(n for n in names if n not in self._outside)

        return hook

    def outside_out(self, model: nn.Module, blocks: list[nn.Module]) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._release_outside()

    def _release_outside(self) -> None:
        if self._outside:
            self.s.tensors.release(self._outside)
            self._outside = []
            trim()

    @contextlib.contextmanager
    def capturing(self, first: nn.Module) -> Iterator[None]:
        yield  # block 0 is called but stops at its pre-hook: it stays on the meta device

    def enter(self, index: int, block: nn.Module) -> None:
        self._release_outside()  # the embeddings were needed for the capture only
        self.s.tensors.load(self.s.tensors.names_in(block), self.device)

    def leave(self, index: int, block: nn.Module) -> None:
        names = self.s.tensors.names_in(block)
        if self.write is not None:
            self.write(index, self.s.tensors.tensors_of(names))
        self.s.tensors.release(names)
        trim()

    def captures(self) -> _Captures:
        return _Captures(self.s.store.sequence())

    def outputs(self) -> Activations:
        return self.s.store.sequence()

    def advance(self, inputs: Sequence, outputs: Sequence) -> Inputs:
        ctx = inputs.contexts if isinstance(inputs, Inputs) else contexts(inputs)
        return Inputs(outputs, ctx)


class _Captures:
    """Captured block-0 inputs split as they arrive: hidden states into the store, the rest kept
    (equal contexts shared)."""

    def __init__(self, hidden: Activations) -> None:
        self.hidden, self.contexts = hidden, []
        self._seen: dict[str, tuple[tuple, dict]] = {}

    def append(self, record: tuple[tuple, dict]) -> None:
        args, kwargs = record
        self.hidden.append(args[0])
        self.contexts.extend(contexts([record], self._seen))
