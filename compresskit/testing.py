"""Public testing helpers for compresskit and for third-party plugin authors.

Tiny-model factories, a registry built on a fresh plugin manager, and conformance checks
that every metric, pattern and adapter (built-in or third party) should pass::

    from compresskit.testing import check_metric
    from compresskit_example_plugin.ria import RIAMetric

    def test_conformance():
        check_metric(RIAMetric)

Each ``check_*`` (implemented in :mod:`compresskit.conformance`) raises
:class:`PluginConformanceError` (an ``AssertionError``, so pytest shows it as a test failure)
whose message names the broken rule and how to fix it, and returns the list of checks that
passed.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
from types import ModuleType

import pluggy
import torch
from torch import nn

from compresskit import hookspecs
from compresskit.conformance import PluginConformanceError, check_adapter, check_metric, check_pattern
from compresskit.errors import CompressKitError
from compresskit.llama_sources import random_model
from compresskit.registry import GROUP, KINDS, LoadInfo, Registry

__all__ = [
    "PluginConformanceError",
    "check_adapter",
    "check_metric",
    "check_pattern",
    "fresh_registry",
    "random_inputs",
    "random_linear",
    "random_model",
    "registry_names",
]


# --------------------------------------------------------------------------- factories


def random_linear(out_features: int = 16, in_features: int = 32, seed: int = 0) -> nn.Linear:
    """A seeded float32 ``nn.Linear`` without bias (the shape of a LLaMA projection)."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=g))
    return layer


def random_inputs(tokens: int = 8, in_features: int = 32, seed: int = 1) -> torch.Tensor:
    """Seeded ``[tokens, in_features]`` float32 layer inputs with uneven column scales."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.1, 3.0, in_features)
    return torch.randn(tokens, in_features, generator=g) * scale


# --------------------------------------------------------------------------- registry


def fresh_registry(*plugin_modules: ModuleType | str, builtins: bool = True) -> Registry:
    """A :class:`~compresskit.registry.Registry` on a fresh pluggy manager (no global state).

    Args:
        *plugin_modules: modules, dotted module names or other objects (e.g. a class) holding
            ``@hookimpl`` functions, registered as if they were installed plugins.
        builtins: also load compresskit's own built-in plugins (the entry points of the
            ``compresskit`` distribution; third-party entry points are never loaded).

    Returns:
        The registry; ``registry.pm`` is its plugin manager.
    """
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    load = LoadInfo()
    if builtins:
        for ep in md.entry_points(group=GROUP):
            dist = getattr(ep, "dist", None)
            if dist is None or dist.name != "compresskit" or pm.get_plugin(ep.name) is not None:
                continue
            pm.register(ep.load(), name=ep.name)
            load.distributions[ep.name] = (dist.name, dist.version)
    for module in plugin_modules:
        mod = importlib.import_module(module) if isinstance(module, str) else module
        if not pm.is_registered(mod):  # a built-in passed explicitly is already there
            pm.register(mod, name=getattr(mod, "__name__", repr(mod)))
    pm.check_pending()
    return Registry(pm, load)


def registry_names(kind: str, registry: Registry | None = None) -> list[str]:
    """Names registered for ``kind`` (``metric``, ``pattern``, ``adapter``): for parametrizing tests."""
    if kind not in KINDS:
        raise CompressKitError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    return [e.name for e in (registry or fresh_registry()).entries(kind)]
