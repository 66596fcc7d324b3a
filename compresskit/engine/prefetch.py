"""The next block's tensors copied to the compute device while the current block computes.

A walk that keeps the model at rest on the host moves each block to the GPU for its step. Done
inline, the copy waits for the host: the model's pages are read (a model loaded from
safetensors rests in a memory-mapped file) and staged to the device while the GPU idles — at
7B about 0.4 GB per block. :class:`Prefetcher` starts block ``i + 1``'s copy in a worker thread
on a side CUDA stream as soon as block ``i`` is on the device; when the walk enters block
``i + 1`` the compute stream waits for that stream (a device-side wait, no host
synchronisation) and the copies are installed as the block's tensors. Leaving a block, its
tensors are written back into the ones they rested in (as
:func:`compresskit.engine.device.return_to` does) by the same worker while the next block
computes; the block keeps its compute tensors until that write is done, when the next block
leaves or the walk ends (:meth:`Prefetcher.settle`). So up to three blocks are on the device:
the one leaving, the one computing and the next one's copy.

It is on by default when the compute device is CUDA and blocks rest elsewhere;
``$COMPRESSKIT_PREFETCH`` overrides that: ``0`` turns it off, ``1`` turns it on everywhere (on
the CPU the worker copies without a stream: the tests use this to run the same path without a
GPU). The device moves here and in :mod:`compresskit.engine.device` are the only ones in the
package.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import TYPE_CHECKING, Any

from compresskit.engine.device import _strip, as_device, is_cuda, put_tensor, resting_tensors

if TYPE_CHECKING:
    import torch
    from torch import nn

PREFETCH_ENV = "COMPRESSKIT_PREFETCH"


def wanted(device: Any, offload: Any) -> bool:
    """Whether a walk computing on ``device`` with blocks resting on ``offload`` prefetches."""
    env = os.environ.get(PREFETCH_ENV, "auto").strip().lower()
    if env in ("0", "off", "false", "no"):
        return False
    if env in ("1", "on", "true", "yes"):
        return True
    if env not in ("", "auto"):
        raise ValueError(f"${PREFETCH_ENV}={env!r}: expected auto, 0 or 1")
    return is_cuda(device) and as_device(device) != as_device(offload)


class Prefetcher:
    """One block ahead: :meth:`start` copies a block's tensors in a worker thread, :meth:`install`
    makes them the block's tensors (or returns False when nothing matching was started)."""

    def __init__(self, device: Any) -> None:
        import torch

        self.device = as_device(device)
        self.stream = torch.cuda.Stream(self.device) if is_cuda(self.device) else None
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compresskit-prefetch")
        self._pending: tuple[int, int, list, concurrent.futures.Future] | None = None
        self._back: tuple[list, concurrent.futures.Future] | None = None

    def _copy(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        import torch

        if self.stream is None:
            return [_strip(t.to(self.device, copy=True)) for t in tensors]
        with torch.cuda.stream(self.stream):
            return [_strip(t.to(self.device, non_blocking=True)) for t in tensors]

    def start(self, index: int, block: nn.Module) -> None:
        """Begin copying block ``index`` to the compute device (any earlier copy is waited for and dropped)."""
        self.discard()
        rest = resting_tensors(block)
        self._pending = (index, id(block), rest, self.pool.submit(self._copy, [t for *_, t in rest]))

    def install(self, index: int, block: nn.Module) -> bool:
        """Make the copies started for block ``index`` its tensors; False when there are none."""
        import torch

        pending, self._pending = self._pending, None
        if pending is None or pending[:2] != (index, id(block)):
            if pending is not None:
                concurrent.futures.wait([pending[3]])
            return False
        _, _, rest, future = pending
        try:
            copies = future.result()
        except Exception:  # noqa: BLE001 - a failed copy (say, out of device memory): move the block inline
            return False
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for t in copies:
                t.record_stream(current)  # allocated on the side stream, used on the compute stream
        with torch.no_grad():
            for (m, kind, key, _), t in zip(rest, copies):
                put_tensor(m, kind, key, t)
        return True

    def write_back(self, rest: list) -> bool:
        """Start writing a block that is leaving back into its resting tensors (``rest`` from
        :func:`~compresskit.engine.device.resting_tensors`) in the worker; the block keeps its
        compute tensors until :meth:`settle` swaps the resting ones in. False (nothing started)
        when a tensor cannot be written into its resting one (another shape, dtype or device)."""
        import torch

        self.settle()
        pairs = []
        for m, kind, key, home in rest:
            now = getattr(m, kind).get(key)
            if now is None:
                continue
            now = now.data if kind == "_parameters" else now
            if home.shape != now.shape or home.dtype != now.dtype or home.device.type != "cpu":
                return False
            pairs.append((m, kind, key, home, now))
        event = None
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        self._back = (pairs, self.pool.submit(self._write, pairs, event))
        return True

    def _write(self, pairs: list, event: Any) -> None:
        import torch

        with torch.no_grad():
            if self.stream is None:
                for *_, home, now in pairs:
                    if home.data_ptr() != now.data_ptr():
                        home.copy_(now)
                return
            self.stream.wait_event(event)  # the block's last kernels on the compute stream are done
            with torch.cuda.stream(self.stream):
                for *_, home, now in pairs:
                    home.copy_(now)  # into pageable host memory: returns when the bytes are there

    def settle(self) -> None:
        """Finish the write-back in flight and give the block its resting tensors again (a tensor
        changed after it left, or a failed write, is written inline)."""
        back, self._back = self._back, None
        if back is None:
            return
        pairs, future = back
        failed = future.exception() is not None
        import torch

        with torch.no_grad():
            for m, kind, key, home, now in pairs:
                current = getattr(m, kind).get(key)
                if current is None:
                    continue
                current = current.data if kind == "_parameters" else current
                if failed or current.data_ptr() != now.data_ptr():
                    home.copy_(current)
                put_tensor(m, kind, key, home)

    def discard(self) -> None:
        """Wait for a copy in flight and drop it (its error too: the block is then moved inline)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            concurrent.futures.wait([pending[3]])

    def close(self) -> None:
        """Finish the write-back, drop a copy in flight and stop the worker."""
        try:
            self.discard()
            self.settle()
        finally:
            self.pool.shutdown(wait=True)
