"""The one place that knows about devices: resolution, moves, synchronisation, memory."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present (else CPU, logged); anything else is passed to torch."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.info("no CUDA device found; computing on the CPU")
        return torch.device("cpu")
    return torch.device(spec)


def to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors inside nested tuples/lists/dicts to ``device`` (other values unchanged)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def move_outside(model: nn.Module, blocks: list[nn.Module], device: torch.device) -> None:
    """Move every parameter and buffer of ``model`` that is not inside ``blocks`` to ``device``."""
    inside = {id(m) for b in blocks for m in b.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for key, p in module._parameters.items():
            if p is not None and p.device != device:
                p.data = p.data.to(device)  # same Parameter object: tied weights stay tied
        for key, b in module._buffers.items():
            if b is not None and b.device != device:
                module._buffers[key] = b.to(device)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (no-op on CPU) so timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak allocated accelerator memory since the last reset; None on CPU (see bench for RSS)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """Move a whole model to ``device`` (eval mode) for the block, then back where it was.

    Evaluation uses it so that it runs on the run's device; pruning itself never holds more than
    one block there.
    """
    try:
        home = next(model.parameters()).device
    except StopIteration:
        home = torch.device("cpu")
    was_training = model.training
    model.to(device).eval()
    try:
        yield model
    finally:
        model.to(home).train(was_training)
