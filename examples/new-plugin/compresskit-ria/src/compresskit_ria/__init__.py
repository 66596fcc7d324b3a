"""compresskit-ria: a compresskit metric plugin (``ria``)."""

from __future__ import annotations

__version__ = "0.1.0"
