"""The one place that knows about devices: resolution, moves, synchronisation."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Iterator

from compresskit.errors import OptionError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present (else CPU, logged); ``cpu``, ``cuda``, ``cuda:1``, ``mps`` checked.

    Raises:
        OptionError: an unknown device string, or an accelerator that is not available.
    """
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.info("no CUDA device found; computing on the CPU")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise OptionError(f"--device {spec!r} is not a device ({exc}); use auto, cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"--device {spec} asks for CUDA but no CUDA device is available; use --device cpu "
                              "(or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"--device {spec} asks for MPS but it is not available; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise OptionError(f"--device {spec}: device type {dev.type!r} is not supported; use auto, cpu, cuda or mps")
    return dev


def to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors inside nested tuples/lists/dicts to ``device`` (other values unchanged)."""
    import torch

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
        for p in module._parameters.values():
            if p is not None and p.device != device:
                p.data = p.data.to(device)  # same Parameter object: tied weights stay tied
        for key, b in module._buffers.items():
            if b is not None and b.device != device:
                module._buffers[key] = b.to(device)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    import torch

    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (no-op on CPU) so timings are honest."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """Move a whole model to ``device`` (eval mode) for the block, then back where it was.

    Evaluation uses it so that it runs on the run's device; pruning itself never holds more than
    one block there.
    """
    home, was_training = model_device(model), model.training
    model.to(device).eval()
    try:
        yield model
    finally:
        model.to(home).train(was_training)
