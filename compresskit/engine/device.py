"""The one place that knows about devices: choice, placement, moves, host reads, synchronisation.

The placement rule: a run has one :class:`Placement` ``(compute, at_rest)``. Tensors *rest* on
``at_rest`` (the CPU: the model between blocks, gradient statistics, caches, files) and every
tensor that crosses to the compute device goes through :meth:`Placement.to_compute` (and back
through :meth:`Placement.to_rest`). Metrics, patterns, solvers, statistics and the OBS code
receive everything on the compute device and never move tensors; the engine does the crossing
when a block is entered or left, when statistics are handed to a layer, at storage load/save,
and when the whole model is needed (gradients, evaluation, ``--select``). Device *choice*
(``auto``, a rank's GPU under ``torchrun``) happens here too (:func:`compute_device`).

The strict test mode (``$COMPRESSKIT_STRICT_DEVICES=1``; the test suite sets it): tensors placed
at rest become :class:`AtRest` tensors, whose ``__torch_function__`` raises
:class:`DeviceMixError` when one call mixes them with plain (compute) tensors. On a CPU-only
machine, where both devices are the CPU, it finds the device mixes that would crash on CUDA
("Expected all tensors to be on the same device"). Moving to compute strips the tag.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any, Iterator

from compresskit.errors import DeviceMixError, OptionError  # noqa: F401  (DeviceMixError: raised by AtRest)

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


def compute_device(spec: str = "auto", ctx: Any = None) -> torch.device:
    """The run's compute device: :func:`resolve_device`, then, under ``torchrun`` (``ctx`` a
    :class:`~compresskit.engine.distributed.Context`), ``cuda`` without an index becomes this rank's
    ``cuda:<local rank>`` (made current, and recorded as ``ctx.gpu`` when the collectives use NCCL).

    Raises:
        OptionError: see :func:`resolve_device`.
        DistributedError: a local rank without a GPU, or one explicit GPU for several ranks of a node.
    """
    import torch

    from compresskit.errors import DistributedError

    dev = resolve_device(spec)
    if ctx is None or not ctx.enabled or dev.type != "cuda":
        return dev
    if dev.index is None:
        count = torch.cuda.device_count()
        if ctx.local_rank >= count:
            raise DistributedError(f"local rank {ctx.local_rank} has no GPU: {count} CUDA device(s) are visible "
                                   f"on this node; start at most {count} processes per node (--nproc-per-node)")
        dev = torch.device("cuda", ctx.local_rank)
    elif int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise DistributedError(f"--device {dev} would put every rank of this node on one GPU; give --device cuda "
                               "(or auto): each rank then computes on cuda:<LOCAL_RANK>")
    torch.cuda.set_device(dev)
    ctx.gpu = dev if "nccl" in (ctx.backend or "") else None
    return dev


def as_device(dev: Any) -> torch.device:
    """``dev`` (a string or a device) as a ``torch.device``."""
    import torch

    return torch.device(dev)


def is_cuda(dev: Any) -> bool:
    """True for a CUDA device (or its string)."""
    import torch

    return torch.device(dev).type == "cuda"


# ------------------------------------------------------------------------------------ strict mode

STRICT_ENV = "COMPRESSKIT_STRICT_DEVICES"


def strict() -> bool:
    """True when ``$COMPRESSKIT_STRICT_DEVICES`` is set (not empty, not ``0``): the strict test mode."""
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def _at_rest_class() -> type:
    from compresskit.engine.atrest import AtRest

    return AtRest


def _strip(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor) and type(out) is not torch.Tensor and isinstance(out, _at_rest_class()):
        return out.as_subclass(torch.Tensor)
    return out


def at_rest_type() -> type:
    """The :class:`AtRest` tensor subclass of the strict mode (for tests: ``isinstance(t, at_rest_type())``)."""
    return _at_rest_class()


def _tree(obj: Any, fn: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_tree(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_tree(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _tree(v, fn) for k, v in obj.items()}
    return obj


def to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors inside nested tuples/lists/dicts to ``device`` (other values unchanged; an
    :class:`AtRest` tag is stripped: this is the move to compute)."""
    return _tree(obj, lambda t: _strip(t.to(device)))


def to_host(obj: Any) -> Any:
    """Tensors of a nested ``obj`` read back to the host for reporting (evaluation results, hashes,
    exports): plain CPU tensors, never tagged, because they do not go back to compute."""
    return to_device(obj, "cpu")


