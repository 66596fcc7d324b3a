"""Devices, for the adapter code that evaluates a whole model (public and stable).

The runner hands metrics, patterns and solvers every tensor on the compute device: they never
move tensors. An adapter's evaluation is the one place a plugin meets a whole model, and these
say where it is:

- :func:`resolve_device` turns ``"auto"``/``"cpu"``/``"cuda:1"`` into a ``torch.device``
  (``auto``: CUDA when present);
- :func:`model_device` is the device of a model's parameters;
- ``with on_device(model, device):`` runs a block with the model there and puts it back after.
"""

from compresskit.engine.device import model_device, on_device, resolve_device

__all__ = ["model_device", "on_device", "resolve_device"]
