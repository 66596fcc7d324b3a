"""Safetensors files read and written with plain file I/O: no memory map, every byte counted.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
``data_offsets``; ``__metadata__``) and the tensors' bytes back to back. Reading a tensor is
one ``seek`` + ``readinto`` straight into a new tensor, so the process holds exactly the
tensors it asked for (a memory-mapped file would add its touched pages to the resident set) and
:attr:`Counter.bytes` is the exact number of bytes read. Files are written in name order,
through a temporary sibling renamed into place (:func:`compresskit.cache.atomic_write`), and
are byte-for-byte reproducible; ``safetensors`` and ``transformers`` read them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from compresskit.cache import atomic_write
from compresskit.errors import CompressKitError

if TYPE_CHECKING:
    import torch

DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
          "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
"""safetensors dtype code -> torch dtype name."""

CHUNK = 64 << 20
"""Bytes per read/write call (large tensors are copied in pieces of this size)."""


@dataclasses.dataclass
class Counter:
    """Bytes read and written through this module (one per checkpoint or run)."""

    bytes: int = 0
    written: int = 0


def torch_dtype(code: str) -> torch.dtype:
    import torch

    try:
        return getattr(torch, DTYPES[code])
    except KeyError:
        raise CompressKitError(f"safetensors dtype {code!r} is not supported; convert the checkpoint to "
                               "float32/float16/bfloat16") from None


def dtype_code(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    for code, n in DTYPES.items():
        if n == name:
            return code
    raise CompressKitError(f"cannot store dtype {dtype} in safetensors")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor of a file: dtype, shape and absolute byte range."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class TensorFile:
    """The header of one safetensors file, and reads of its tensors."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 100 << 20:
                    raise ValueError(f"header of {n} bytes")
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as exc:
            raise CompressKitError(f"{self.path} is not a readable safetensors file ({exc}); re-download or "
                                   "re-save the checkpoint") from exc
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        base = 8 + n
        self.entries = {k: Entry(v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0],
                                 base + v["data_offsets"][1]) for k, v in header.items()}
        self.header_bytes = base

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str, counter: Counter | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` (or its rows ``[a, b)`` along the first dimension), read from disk."""
        import torch

        e = self.entries[name]
        shape, start, nbytes = e.shape, e.start, e.nbytes
        if rows is not None:
            per_row = nbytes // max(shape[0], 1)
            shape = (rows[1] - rows[0], *shape[1:])
            start, nbytes = e.start + rows[0] * per_row, (rows[1] - rows[0]) * per_row
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            view = memoryview(buf.numpy())
            with open(self.path, "rb", buffering=0) as f:
                f.seek(start)
                got = 0
                while got < nbytes:
                    n = f.readinto(view[got:got + CHUNK])
                    if not n:
                        raise CompressKitError(f"{self.path} is truncated (tensor {name!r}); re-download the checkpoint")
                    got += n
        if counter is not None:
            counter.bytes += nbytes
        return buf.view(torch_dtype(e.dtype)).reshape(shape)


@dataclasses.dataclass(frozen=True)
class Lazy:
    """A tensor to write that is produced in row chunks (``chunks()`` yields consecutive row blocks)."""

    dtype: Any
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[torch.Tensor]]


def _nbytes(dtype: Any, shape: tuple[int, ...]) -> int:
    import torch

    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def write(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor | Lazy], metadata: dict[str, str] | None = None,
          counter: Counter | None = None) -> Path:
    """Write ``tensors`` (sorted by name) as one safetensors file, atomically."""
    names = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name in names:
        t = tensors[name]
        shape = tuple(t.shape)
        size = _nbytes(t.dtype, shape)
        header[name] = {"dtype": dtype_code(t.dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def emit(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name in names:
                t = tensors[name]
                for piece in (t.chunks() if isinstance(t, Lazy) else (t,)):
                    _write_tensor(f, piece)
        if counter is not None:
            counter.written += 8 + len(raw) + offset

    return atomic_write(path, emit)


def _write_tensor(f: Any, t: torch.Tensor) -> None:
    import torch

    from compresskit.engine.device import to_host

    flat = to_host(t.detach()).contiguous().reshape(-1).view(torch.uint8)
    if flat.numel():
        f.write(memoryview(flat.numpy()))


def read_all(path: str | os.PathLike, counter: Counter | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a (small) file."""
    tf = TensorFile(path)
    return {k: tf.read(k, counter) for k in tf.keys()}
