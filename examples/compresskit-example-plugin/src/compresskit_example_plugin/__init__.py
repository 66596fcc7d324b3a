"""compresskit-example-plugin: the RI and RIA pruning metrics as a third-party plugin."""

from __future__ import annotations

__version__ = "0.1.0"