def move_module(module: nn.Module, device: Any) -> nn.Module:
    """Move a module (a block entering or leaving the compute device) in place; returns it."""
    return module.to(device)


def resting_tensors(module: nn.Module) -> list[tuple[nn.Module, str, str, torch.Tensor]]:
    """``(module, "_parameters" or "_buffers", name, tensor)`` of every tensor of ``module`` where it rests."""
    return [(m, kind, key, t.data if kind == "_parameters" else t) for m in module.modules()
            for kind in ("_parameters", "_buffers") for key, t in getattr(m, kind).items() if t is not None]


def put_tensor(m: nn.Module, kind: str, key: str, t: torch.Tensor) -> None:
    """Make ``t`` the tensor of ``m``'s parameter (the same Parameter object, so ties hold) or buffer ``key``."""
    if kind == "_parameters":
        m._parameters[key].data = t
    else:
        m._buffers[key] = t


def return_to(module: nn.Module, rest: list | None, device: torch.device) -> None:
    """Move ``module`` back to ``device``, writing each tensor into the one it rested in (``rest``
    from :func:`resting_tensors`; None: a plain ``module.to(device)``).

    A model loaded from safetensors rests in a memory-mapped file: a new copy per block would
    leave the mapped file's pages in memory beside it (twice the model's bytes by the last
    block), while a write into the mapped tensor replaces the file's page with its own.
    """
    import torch

    if rest is None:
        move_module(module, device)
        return
    with torch.no_grad():
        for m, kind, key, home in rest:
            now = getattr(m, kind).get(key)
            if now is None:
                continue
            if home.device != torch.device(device) or home.shape != now.shape or home.dtype != now.dtype:
                home = now.data.to(device)
            elif home.data_ptr() != now.data_ptr():
                home.copy_(now.data)
            put_tensor(m, kind, key, home)


def to_rest(obj: Any, device: Any = "cpu") -> Any:
    """Put the tensors of a nested ``obj`` at rest on ``device`` (detached; tagged :class:`AtRest`
    in the strict mode)."""
    tag = _at_rest_class() if strict() else None

    def rest(t):
        t = _strip(t.detach().to(device))
        return t.as_subclass(tag) if tag is not None else t

    return _tree(obj, rest)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a run computes and where its tensors rest; every crossing goes through here.

    Attributes:
        compute: the device blocks, statistics, metrics and solvers compute on.
        at_rest: where the model rests between blocks and where gradient statistics, caches and
            files live (the CPU).
    """

    compute: Any = "cpu"
    at_rest: Any = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "compute", as_device(self.compute))
        object.__setattr__(self, "at_rest", as_device(self.at_rest))

    def to_compute(self, obj: Any) -> Any:
        """Tensors of a nested ``obj`` on the compute device (the tag of the strict mode stripped)."""
        return to_device(obj, self.compute)

    def to_rest(self, obj: Any) -> Any:
        """Tensors of a nested ``obj`` at rest (see :func:`to_rest`)."""
        return to_rest(obj, self.at_rest)

    @contextlib.contextmanager
    def whole_model(self, model: nn.Module) -> Iterator[nn.Module]:
        """The whole model on the compute device for the block (gradients, evaluation, ``--select``)."""
        with on_device(model, self.compute) as m:
            yield m


def host_float(t: Any) -> float:
    """One number read back to the host (a synchronisation on CUDA: call it outside per-layer loops)."""
    return float(t.item()) if hasattr(t, "item") else float(t)


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


def free_memory(device: Any) -> int:
    """Free bytes on a CUDA ``device`` (0 for any other device: nothing to budget there)."""
    import torch

    if not is_cuda(device):
        return 0
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def peak_memory(device: Any) -> int | None:
    """Peak bytes allocated on a CUDA ``device`` by this process so far (``torch.cuda.max_memory_allocated``;
    never reset here, so it includes earlier work in the process); None for any other device."""
    import torch

    if not is_cuda(device):
        return None
    return int(torch.cuda.max_memory_allocated(as_device(device)))


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    import torch

    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on ``device``'s current stream, the compute (no-op on CPU), so
    timings are honest. Not a device-wide ``torch.cuda.synchronize``: that would also wait for the
    next block's copy on the prefetch stream at every layer, serialising the copy with the compute."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.current_stream(device).synchronize()


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


@contextlib.contextmanager
def model_on(model: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """Like :func:`on_device` but leaves the mode alone (the gradient pass sets its own) and does
    nothing when the model is already there."""
    import torch

    home = model_device(model)
    if home == torch.device(device):
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)
