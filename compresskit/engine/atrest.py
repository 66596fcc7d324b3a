"""The :class:`AtRest` tensor subclass of the strict device mode (see :mod:`compresskit.engine.device`).

Its own module because it subclasses ``torch.Tensor`` at import (the device module imports torch
only inside functions, and imports this one lazily); at module level, tagged tensors pickle and
deep-copy.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten

from compresskit.errors import DeviceMixError

_CROSSING = frozenset({"to", "cpu", "cuda", "copy_", "as_subclass"})
"""Calls allowed to mix: the crossings themselves (``to``/``cpu``/``cuda`` with a device strip the tag)."""


def _moves(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether a ``to``/``cpu``/``cuda`` call names a device (a dtype-only ``to`` keeps the tag)."""
    if name != "to":
        return True
    if "device" in kwargs:
        return True
    return any(isinstance(a, (str, torch.device, torch.Tensor)) for a in args[1:])


def _strip(out):
    return out.as_subclass(torch.Tensor) if isinstance(out, AtRest) else out


class AtRest(torch.Tensor):
    """A tensor at rest (strict device mode): an operation that mixes it with a plain tensor raises
    :class:`~compresskit.engine.device.DeviceMixError`; the crossings (``to``/``cpu``/``cuda`` with a
    device, ``copy_``, ``as_subclass``) are allowed and return plain tensors."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _CROSSING and (name in ("copy_", "as_subclass") or _moves(name, args, kwargs)):
            with torch._C.DisableTorchFunctionSubclass():
                return _strip(func(*args, **kwargs))
        flat = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if any(isinstance(a, cls) for a in flat) and any(not isinstance(a, cls) for a in flat):
            raise DeviceMixError(
                f"{name or func!r} mixes a tensor at rest (CPU, cache, disk) with a tensor on the compute device "
                "(on CUDA: 'Expected all tensors to be on the same device'); move it with "
                "Placement.to_compute before it meets compute tensors (compresskit.engine.device)")
        return super().__torch_function__(func, types, args, kwargs)

    def __deepcopy__(self, memo):
        if id(self) not in memo:
            with torch._C.DisableTorchFunctionSubclass():
                memo[id(self)] = self.as_subclass(torch.Tensor).clone().as_subclass(AtRest)
        return memo[id(self)]
