"""compresskit: calibration-based pruning of pretrained transformers (GBLM, Wanda, SparseGPT).

Public surface::

    import compresskit
    result = compresskit.prune(adapter="llama", model="random:tiny", metric="wanda", sparsity=0.5)
    result.save("out/")
    compresskit.evaluate("out/")

``import compresskit`` does not import torch: the API functions load it when called.
"""

from __future__ import annotations

from compresskit._version import __version__
from compresskit.errors import (
    CompressKitError,
    DuplicatePluginError,
    IncompatiblePatternError,
    MissingDependencyError,
    OptionError,
    OutputExistsError,
    UnknownPluginError,
)
from compresskit.hookspecs import hookimpl
from compresskit.interfaces import (
    Allocation,
    EvalRequest,
    Loaded,
    MaskPattern,
    ModelAdapter,
    ScoreMetric,
    Solver,
    Structure,
)
from compresskit.options import option

__all__ = [
    "Allocation",
    "CompressKitError",
    "DuplicatePluginError",
    "EvalRequest",
    "IncompatiblePatternError",
    "Loaded",
    "MaskPattern",
    "MissingDependencyError",
    "ModelAdapter",
    "OptionError",
    "OutputExistsError",
    "PruneResult",
    "RunConfig",
    "ScoreMetric",
    "Solver",
    "Structure",
    "UnknownPluginError",
    "__version__",
    "check",
    "evaluate",
    "hookimpl",
    "option",
    "prune",
]

_LAZY = {"prune": "api", "check": "api", "evaluate": "api", "PruneResult": "api", "RunConfig": "config"}


def __getattr__(name: str):  # lazy: `import compresskit` stays light
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"compresskit.{_LAZY[name]}"), name)
    raise AttributeError(name)
