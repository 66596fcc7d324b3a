"""Error types. Every user-facing error says what was wrong, what was expected and the fix."""

from __future__ import annotations


class CompressKitError(Exception):
    """Base class of every error compresskit raises on purpose."""


class UnknownPluginError(CompressKitError, KeyError):
    """A metric, pattern or adapter name that no installed plugin registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DuplicatePluginError(CompressKitError):
    """Two plugins registered the same name for the same kind."""


class PluginDefinitionError(CompressKitError):
    """A plugin class is malformed (wrong base class, no name, bad Options)."""


class PluginLoadError(CompressKitError):
    """A plugin named with ``-p`` or ``$COMPRESSKIT_PLUGINS`` failed to import or to register."""


class OptionError(CompressKitError, ValueError):
    """A plugin option or run setting has a bad key or value."""


class IncompatiblePatternError(CompressKitError, ValueError):
    """A mask pattern cannot be applied to a layer, or contradicts --sparsity."""


class MissingDependencyError(CompressKitError, ImportError):
    """An optional dependency (or packaged asset) is not installed."""


class GradientError(CompressKitError, ValueError):
    """A gradient file or cache does not match the model, or gradients could not be computed."""


class OutputExistsError(CompressKitError, FileExistsError):
    """The output directory exists and is not empty."""


class NonFiniteError(CompressKitError, ValueError):
    """A NaN or inf in weights, activations, statistics, scores or results (the message names the layer and source)."""


class DistributedError(CompressKitError):
    """A multi-process run (``torchrun``) cannot go on: another rank failed, or the ranks disagree."""


class DeviceMixError(CompressKitError, RuntimeError):
    """One tensor operation mixed a tensor at rest with a compute tensor (the strict device mode of
    :mod:`compresskit.engine.device`; on CUDA the same code fails with a device mismatch)."""
