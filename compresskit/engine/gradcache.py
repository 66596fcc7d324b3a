"""Gradient statistics on disk: the exact fingerprint, the safetensors cache, reference import.

Cache files live in ``<cache_dir>/gradients/<norm>-<fingerprint>.safetensors`` (default cache
dir: ``$COMPRESSKIT_CACHE`` or ``~/.cache/compresskit``) and hold a statistic's additive parts.
The fingerprint is a sha256 over everything that changes the numbers: every tensor of the
model's state dict (names, shapes, dtypes, bytes), the model source string, the calibration
batches' bytes, the statistic (norm, per-sample scale, accumulator precision), the adapter
(whose ``loss`` defines the objective) and its options, the compute device type and the
torch/transformers versions (different kernels round differently), and the engine version.
The file's metadata also carries a sha256 of its tensors: a file whose bytes changed (but not
its keys or shapes) is detected and recomputed. Writes go to a temporary file that is renamed
into place, so a crash never leaves a truncated cache entry; the temporaries a killed run left
(as large as the cache file) are removed by the next pass that writes there (:func:`sweep`).

In a single process the finished statistics rest on disk: a run reads each layer's sum from the
cache file when the runner reaches that layer (:class:`SumFile`), and a pass in several groups
writes each finished group to a file of its own (:class:`Spill`) that the cache file is then
assembled from one tensor at a time. Host memory holds one layer's statistic, not the model's
(at 7B, float32 sums are about twice the bfloat16 weights).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import torch

from compresskit.cache import cache_dir, hash_into, hold, stale_in, tensors_digest
from compresskit.engine.device import as_device, to_rest
import compresskit.engine.stream.tensorfile as tensorfile
from compresskit.errors import CompressKitError, GradientError
from compresskit.interfaces import Loaded, ModelAdapter
from compresskit.options import as_dict
from compresskit.stats import REFERENCE_SCALE, GradNorm

log = logging.getLogger(__name__)

ENGINE_VERSION = "3"  # 2: files hold additive parts (l2: the sum of squares) with a content checksum;
# 3: the model hash and the content checksum are digests of per-tensor digests (hashed in parallel)


def cache_path(root: str | os.PathLike | None, fingerprint: str, norm: str) -> Path:
    """Where the statistic with this fingerprint is (or will be) cached."""
    base = Path(root) if root else cache_dir()
    return base / "gradients" / f"{norm}-{fingerprint[:40]}.safetensors"


def fingerprint(adapter: ModelAdapter, loaded: Loaded, batches: Sequence[dict[str, torch.Tensor]], stat: GradNorm,
                device: torch.device) -> str:
    """sha256 identifying one gradient statistic exactly (see the module docstring).

    Hashes the full state dict (tensor by tensor in ``HASH_WORKERS`` threads), not only the
    prunable weights: embeddings, norms and the head change the gradients too.
    """
    import importlib.metadata as md

    facts = {
        "engine": ENGINE_VERSION,
        "statistic": stat.key(),
        "source": loaded.source,
        "adapter": f"{type(adapter).__module__}.{type(adapter).__qualname__}",
        "adapter_options": repr(sorted(as_dict(adapter.options).items())),
        "device": as_device(device).type,
        "torch": torch.__version__,
        "transformers": _version(md, "transformers"),
    }
    h = hashlib.sha256(json.dumps(facts, sort_keys=True).encode())
    h.update(tensors_digest(loaded.model.state_dict()).encode())  # the bulk: hashed tensor by tensor, in parallel
    hash_into(h, "batches", list(batches))
    return h.hexdigest()


def _version(md: Any, dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def content_sha256(tensors: Mapping[str, torch.Tensor], visit: Any = None) -> str:
    """The content checksum of a cache file: :func:`~compresskit.cache.tensors_digest` of ``tensors``,
    reading a few tensors at a time (a lazy mapping such as :class:`SumFile` is never held whole);
    ``visit(key, tensor)`` sees each."""
    return tensors_digest(tensors, visit)


def save(path: Path, grads: Mapping[str, torch.Tensor], fp: str, meta: dict[str, str]) -> bool:
    """Write ``grads`` atomically with a content checksum, one tensor at a time (``grads`` may be lazy,
    its tensors on any device). Returns False (logged) if not writable."""
    from compresskit._version import __version__

    metadata = {**meta, "fingerprint": fp, "engine": ENGINE_VERSION, "compresskit": __version__,
                "torch": torch.__version__, "content_sha256": content_sha256(grads)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensorfile.write(path, _lazy(grads), metadata)
        log.info("cached gradients in %s", path)
        return True
    except OSError as exc:
        log.warning("could not write the gradient cache %s (%s); continuing without it. "
                    "Point $COMPRESSKIT_CACHE (or gradient option cache_dir) to a writable directory", path, exc)
        return False


def _lazy(grads: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Tensors of ``grads`` to write, each read from its source only when it is written."""
    if not isinstance(grads, SumFile):
        return dict(grads)
    return {k: tensorfile.Lazy(grads.dtype(k), grads.shape(k), lambda k=k: iter([grads[k]])) for k in grads}


