"""The Python API in one page: plan, prune, inspect, save, evaluate, per-layer targets, your own metric.

    python examples/api.py
"""

from __future__ import annotations

import tempfile

import torch

import compresskit
from compresskit import ScoreMetric, hookimpl
from compresskit.api import RunConfig, plan
from compresskit.testing import fresh_registry

# 1. A run is one typed RunConfig; plan() resolves and validates names and options, loads nothing.
config = RunConfig(adapter="llama", model="random:tiny", metric="wanda", pattern="2:4",
                   nsamples=4, seqlen=32, device="cpu", progress=False)
p = plan(config)
print(f"plan: {p.metric.name} + {p.pattern.name} {p.pattern.structure} at sparsity {p.sparsity}")

# 2. prune() loads, calibrates, runs the layerwise runner and returns the model, report and manifest.
result = compresskit.prune(config)
print(f"overall sparsity {result.report.overall_sparsity:.3f}; first layer: {result.report.layers[0]}")

# 3. save() writes the model and compresskit.json atomically; evaluate() measures any output.
with tempfile.TemporaryDirectory() as tmp:
    out = result.save(f"{tmp}/pruned")
    print("saved:", sorted(f.name for f in out.iterdir()))

# 4. Per-layer targets: a mapping of layer globs (layer id = "<block>.<name>"); the first match wins.
mapped = compresskit.prune(config, pattern="unstructured", sparsity={"*.mlp.*": 0.7, "*": 0.4})
print(f"per-layer: target {mapped.report.overall_target:.3f}, achieved {mapped.report.overall_sparsity:.3f}")


# 5. A metric of your own, registered on a private registry (no packaging needed to try it).
class RandomMetric(ScoreMetric):
    """Random scores: the floor any real metric must beat."""

    name = "random"
    summary = "seeded random scores (a baseline)"

    def score(self, weight, stats):
        return torch.rand(weight.shape, generator=torch.Generator().manual_seed(0))


class _Plugin:
    @staticmethod
    @hookimpl
    def register_metrics(register):
        register(RandomMetric)


registry = fresh_registry(_Plugin)  # built-ins + this plugin, on a fresh plugin manager
mine = compresskit.prune(config, registry=registry, metric="random")
print(f"random metric: overall sparsity {mine.report.overall_sparsity:.3f}")
