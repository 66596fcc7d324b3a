"""The shared storage layer: one cache root, atomic directories and files, one tensor fingerprint.

* :func:`cache_dir` — ``$COMPRESSKIT_CACHE`` or ``~/.cache/compresskit``.
* :func:`atomic_directory` — write into a hidden temporary sibling, then one rename; a failure
  leaves nothing that looks complete (used for outputs and cache entries).
* :func:`atomic_write` — the same for one file.
* :func:`tensor_fingerprint` — sha256 over names, shapes, dtypes and bytes of (nested) tensors.

Files and directories are created with the user's umask (not the 0600/0700 of ``tempfile``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from compresskit.errors import CompressKitError

log = logging.getLogger(__name__)

TMP_MARK = ".tmp-"


def cache_dir() -> Path:
    """The compresskit cache root: ``$COMPRESSKIT_CACHE`` or ``~/.cache/compresskit``.

    Raises:
        CompressKitError: ``$COMPRESSKIT_CACHE`` names something that is not a directory.
    """
    root = Path(os.environ.get("COMPRESSKIT_CACHE") or Path.home() / ".cache" / "compresskit").expanduser()
    if root.exists() and not root.is_dir():
        raise CompressKitError(f"the cache location {root} (COMPRESSKIT_CACHE) is a file, not a directory; "
                               "point COMPRESSKIT_CACHE at a directory")
    return root


_TEMPORARY_ROOTS: list[Path] = []


def _remove_temporary_roots() -> None:
    for root in _TEMPORARY_ROOTS:
        shutil.rmtree(root, ignore_errors=True)


def writable_or_temporary(final: str | os.PathLike, what: str) -> Path:
    """``final`` if its parent directory can be created and written, else (with a warning) the same
    name inside a private temporary directory that is removed when the process exits.

    For cache entries whose absence only costs time (unpacked packages, converted models): an
    unwritable cache (read-only, full, or ``$COMPRESSKIT_CACHE`` under a file) must not stop a run.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(prefix=".compresskit-probe-", dir=final.parent):
            pass
        return final
    except OSError as exc:
        if not _TEMPORARY_ROOTS:
            import atexit

            atexit.register(_remove_temporary_roots)
        root = Path(tempfile.mkdtemp(prefix="compresskit-uncached-"))
        _TEMPORARY_ROOTS.append(root)
        log.warning("cannot write the cache at %s (%s); keeping %s in %s for this run only. Point "
                    "$COMPRESSKIT_CACHE at a writable directory to keep it", final.parent, exc.strerror or exc, what,
                    root)
        return root / final.name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_umask(path: Path, mode: int) -> None:
    os.chmod(path, mode & ~_umask())


def temp_sibling(final: Path, directory: bool = True) -> Path:
    """A new hidden temporary file or directory next to ``final`` (``.<name>.tmp-XXXX``)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_MARK}", dir=final.parent))
        _apply_umask(tmp, 0o777)
        return tmp
    fd, name = tempfile.mkstemp(prefix=f".{final.name}{TMP_MARK}", dir=final.parent)
    os.close(fd)
    _apply_umask(Path(name), 0o666)
    return Path(name)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, replace: bool = False, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling directory; on success it becomes ``final`` in one rename.

    Args:
        final: the directory to create.
        replace: an existing ``final`` is replaced (moved aside, then deleted after the rename;
            restored if the rename fails).
        keep_existing: an existing ``final`` (made concurrently by another process) wins and
            ours is discarded (cache entries).

    On any exception, or an interrupt, the temporary directory is removed and ``final`` is left
    as it was.
    """
    final = Path(final)
    tmp = temp_sibling(final)
    held = [hold(tmp)]  # a live run's temporaries are not stale to another run of the same output
    try:
        yield tmp
        if final.exists() or final.is_symlink():
            if keep_existing:
                log.info("%s appeared concurrently; keeping it", final)
                return
            if not replace:
                raise FileExistsError(f"{final} exists")
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            held.append(hold(trash))
            os.replace(final, trash / "old")
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(trash / "old", final)  # put the previous one back
                shutil.rmtree(trash, ignore_errors=True)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        for fd in held:
            if fd is not None:
                os.close(fd)


