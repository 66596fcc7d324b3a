"""Output directories: checked before any work, written atomically, never replacing what is not ours.

An output is a directory holding the model in its family's format plus ``compresskit.json``,
written last. ``--overwrite`` replaces only a directory that is recognisably a compresskit
output (it has ``compresskit.json``) or is empty; never the working directory or one of its
parents, and never through a symbolic link.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from compresskit.cache import atomic_directory, stale_temporaries
from compresskit.errors import CompressKitError, OutputExistsError

log = logging.getLogger(__name__)

MANIFEST = "compresskit.json"


def is_output(path: str | os.PathLike) -> bool:
    """True for a directory holding a ``compresskit.json``."""
    return (Path(path) / MANIFEST).is_file()


def check_target(directory: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output location that would destroy data or cannot work (checked before any work).

    Raises:
        OutputExistsError: it exists and is not empty (without ``overwrite``), or it is not a
            compresskit output (with ``overwrite``), or it is a symlink, the working directory
            or a parent of it.
        CompressKitError: the parent is not a writable directory.
    """
    path = Path(directory)
    if path.is_symlink():
        raise OutputExistsError(f"output {path} is a symbolic link; give the real directory "
                                f"({os.path.realpath(path)}) or another --output")
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputExistsError(f"output {path} is the working directory or a parent of it; choose a new "
                                "sub-directory, e.g. --output out/")
    if path.exists():
        if not path.is_dir():
            raise OutputExistsError(f"output {path} is a file; choose a directory path for --output")
        if any(path.iterdir()):
            if not overwrite:
                raise OutputExistsError(f"output {path} exists and is not empty; choose another --output or pass "
                                        "--overwrite")
            if not is_output(path):
                raise OutputExistsError(f"output {path} is not a compresskit output (no {MANIFEST}); --overwrite "
                                        "only replaces earlier compresskit outputs: choose another --output")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CompressKitError(f"cannot create output {path}: {parent} is not a writable directory; "
                               "choose another --output")
    return path


def clean_stale(directory: str | os.PathLike) -> None:
    """Remove temporary siblings an interrupted earlier run of this output left behind."""
    for tmp in stale_temporaries(directory):
        log.info("removing %s left by an interrupted run", tmp)
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def save_output(directory: str | os.PathLike, write_model: Callable[[Path], None], manifest: dict[str, Any],
                overwrite: bool = False) -> Path:
    """Write ``write_model(tmp)`` and the manifest into a temporary sibling, then rename it into place."""
    path = check_target(directory, overwrite)
    clean_stale(path)
    with atomic_directory(path, replace=overwrite) as tmp:
        write_model(tmp)
        write_manifest(tmp, manifest)
    return path


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write ``compresskit.json`` (last, inside the temporary directory); NaN is written as null."""
    text = json.dumps(_finite(manifest), indent=2, sort_keys=True, default=str, allow_nan=False)
    (directory / MANIFEST).write_text(text + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of an output directory, or None if it has none.

    Raises:
        CompressKitError: the manifest exists but is not valid JSON.
    """
    f = Path(directory) / MANIFEST
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CompressKitError(f"{f} is corrupt ({exc}); re-run the prune that wrote it, or delete the "
                               "directory") from None
    if not isinstance(data, dict):
        raise CompressKitError(f"{f} does not hold a JSON object; re-run the prune that wrote it")
    return data
