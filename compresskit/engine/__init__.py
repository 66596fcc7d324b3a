"""The engine: how a run is carried out. Internal — plugins import the public surface instead.

Modules here may change between releases without notice. A third-party plugin imports only the
public modules listed in the API reference (``docs/reference/api.md``); the few engine functions a
plugin needs are re-exported there under a stability promise (:mod:`compresskit.blocks`,
:mod:`compresskit.distributed`, :mod:`compresskit.device`).

- :mod:`~compresskit.engine.runner`, :mod:`~compresskit.engine.walk`: the shared layerwise runner
  and its block walk (capture, replay with taps, propagation);
- :mod:`~compresskit.engine.planning`, :mod:`~compresskit.engine.targets`,
  :mod:`~compresskit.engine.checks`: a run's plan, its per-layer targets and its checks;
- :mod:`~compresskit.engine.gradients`, :mod:`~compresskit.engine.gradcache`,
  :mod:`~compresskit.engine.blockgrad`: full-model and block-local gradient statistics;
- :mod:`~compresskit.engine.select`: ``--select`` sweeps;
- :mod:`~compresskit.engine.registry`, :mod:`~compresskit.engine.kinds`: plugin discovery;
- :mod:`~compresskit.engine.device`: devices: the run's ``Placement`` and every crossing
  between where tensors rest and the compute device, device choice, host reads, the strict test
  mode (:mod:`~compresskit.engine.atrest`);
- :mod:`~compresskit.engine.stream`: block-streamed runs; :mod:`~compresskit.engine.distributed`:
  torchrun data parallelism.
"""
