"""A model without its weights, and the checkpoint they are read from one module at a time.

:class:`Checkpoint` is a safetensors checkpoint directory (``model.safetensors`` or an index
with shards). :class:`ModelTensors` ties a model instantiated on the meta device (every
parameter a shape without storage, see ``accelerate.init_empty_weights``) to that checkpoint:
:meth:`~ModelTensors.load` gives a module real weights read from disk, :meth:`~ModelTensors.release`
puts them back on the meta device. Tied parameters (an LM head sharing the embedding) are read
once and stay tied.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from compresskit.engine.device import to_device
from compresskit.errors import CompressKitError
from compresskit.engine.stream.tensorfile import CHUNK, Counter, TensorFile

if TYPE_CHECKING:
    import torch
    from torch import nn

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Checkpoint:
    """The safetensors weights of a model directory; :attr:`counter` counts the bytes read."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CompressKitError(f"{index} is not a safetensors index ({exc}); re-save the checkpoint") from exc
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE).is_file():
            files = [SINGLE]
            weight_map = None
        else:
            raise CompressKitError(f"{self.directory} holds no safetensors weights ({SINGLE} or {INDEX}); streaming "
                                   "reads safetensors checkpoints: re-save the model with "
                                   "save_pretrained(dir, safe_serialization=True)")
        self.files = {name: TensorFile(self.directory / name) for name in files}
        self.where = {k: name for name, tf in self.files.items() for k in tf.keys()}
        if weight_map is not None:
            missing = [k for k, f in weight_map.items() if self.where.get(k) != f]
            if missing:
                raise CompressKitError(f"{index} names {missing[0]!r} in {weight_map[missing[0]]}, which does not hold "
                                       "it; the checkpoint is incomplete: re-download it")
        self.counter = Counter()

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def entry(self, name: str):
        return self.files[self.where[name]].entries[name]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` as stored (or rows ``[a, b)`` of it)."""
        return self.files[self.where[name]].read(name, self.counter, rows)

    def nbytes(self, names: Iterable[str] | None = None) -> int:
        """Stored bytes of ``names`` (default: every tensor)."""
        return sum(self.entry(k).nbytes for k in (self.where if names is None else names))

    def identity(self) -> dict[str, Any]:
        """What identifies these weights cheaply: per file its size, a sha256 of its header and of
        three 1 MiB windows of its data (start, middle, end). A changed file of the same layout
        is caught unless it differs only outside those windows."""
        out = {}
        for name, tf in self.files.items():
            path = tf.path
            size = path.stat().st_size
            h = hashlib.sha256()
            with open(path, "rb") as f:
                h.update(f.read(tf.header_bytes))
                data = size - tf.header_bytes
                for at in (0, data // 2, max(data - (1 << 20), 0)):
                    f.seek(tf.header_bytes + at)
                    h.update(f.read(1 << 20))
            out[name] = {"size": size, "sha256_sampled": h.hexdigest()}
        return out


class ModelTensors:
    """Where every tensor of a meta-device model lives in the checkpoint, and loading/releasing it.

    Args:
        model: the model, instantiated with ``accelerate.init_empty_weights`` (parameters on meta).
        checkpoint: the weights.
        dtype: floating-point tensors are converted to this dtype when read (as
            ``from_pretrained(dtype=...)`` does).
    """

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, dtype: torch.dtype) -> None:
        self.model, self.checkpoint, self.dtype = model, checkpoint, dtype
        self.slots: dict[str, list[tuple[nn.Module, str, bool]]] = {}  # name -> (module, attr, is_param)
        self._aliases: dict[str, list[str]] = {}
        seen: dict[int, str] = {}
        for mod_name, module in model.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            for attr, p in module._parameters.items():
                if p is None:
                    continue
                name = seen.setdefault(id(p), prefix + attr)
                self.slots.setdefault(name, []).append((module, attr, True))
                self._aliases.setdefault(name, []).append(prefix + attr)
            for attr, b in module._buffers.items():
                if b is None or attr in module._non_persistent_buffers_set:
                    continue
                name = seen.setdefault(id(b), prefix + attr)
                self.slots.setdefault(name, []).append((module, attr, False))
                self._aliases.setdefault(name, []).append(prefix + attr)
        self.stored = {}
        missing = []
        for name, aliases in self._aliases.items():
            found = next((a for a in aliases if a in checkpoint), None)
            is_param = self.slots[name][0][2]
            if found is None and is_param:
                missing.append(name)
            elif found is not None:
                self.stored[name] = found
        if missing:
            raise CompressKitError(f"checkpoint {checkpoint.directory} lacks {len(missing)} tensors the model needs "
                                   f"(first: {sorted(missing)[0]!r}); use an intact, matching checkpoint")

    def names_in(self, module: nn.Module) -> list[str]:
        """Canonical names of the tensors owned by ``module`` or its children (checkpoint tensors only)."""
        inside = {id(m) for m in module.modules()}
        return [n for n, slots in self.slots.items() if n in self.stored and any(id(m) in inside for m, _, _ in slots)]

    def owner_names(self, module: nn.Module) -> list[str]:
        """Canonical names of the tensors ``module`` holds directly (not its children)."""
        return [n for n, slots in self.slots.items() if n in self.stored and any(m is module for m, _, _ in slots)]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` from the checkpoint, floating point converted to :attr:`dtype`."""
        t = self.checkpoint.read(self.stored[name], rows)
        return t.to(self.dtype) if t.is_floating_point() else t

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.checkpoint.entry(self.stored[name]).shape)

    def out_dtype(self, name: str) -> torch.dtype:
        from compresskit.engine.stream.tensorfile import torch_dtype

        stored = torch_dtype(self.checkpoint.entry(self.stored[name]).dtype)
        return self.dtype if stored.is_floating_point else stored

    def load(self, names: Iterable[str], device: Any) -> None:
        """Read ``names`` from the checkpoint onto ``device`` (skipping those already loaded)."""
        for name in names:
            module, attr, _ = self.slots[name][0]
            current = getattr(module, attr)
            if current is not None and not current.is_meta:
                continue
            self._set(name, to_device(self.read(name), device))

    def release(self, names: Iterable[str]) -> None:
        """Put ``names`` back on the meta device (their storage is freed)."""
        import torch

        for name in names:
            module, attr, _ = self.slots[name][0]
            current = getattr(module, attr)
            if current is not None and not current.is_meta:
                self._set(name, torch.empty_like(current, device="meta"))

    def _set(self, name: str, value: torch.Tensor) -> None:
        from torch import nn

        shared = None
        for module, attr, is_param in self.slots[name]:
            if is_param:
                shared = shared if shared is not None else nn.Parameter(value, requires_grad=False)
                module._parameters[attr] = shared
            else:
                module._buffers[attr] = value

    def tensors_of(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The current (loaded) tensors of ``names``, by canonical name."""
        out = {}
        for name in names:
            module, attr, _ = self.slots[name][0]
            out[name] = getattr(module, attr).detach()
        return out

    def chunked(self, name: str):
        """Row chunks of ``name`` converted to :attr:`dtype` (for copying huge tensors piecewise)."""
        shape = self.shape(name)
        if not shape:
            yield self.read(name)
            return
        row = max(self.checkpoint.entry(self.stored[name]).nbytes // max(shape[0], 1), 1)
        step = max(CHUNK // row, 1)
        for a in range(0, shape[0], step):
            yield self.read(name, (a, min(a + step, shape[0])))
