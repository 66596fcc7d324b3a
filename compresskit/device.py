"""Devices, for the adapter code that evaluates a whole model (public and stable).

The runner hands metrics, patterns and solvers every tensor on the compute device: they never
move tensors. An adapter's evaluation is the one place a plugin meets a whole model, and these
say where it is:

- :func:`resolve_device` turns ``"auto"``/``"cpu"``/``"cuda:1"`` into a ``torch.device``
  (``auto``: CUDA when present);
- :func:`model_device` is the device of a model's parameters;
- ``with on_device(model, device):`` runs a block with the model there and puts it back after;
- :func:`to_device` moves the tensors of nested tuples/lists/dicts (data the adapter reads itself,
  e.g. evaluation windows) to the model's device; :func:`to_host` reads results back for reporting;
- :class:`Placement` is a run's ``(compute, at_rest)`` pair (``run.placement``), :func:`to_rest`
  puts tensors where they rest (tagged in the strict device mode of the tests).
"""

from compresskit.engine.device import Placement, model_device, on_device, resolve_device, to_device, to_host, to_rest

__all__ = ["Placement", "model_device", "on_device", "resolve_device", "to_device", "to_host", "to_rest"]