def hold(path: Path) -> int | None:
    """An exclusive ``flock`` on file or directory ``path`` for as long as the returned descriptor is open
    (None where ``flock`` does not exist): :func:`in_use` tells other processes it is live."""
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def in_use(path: Path) -> bool:
    """``path`` is a temporary file or directory some run (this process or another) still holds (:func:`hold`)."""
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY)
    except (ImportError, OSError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` on a temporary sibling file, then rename it to ``path``."""
    path = Path(path)
    tmp = temp_sibling(path, directory=False)
    fd = hold(tmp)  # live, not stale, to a sweep of the directory (:func:`stale_in`)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
        if fd is not None:
            os.close(fd)
    return path


def stale_temporaries(final: str | os.PathLike) -> list[Path]:
    """Temporary siblings a killed process left behind for ``final`` (``.<name>.tmp-*``, ``.<name>.old-*``,
    and the ``.<name>.dense-*`` scratch copy of an export)."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    marks = (TMP_MARK, ".old-", ".dense-")
    return sorted(p for p in final.parent.iterdir() if any(p.name.startswith(f".{final.name}{m}") for m in marks)
                  and not in_use(p))  # another run writing the same output right now: not stale


def stale_in(directory: str | os.PathLike, min_age: float = 60.0) -> list[Path]:
    """Every hidden temporary directly in ``directory`` (a name starting with ``.`` and holding
    ``.tmp-``) that no live run holds and nothing changed for ``min_age`` seconds (a run holds its
    temporary only just after creating it): what a killed run left behind. Empty where ``flock``
    does not work here (a live temporary cannot be told from a stale one) or while another process
    sweeps."""
    import time

    directory = Path(directory)
    if not directory.is_dir():
        return []
    fd = hold(directory)  # probes flock, and keeps two sweeps from racing
    if fd is None:
        return []
    try:
        now, found = time.time(), []
        for p in directory.iterdir():
            if not (p.name.startswith(".") and TMP_MARK in p.name):
                continue
            try:
                old = now - p.lstat().st_mtime >= min_age
            except OSError:  # removed meanwhile
                continue
            if old and not in_use(p):
                found.append(p)
        return sorted(found)
    finally:
        os.close(fd)


def hash_into(h: Any, name: str, obj: Any) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        from compresskit.engine.device import to_host

        t = to_host(obj.detach()).contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            hash_into(h, f"{name}.{k}", obj[k])
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            hash_into(h, f"{name}[{i}]", v)
    else:
        h.update(f"{name}={obj!r}|".encode())


def tensor_fingerprint(obj: Any, *extra: Any) -> str:
    """sha256 (hex) of tensors in nested dicts/lists/tuples (names, shapes, dtypes, bytes) and ``extra``."""
    h = hashlib.sha256(repr(extra).encode())
    hash_into(h, "", obj)
    return h.hexdigest()


HASH_WORKERS = max(1, min(4, os.cpu_count() or 1))
"""Threads that hash the tensors of :func:`tensors_digest` at once (each holds one tensor)."""


def tensors_digest(tensors: Mapping[str, Any], visit: Callable[[str, Any], None] | None = None,
                   workers: int | None = None) -> str:
    """sha256 (hex) over every tensor's own sha256 (of its key, shape, dtype and bytes), in key order.

    For large sets (a model's state dict, gradient sums at 7B: tens of GB, about 1.8 GB/s per core
    for sha256): ``workers`` threads hash one tensor each at a time (hashlib releases the GIL), a
    tensor read from ``tensors`` only when a thread reaches it, so a lazy mapping has at most
    ``workers`` of them in memory. ``visit(key, tensor)`` sees each one (from those threads).
    Not the same digest as :func:`tensor_fingerprint`, which hashes everything in one stream.
    """
    import concurrent.futures

    keys = sorted(tensors, key=str)

    def one(key: str) -> bytes:
        t = tensors[key]
        if visit is not None:
            visit(key, t)
        h = hashlib.sha256()
        hash_into(h, key, t)
        return h.digest()

    h = hashlib.sha256(f"tensors-digest|{len(keys)}|".encode())
    with concurrent.futures.ThreadPoolExecutor(workers or HASH_WORKERS, thread_name_prefix="compresskit-hash") as pool:
        for digest in pool.map(one, keys):
            h.update(digest)
    return h.hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cached_sha256(path: Path) -> str:
    """sha256 of a large file, memoised in the cache keyed by path, size and mtime."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    memo = cache_dir() / "sha256" / f"{key}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    digest = sha256_file(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(memo, lambda p: p.write_text(digest))
    except OSError as exc:
        log.warning("could not memoise a checksum in %s (%s); continuing", memo, exc)
    return digest
