"""compresskit: calibration-based pruning of pretrained transformers (GBLM, Wanda, SparseGPT).

Public surface::

    import compresskit
    result = compresskit.prune(adapter="llama", model="random:tiny", metric="wanda", sparsity=0.5)
    result.save("out/")
"""

from __future__ import annotations

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
from compresskit.interfaces import LayerContext, Loaded, MaskPattern, ModelAdapter, PruneDecision, ScoreMetric
from compresskit.options import option

__version__ = "0.1.0"

__all__ = [
    "CompressKitError",
    "DuplicatePluginError",
    "IncompatiblePatternError",
    "LayerContext",
    "Loaded",
    "MaskPattern",
    "MissingDependencyError",
    "ModelAdapter",
    "OptionError",
    "OutputExistsError",
    "PruneDecision",
    "PruneResult",
    "RunConfig",
    "ScoreMetric",
    "UnknownPluginError",
    "__version__",
    "hookimpl",
    "option",
    "prune",
]


def __getattr__(name: str):  # lazy: `import compresskit` stays light
    if name in ("prune", "PruneResult", "RunConfig"):
        from compresskit import api

        return getattr(api, name)
    raise AttributeError(name)
