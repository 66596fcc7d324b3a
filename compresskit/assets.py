"""Real models that ship inside packages (see DATA.md). Filled in by the data work."""

from __future__ import annotations

from typing import Any, Callable

PACKAGED_LMS: dict[str, Callable[[], tuple[Any, Any, dict]]] = {}
