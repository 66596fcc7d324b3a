"""Output directories: checked before any work, written atomically, never replacing what is not ours.

An output is a directory holding the model in its family's format plus ``compresskit.json``,
written last. ``--overwrite`` replaces only a directory that is recognisably a compresskit
output (it has ``compresskit.json``) or is empty; never the working directory or one of its
parents, and never through a symbolic link. Before any work the location is probed for writing
(:func:`check_target`) and, once the model is loaded, for room (:func:`check_room`). While an
output is written, SIGTERM (and SIGHUP) raise :class:`Terminated` like SIGINT raises
``KeyboardInterrupt``, so the hidden temporary directory is removed on the way out; a process
killed harder leaves it behind and the next save of that output removes it (and puts back a
previous output that was moved aside at that moment).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from compresskit.cache import atomic_directory, stale_temporaries
from compresskit.errors import CompressKitError, OutputExistsError

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

MANIFEST = "compresskit.json"
ROOM_MARGIN = 1.05
ROOM_SLACK = 16 << 20  # tokenizer, configs and the manifest besides the tensors


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived while an output was written (like ``KeyboardInterrupt`` for SIGINT)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def is_output(path: str | os.PathLike) -> bool:
    """True for a directory holding a ``compresskit.json``."""
    return (Path(path) / MANIFEST).is_file()


def check_target(directory: str | os.PathLike, overwrite: bool, model: Any = None) -> Path:
    """Refuse an output location that would destroy data or cannot work (checked before any work).

    Raises:
        OutputExistsError: it exists and is not empty (without ``overwrite``), or it is not a
            compresskit output (with ``overwrite``), or it is a symlink, the working directory
            or a parent of it, or it is the ``model`` directory or contains it (saving would replace
            or delete the model being pruned). An output inside the model directory is allowed: no
            file of the model is touched.
        CompressKitError: the parent is not a writable directory.
    """
    path = Path(directory)
    _check_not_model(path, model)
    restore_interrupted(path)
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
    probe_writable(_existing_ancestor(resolved.parent), path)
    return path


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def probe_writable(directory: Path, output: str | os.PathLike) -> None:
    """Create and remove a file in ``directory`` (a read-only mount or missing permission fails here).

    Raises:
        CompressKitError: naming the reason (``Read-only file system``, ``Permission denied``...).
    """
    if not directory.is_dir():
        raise CompressKitError(f"cannot create output {output}: {directory} is not a directory; choose another --output")
    try:
        with tempfile.TemporaryFile(prefix=".compresskit-probe-", dir=directory):
            pass
    except OSError as exc:
        raise CompressKitError(f"cannot create output {output}: {directory} is not writable ({exc.strerror or exc}); "
                               "choose another --output") from None


def estimate_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors (parameters and buffers, shared ones once): its size on disk."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def check_room(directory: str | os.PathLike, needed: int) -> None:
    """Refuse an output whose filesystem has less free space than ``needed`` bytes (plus a margin).

    Raises:
        CompressKitError: with the estimate, the free space and the fix.
    """
    where = _existing_ancestor(Path(directory).resolve().parent)
    free = shutil.disk_usage(where).free
    want = int(needed * ROOM_MARGIN) + ROOM_SLACK
    if free < want:
        raise CompressKitError(f"not enough space for output {directory}: the model needs about {_size(want)}, the "
                               f"filesystem of {where} has {_size(free)} free; free some space or choose another "
                               "--output")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Inside: SIGTERM and SIGHUP raise :class:`Terminated`, SIGINT raises ``KeyboardInterrupt``;
    the previous handlers are restored after. A signal the process ignores (``nohup``, a
    background job's SIGINT) stays ignored. Outside the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated(signum)

    wanted = {signal.SIGTERM: raise_terminated, signal.SIGINT: signal.default_int_handler}
    if hasattr(signal, "SIGHUP"):
        wanted[signal.SIGHUP] = raise_terminated
    previous = {}
    try:
        for sig, handler in wanted.items():
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, handler)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_not_model(path: Path, model: Any) -> None:
    if not isinstance(model, (str, os.PathLike)) or not Path(model).is_dir():
        return
    source, out = Path(model).resolve(), path.resolve()
    if out == source:
        raise OutputExistsError(f"output {path} is the model directory; saving would replace the model being "
                                "pruned (and lose it if anything failed): choose another --output")
    if out in source.parents:
        raise OutputExistsError(f"output {path} contains the model directory {model}; --overwrite would delete "
                                "the model: choose an --output outside it")


def restore_interrupted(directory: str | os.PathLike) -> None:
    """Put back a previous output that a run killed between ``--overwrite``'s two renames left only
    in its ``.<name>.old-*`` sibling (when ``directory`` itself is missing)."""
    final = Path(directory)
    for tmp in stale_temporaries(final):
        old = tmp / "old"
        if not final.exists() and not final.is_symlink() and is_output(old):
            log.warning("restoring the previous output %s from %s (an earlier run was killed while replacing it)",
                        final, tmp)
            os.replace(old, final)
            shutil.rmtree(tmp, ignore_errors=True)


def clean_stale(directory: str | os.PathLike) -> None:
    """Remove temporary siblings an interrupted earlier run of this output left behind (after
    :func:`restore_interrupted`)."""
    final = Path(directory)
    restore_interrupted(final)
    for tmp in stale_temporaries(final):
        log.info("removing %s left by an interrupted run", tmp)
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def save_output(directory: str | os.PathLike, write_model: Callable[[Path], None], manifest: dict[str, Any],
                overwrite: bool = False) -> Path:
    """Write ``write_model(tmp)`` and the manifest into a temporary sibling, then rename it into place.

    SIGTERM/SIGINT while writing remove the temporary sibling and re-raise (:class:`Terminated`,
    ``KeyboardInterrupt``); a full disk or another ``OSError`` becomes a :class:`CompressKitError`.
    """
    path = check_target(directory, overwrite, (manifest.get("config") or {}).get("model"))
    clean_stale(path)
    try:
        with signals_as_exceptions(), atomic_directory(path, replace=overwrite) as tmp:
            write_model(tmp)
            write_manifest(tmp, manifest)
    except FileExistsError as exc:  # another run saved the same output since ours was checked
        raise OutputExistsError(f"output {path} was written by another run while this one worked; this run's "
                                "result was not saved: choose another --output, or pass --overwrite to replace "
                                "it") from exc
    except OSError as exc:
        raise CompressKitError(f"could not write output {path} ({exc.strerror or exc}); nothing was written: "
                               "free some space or choose another --output") from exc
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
