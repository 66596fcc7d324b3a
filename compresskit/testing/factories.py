"""Tiny seeded tensors and layers, tiny models through the registry, and isolated registries."""

from __future__ import annotations

import importlib
import importlib.metadata as md
from types import ModuleType
from typing import TYPE_CHECKING

from compresskit.errors import CompressKitError
from compresskit.engine.kinds import KINDS
from compresskit.engine.registry import BUILTIN_DIST, GROUP, LoadInfo, Registry, add_plugin, new_plugin_manager

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compresskit.interfaces import Loaded


def random_linear(out_features: int = 16, in_features: int = 32, seed: int = 0) -> nn.Linear:
    """A seeded float32 ``nn.Linear`` without bias (the shape of a LLaMA projection)."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=g))
    return layer


def random_inputs(tokens: int = 8, in_features: int = 32, seed: int = 1) -> torch.Tensor:
    """Seeded ``[tokens, in_features]`` float32 layer inputs with uneven column scales."""
    import torch

    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.1, 3.0, in_features)
    return torch.randn(tokens, in_features, generator=g) * scale


def fresh_registry(*plugin_modules: ModuleType | str | object, builtins: bool = True) -> Registry:
    """A :class:`~compresskit.engine.registry.Registry` on a fresh pluggy manager (no global state).

    Args:
        *plugin_modules: modules, dotted module names or other objects (e.g. a class instance)
            holding ``@hookimpl`` functions, registered as if they were installed plugins.
        builtins: also load compresskit's own built-in plugins (the entry points of the
            ``compresskit`` distribution; third-party entry points are never loaded).

    Returns:
        The registry; ``registry.pm`` is its plugin manager, ``registry.failures`` what was skipped.
    """
    pm, load = new_plugin_manager(), LoadInfo()
    if builtins:
        for ep in md.entry_points(group=GROUP):
            dist = getattr(ep, "dist", None)
            if dist is None or dist.name != BUILTIN_DIST:
                continue
            if add_plugin(pm, ep.load(), ep.name, load):
                load.distributions[ep.name] = (dist.name, dist.version)
    for module in plugin_modules:
        mod = importlib.import_module(module) if isinstance(module, str) else module
        add_plugin(pm, mod, getattr(mod, "__name__", None) or f"{type(mod).__name__}-{id(mod):x}", load)
    return Registry(pm, load)


def registry_names(kind: str, registry: Registry | None = None) -> list[str]:
    """Names registered for ``kind`` (``metric``, ``pattern``, ``adapter``, ...): for parametrizing tests."""
    if kind not in KINDS:
        raise CompressKitError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    return [e.name for e in (registry or fresh_registry()).entries(kind)]


def tiny_model(adapter: str = "llama", source: str = "random:tiny", registry: Registry | None = None) -> Loaded:
    """A tiny seeded model loaded by ``adapter`` (built in code, no download)."""
    reg = registry or fresh_registry()
    return reg.get("adapter", adapter).cls().load(source)