def _problem(path: Path, expected: dict[str, tuple[int, ...]], fp: str) -> str | None:
    """Why the cache file at ``path`` cannot be used, reading one tensor at a time; None if it can."""
    try:
        f = tensorfile.TensorFile(path)
    except CompressKitError as exc:
        return f"could not read the gradient cache {path} ({exc}); recomputing"
    meta = f.metadata
    if meta.get("fingerprint") != fp or set(f.keys()) != set(expected):
        return f"gradient cache {path} does not match this run; recomputing"
    if any(f.entries[k].shape != shape for k, shape in expected.items()):
        return f"gradient cache {path} has wrong shapes; recomputing"
    bad: list[str] = []

    def check(key: str, v: torch.Tensor) -> None:
        if not torch.isfinite(v).all() or (v < 0).any():
            bad.append(key)

    try:
        digest = content_sha256(SumFile.at(path, f), check)
    except GradientError as exc:  # a damaged file must not stop the run: recompute instead
        return f"could not read the gradient cache {path} ({exc.__cause__}); recomputing"
    if meta.get("content_sha256") != digest:
        return f"gradient cache {path} was modified after it was written (checksum mismatch); recomputing"
    if bad:
        first = min(bad, key=list(expected).index)
        return f"gradient cache {path} holds non-finite or negative values (layer {first}); recomputing"
    return None


def load(path: Path, expected: dict[str, tuple[int, ...]], fp: str) -> dict[str, torch.Tensor] | None:
    """Cached parts at ``path`` if they exist and match ``fp``, the layer shapes and their checksum
    (at rest on the CPU: the runner moves each layer's to the compute device)."""
    sums = open_sums(path, expected, fp)
    return None if sums is None else to_rest({k: sums[k] for k in expected})


def open_sums(path: Path, expected: dict[str, tuple[int, ...]], fp: str) -> SumFile | None:
    """As :func:`load`, but the sums stay on disk: a :class:`SumFile` read one layer at a time."""
    if not path.exists():
        return None
    problem = _problem(path, expected, fp)
    if problem is not None:
        log.warning("%s", problem)
        return None
    return SumFile.at(path)


class SumFile(Mapping):
    """``sums[layer]``: one statistic's summed parts in safetensors files (the cache file, or a
    :class:`Spill`'s group files), read from disk on each access (nothing is kept; at rest on the CPU)."""

    def __init__(self, files: dict[str, tensorfile.TensorFile]) -> None:
        self.files = files

    @classmethod
    def at(cls, path: Path, file: tensorfile.TensorFile | None = None) -> SumFile:
        """Every tensor of the one file at ``path``."""
        file = file or tensorfile.TensorFile(path)
        return cls({k: file for k in file.entries})

    def __getitem__(self, key: str) -> torch.Tensor:
        f = self.files[key]
        try:
            return to_rest(f.read(key))
        except (OSError, CompressKitError) as exc:
            raise GradientError(f"the gradient cache {f.path} could not be read during the run ({exc}); was it "
                                "removed or overwritten? Rerun; the statistics are computed again if the file is "
                                "gone") from exc

    def __contains__(self, key: object) -> bool:
        return key in self.files

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def dtype(self, key: str) -> torch.dtype:
        return tensorfile.torch_dtype(self.files[key].entries[key].dtype)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.files[key].entries[key].shape


class Spill:
    """Finished groups of a gradient pass on disk (beside the cache, in a temporary directory
    removed by :meth:`close`): ``reader(stat_key)`` reads one statistic's sums across the groups."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=".tmp-groups-", dir=root))
        self.lock = hold(self.dir)  # live to :func:`sweep` in another process
        self.files: dict[str, dict[str, tensorfile.TensorFile]] = {}
        self.written = 0

    def add(self, stat_key: str, sums: Mapping[str, torch.Tensor]) -> None:
        """Write one group's sums of one statistic (tensors on any device, copied one at a time)."""
        path = self.dir / f"{self.written:05d}.safetensors"
        self.written += 1
        tensorfile.write(path, dict(sums))
        f = tensorfile.TensorFile(path)
        self.files.setdefault(stat_key, {}).update({k: f for k in sums})

    def reader(self, stat_key: str) -> SumFile:
        return SumFile(self.files.get(stat_key, {}))

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


