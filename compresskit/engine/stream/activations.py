"""Calibration activations within a memory budget: kept in memory while they fit, on disk otherwise.

An :class:`ActivationStore` hands out :class:`Activations`, list-like sequences of one tensor
per calibration sample (the hidden states entering a block, or gradients of the loss with
respect to them). A tensor appended while the store's in-memory total stays within ``budget``
bytes is kept as it is; later ones are written to a file in the sequence's directory under the
run's work directory and read back on access (bit-exact). :meth:`Activations.persist` writes
the in-memory ones too, so that a finished step can be resumed from disk; a sequence opened
from disk (:meth:`ActivationStore.open`) reads its files. :class:`Inputs` pairs a sequence of
hidden states with each sample's other block arguments (position embeddings, masks), which
are the same for every block.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from compresskit.errors import CompressKitError
from compresskit.engine.stream import tensorfile

if TYPE_CHECKING:
    import torch


class ActivationStore:
    """Budgeted in-memory copies plus files under ``directory`` (see the module docstring).

    Attributes:
        budget: bytes of activations kept in host memory at most (all live sequences together).
        resident: bytes currently kept in host memory; ``peak`` its high-water mark.
        device_budget: bytes kept on the compute device (a GPU) at most; None: half of the
            device's free memory when the first tensor arrives there. Device memory is not host
            memory: the two are counted separately.
        device_resident: bytes currently kept on the compute device; ``device_peak`` its high-water mark.
        spilled: bytes written because they did not fit (``persisted``: written as checkpoints).
    """

    def __init__(self, directory: str | Path, budget: int, counter: tensorfile.Counter | None = None) -> None:
        self.directory = Path(directory)
        self.budget = int(budget)
        self.resident = self.peak = self.spilled = self.persisted = 0
        self.device_budget: int | None = None
        self.device_resident = self.device_peak = 0
        self.counter = counter or tensorfile.Counter()

    def sequence(self, name: str | None = None) -> Activations:
        """A new empty sequence (its directory is created when the first tensor spills)."""
        return Activations(self, self.directory / (name or _fresh(self.directory)))

    def open(self, name: str) -> Activations:
        """The persisted sequence ``name`` (every tensor read from disk on access)."""
        seq = Activations(self, self.directory / name)
        files = sorted(seq.directory.glob("*.safetensors")) if seq.directory.is_dir() else []
        for i, f in enumerate(files):
            if f.name != _file(i):
                raise CompressKitError(f"{seq.directory} misses {_file(i)}; the work directory is damaged: delete it "
                                       "and run again without --resume")
        seq._items = [None] * len(files)
        seq._on_disk = set(range(len(files)))
        seq.persistent = True
        return seq

    def _take(self, nbytes: int, device: Any = None) -> bool:
        """Whether a tensor of ``nbytes`` on ``device`` may stay in memory (counted if so)."""
        if device is not None and device.type != "cpu":  # on the GPU: its own budget, not the host's
            if self.device_budget is None:
                from compresskit.engine.device import free_memory

                self.device_budget = free_memory(device) // 2
            if self.device_resident + nbytes > self.device_budget:
                return False
            self.device_resident += nbytes
            self.device_peak = max(self.device_peak, self.device_resident)
            return True
        if self.resident + nbytes > self.budget:
            return False
        self.resident += nbytes
        self.peak = max(self.peak, self.resident)
        return True

    def _give_back(self, t: torch.Tensor) -> None:
        if t.device.type != "cpu":
            self.device_resident -= _size(t)
        else:
            self.resident -= _size(t)


class Activations(Sequence):
    """One tensor per sample, in memory or in ``directory`` (see :class:`ActivationStore`)."""

    def __init__(self, store: ActivationStore, directory: Path) -> None:
        self.store, self.directory = store, directory
        self._items: list[torch.Tensor | None] = []
        self._on_disk: set[int] = set()
        self._device: Any = None
        self.persistent = False  # kept on disk after this object is gone

    @property
    def name(self) -> str:
        return self.directory.name

    def append(self, t: torch.Tensor) -> None:
        t = t.detach()
        self._device = t.device
        i = len(self._items)
        if self.store._take(_size(t), t.device):
            self._items.append(t)
        else:
            self._write(i, t)
            self.store.spilled += _size(t)
            self._items.append(None)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        t = self._items[i]
        if t is not None:
            return t
        f = tensorfile.TensorFile(self.directory / _file(i))
        out = f.read("t", self.store.counter)
        from compresskit.engine.device import to_device, to_rest

        return to_rest(out) if self._device is None else to_device(out, self._device)  # from disk: at rest

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def to(self, device: Any) -> Activations:
        """Read later tensors onto ``device`` (a sequence opened from disk reads to the CPU by default)."""
        self._device = device
        return self

    def persist(self) -> None:
        """Write every in-memory tensor to its file too (a checkpoint); keeps the memory copies."""
        for i, t in enumerate(self._items):
            if t is not None and i not in self._on_disk:
                self._write(i, t)
                self.store.persisted += _size(t)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.persistent = True

    def drop(self) -> None:
        """Forget the tensors and delete the files."""
        self._release()
        self._items, self._on_disk = [], set()
        shutil.rmtree(self.directory, ignore_errors=True)
        self.persistent = False

    def _write(self, i: int, t: torch.Tensor) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tensorfile.write(self.directory / _file(i), {"t": t}, counter=self.store.counter)
        self._on_disk.add(i)

    def _release(self) -> None:
        for t in self._items:
            if t is not None:
                self.store._give_back(t)
        self._items = [None] * len(self._items)

    def __del__(self) -> None:
        try:
            self._release()
            if not self.persistent and self._on_disk:
                shutil.rmtree(self.directory, ignore_errors=True)
        except Exception:  # interpreter shutdown
            pass


class Inputs(Sequence):
    """Block inputs ``((hidden, *rest), kwargs)`` built from hidden states and per-sample contexts."""

    def __init__(self, hidden: Sequence[torch.Tensor], contexts: Sequence[tuple[tuple, dict]]) -> None:
        if len(hidden) != len(contexts):
            raise CompressKitError(f"{len(hidden)} hidden states for {len(contexts)} calibration samples; the work "
                                   "directory does not match this run: delete it and run again without --resume")
        self.hidden, self.contexts = hidden, contexts

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, i: int):  # type: ignore[override]
        rest, kwargs = self.contexts[i]
        return (self.hidden[i], *rest), kwargs


def contexts(records: Sequence[tuple[tuple, dict]], seen: dict | None = None) -> list[tuple[tuple, dict]]:
    """Each captured input without its hidden state; equal contexts share one object."""
    from compresskit.cache import tensor_fingerprint

    seen = {} if seen is None else seen
    out = []
    for args, kwargs in records:
        ctx = (tuple(args[1:]), kwargs)
        key = tensor_fingerprint(ctx)
        out.append(seen.setdefault(key, ctx))
    return out


def _size(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _file(i: int) -> str:
    return f"{i:06d}.safetensors"


def _fresh(directory: Path) -> str:
    import uuid

    return f"tmp-{uuid.uuid4().hex[:12]}"
