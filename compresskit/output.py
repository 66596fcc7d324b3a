"""Atomic output directories: a failed or interrupted run never leaves one that looks complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from compresskit.errors import OutputExistsError

MANIFEST = "compresskit.json"


def check_target(directory: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing non-empty directory unless ``overwrite`` (checked before any work)."""
    path = Path(directory)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise OutputExistsError(f"output {path} exists and is not empty; choose another --output or pass --overwrite")
    return path


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``directory`` in one rename.

    On any exception the temporary directory is removed and ``directory`` is left as it was.
    """
    path = check_target(directory, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, trash / "old")
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write ``compresskit.json`` (written last inside the temporary directory)."""
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of an output directory, or None if it has none."""
    f = Path(directory) / MANIFEST
    return json.loads(f.read_text()) if f.exists() else None