def has_room(root: Path, nbytes: int) -> bool:
    """Whether the file system of ``root`` has ``nbytes`` free for a cache file; False (with a warning)
    when it has not, so that the statistics are not written in vain. True when it cannot tell."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
    except OSError:
        return True  # the write itself reports what is wrong
    if free >= nbytes:
        return True
    log.warning("the gradient cache %s has %.2f GB free, less than the %.2f GB of gradient statistics: they are "
                "not cached and rest in memory. Free space there, or point $COMPRESSKIT_CACHE (or gradient option "
                "cache_dir) to a disk with room", root, free / 1e9, nbytes / 1e9)
    return False


def sweep(root: Path) -> int:
    """Remove the temporaries a killed run left in the gradient cache directory ``root`` (a cache
    file being written, a pass's finished groups: each as large as a cache file) that no live run
    holds (:func:`compresskit.cache.stale_in`). Returns the bytes freed."""
    freed, removed = 0, 0
    for p in stale_in(root):
        try:
            if p.is_dir() and not p.is_symlink():
                size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
                shutil.rmtree(p)
            else:
                size = p.lstat().st_size
                p.unlink()
        except OSError as exc:
            log.warning("could not remove %s, left by an interrupted gradient pass (%s)", p, exc)
            continue
        freed, removed = freed + size, removed + 1
    if removed:
        log.info("removed %d temporar%s (%.2f GB) an interrupted gradient pass left in %s",
                 removed, "y" if removed == 1 else "ies", freed / 1e9, root)
    return freed


def import_reference(
    path: str | os.PathLike, expected: dict[str, tuple[int, ...]], norm: str
) -> dict[str, torch.Tensor]:
    """Load a GBLM reference gradient file and check it against the model's prunable layers.

    The file is a torch-saved dict ``"<sublayer>_layer_<i>" -> fp16 [out, in]`` tensor, as
    written by the reference ``gradient_computation.py`` (values already include scale 100).
    It is loaded with ``weights_only=True`` and returned as float32, values unchanged.

    Raises:
        GradientError: unreadable file, missing or extra keys, or a shape mismatch; the message
            names the first offending key and how to fix it.
    """
    p = Path(path)
    if not p.is_file():
        raise GradientError(f"gradient file {p} not found; pass the path of a reference file "
                            "(gradients_aggregrate_norm_l1_model_<name>.pth) or drop --gradients to compute gradients")
    try:
        obj = torch.load(p, weights_only=True, map_location="cpu")
    except Exception as exc:
        reason = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)[:200]
        if "weights only load failed" in reason.lower():  # torch's hint to drop weights_only does not apply
            reason = "not a torch.save file of plain tensors; only those are read, with weights_only=True"
        raise GradientError(f"could not read {p} as a torch-saved dict of tensors ({reason}); "
                            "give a file written by the reference gradient_computation.py") from exc
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise GradientError(f"{p} holds a {type(obj).__name__}, not a dict of tensors keyed '<sublayer>_layer_<i>'; "
                            "give a file written by the reference gradient_computation.py")
    missing = [k for k in expected if k not in obj]
    extra = sorted(k for k in obj if k not in expected)
    if missing:
        raise GradientError(f"gradient file {p} has no entry for {missing[0]!r} ({len(missing)} of {len(expected)} "
                            f"layers missing); keys must be '<sublayer>_layer_<i>' for every prunable layer of this "
                            "model: compute the file for this exact model, or drop --gradients")
    if extra:
        raise GradientError(f"gradient file {p} has unexpected key {extra[0]!r} ({len(extra)} extra); it was made "
                            "for a different model (more layers or other module names): use the matching file, "
                            "or drop --gradients")
    for key, shape in expected.items():
        if tuple(obj[key].shape) != shape:
            raise GradientError(f"gradient file {p}: {key!r} has shape {tuple(obj[key].shape)}, the model's layer "
                                f"has {shape}; the file belongs to another model size: use the matching file")
    hint = re.search(r"norm_(l[12])", p.name)
    if hint and hint.group(1) != norm:
        log.warning("gradient file %s looks like an %s file but the metric uses %s (-o metric.grad_norm)",
                    p, hint.group(1), norm)
    grads = to_rest({k: obj[k].float() for k in expected})
    bad = [k for k, v in grads.items() if not torch.isfinite(v).all()]
    if bad:
        raise GradientError(f"gradient file {p} holds NaN/inf values in {len(bad)} layers (first: {bad[0]!r}; an "
                            "fp16 overflow in the reference's accumulation?); recompute it, or drop --gradients "
                            "to let compresskit compute float32 statistics")
    neg = [k for k, v in grads.items() if (v < 0).any()]
    if neg:
        raise GradientError(f"gradient file {p} holds negative values (first in {neg[0]!r}), impossible for an "
                            "aggregated gradient norm: it is not a gradients_aggregrate_norm file; use the right file "
                            "or drop --gradients")
    log.info("imported reference gradients from %s (%d layers, scale %g included)", p, len(grads), REFERENCE_SCALE)
    return grads
