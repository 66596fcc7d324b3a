"""Deployable output: write a compresskit output directory as dense safetensors or in the
``compressed-tensors`` sparse formats, atomically, and verified bit for bit.

* ``sparse-bitmask`` stores any mask: the kept values of each row plus a 1-bit-per-weight mask.
  Unstructured outputs and N:M outputs other than 2:4 (e.g. 4:8) use it.
* ``sparse-24-bitmask`` stores exactly 2 values in every aligned group of 4 plus the bitmask; only
  2:4 outputs use it (it cannot represent 4:8 or other N:M patterns).

Every export is read back with the library's decompression before it is published, and must
reproduce the dense weights bit for bit (a negative zero in a pruned layer is stored as +0.0).

    from compresskit_plugins.adapters.llama.export import export
    export("out/", "out-ct/", format="compressed-tensors")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

from . import ct_backend
from compresskit.device import to_host
from compresskit.errors import CompressKitError, OutputExistsError
from compresskit.cache import atomic_directory
from compresskit.output import MANIFEST, read_manifest, write_manifest

FORMATS = ("dense", "compressed-tensors")
DTYPES = ("float32", "bfloat16", "float16")
INDEX = "model.safetensors.index.json"


class ExportError(CompressKitError, ValueError):
    """A directory cannot be exported (not a compresskit output, unsupported model, bad target)."""


@dataclasses.dataclass(frozen=True)
class SparsityFormat:
    """The compressed-tensors format chosen for an output, and why."""

    format: str  # sparse-bitmask | sparse-24-bitmask
    structure: str  # compressed-tensors convention: "unstructured", or "KEPT:M" such as "2:4"
    reason: str


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote."""

    path: Path
    format: str
    sparsity_format: str | None
    structure: str | None
    layers: int
    dtype: str
    source_bytes: int  # safetensors bytes of the source directory
    output_bytes: int  # safetensors bytes written


def choose_format(manifest: dict[str, Any]) -> SparsityFormat:
    """Pick the sparse format from a manifest's pattern (``config.pattern``, resolved options).

    compresskit's ``nm`` pattern counts *pruned* weights (``n`` of every ``m``); compressed-tensors
    names structures by *kept* weights, so compresskit ``1:4`` is structure ``3:4``.
    """
    cfg, resolved = manifest.get("config", {}), manifest.get("resolved", {})
    structure = resolved.get("structure")  # written since 0.2: {"group", "n", "m"} of the pattern actually used
    if structure is not None:
        nm = (structure["n"], structure["m"]) if structure.get("group") == "nm" else None
    else:  # a 0.1 manifest: the pattern name and its options
        opts = {**cfg.get("pattern_options", {}), **resolved.get("pattern_options", {})}
        nm = (int(opts.get("n", 2)), int(opts.get("m", 4))) if cfg.get("pattern") == "nm" else None
    if nm is None:
        group = structure.get("group") if structure else cfg.get("pattern")
        how = "unstructured" if group in ("unstructured", "row", "layer", "adaptive") else f"pattern {group!r}"
        return SparsityFormat(ct_backend.BITMASK, "unstructured", f"{how}: the bitmask format stores any mask")
    n, m = nm
    structure = f"{m - n}:{m}"
    if (n, m) == (2, 4):
        return SparsityFormat(ct_backend.BITMASK_24, "2:4", "2:4: the 2:4 format (2 values per group of 4)")
    return SparsityFormat(ct_backend.BITMASK, structure,
                          f"{n}:{m} (n pruned of m): the 2:4 format holds only 2:4, so the bitmask format")


# ---- reading an output directory -------------------------------------------------------------

def shard_files(directory: Path) -> list[Path]:
    """The safetensors files of a directory (from its index when sharded)."""
    index = directory / INDEX
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    return sorted(directory.glob("*.safetensors"))


def _read_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _source(directory: str | os.PathLike) -> tuple[Path, dict[str, Any], dict[str, Any] | None]:
    """Check ``directory`` is a transformers-format compresskit output: (path, manifest, sparsity_config)."""
    src = Path(directory)
    if not src.is_dir():
        raise ExportError(f"{src} is not a directory; export takes an output directory of `compresskit prune --output`")
    manifest = read_manifest(src)
    if manifest is None:
        raise ExportError(f"{src} is not a compresskit output (no {MANIFEST}); export only converts directories "
                          f"written by `compresskit prune --output DIR`: prune the model first")
    if (src / "vit.json").exists() or not (src / "config.json").exists():
        raise ExportError(f"{src} holds a timm ViT (model.safetensors + vit.json), which vLLM and transformers do not "
                          f"load, so it has no compressed-tensors export; keep the dense output")
    if not shard_files(src):
        raise ExportError(f"{src} has no safetensors weights; re-save it with `compresskit prune --output`")
    qc = json.loads((src / "config.json").read_text()).get("quantization_config")
    sc = ct_backend.read_config(src)
    if qc and sc is None:
        raise ExportError(f"{src}/config.json already has a quantization_config ({qc.get('quant_method')!r}); "
                          f"compresskit exports only its own unquantized outputs")
    return src, manifest, sc


def _check_output(src: Path, out: Path, overwrite: bool) -> None:
    """Refuse the source itself, a non-empty directory without ``overwrite``, and anything not ours."""
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ExportError(f"--output {out} is (inside) the source {src}; choose a separate directory")
    check_output(out, overwrite)


def check_output(out: str | os.PathLike, overwrite: bool) -> None:
    """An existing non-empty ``out`` is replaced only with ``overwrite`` and only if it is a compresskit output."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise OutputExistsError(f"output {out} exists and is not empty; choose another --output or pass --overwrite")
        if not (out / MANIFEST).exists():
            raise ExportError(f"refusing to replace {out}: it is not a compresskit output (no {MANIFEST}); "
                              f"choose another --output")


def _targets(manifest: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """Module names of the pruned layers: the key ``*.{block}.{layer}.weight`` of each report row."""
    found: set[str] = set()
    for row in manifest.get("report", {}).get("layers", []):
        tail = f".{row['block']}.{row['name']}.weight"
        keys = [k for k in shapes if k.endswith(tail)]
        if len(keys) != 1 or list(shapes[keys[0]]) != list(row["shape"]):
            raise ExportError(f"the report's layer {row['block']}.{row['name']} {row['shape']} does not match one "
                              f"saved weight (found {keys}); the directory was changed after pruning")
        found.add(keys[0][: -len(".weight")])
    if not found:
        raise ExportError(f"{MANIFEST} lists no pruned layers; nothing to export")
    return found


# ---- tensor checks (small pure functions) ----------------------------------------------------

def digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(to_host(t.detach()).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(digests: dict[str, str]) -> str:
    """One sha256 over every tensor's :func:`digest`, by name."""
    return hashlib.sha256("".join(f"{k}:{digests[k]}\n" for k in sorted(digests)).encode()).hexdigest()


def positive_zeros(w: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``w`` with -0.0 replaced by +0.0 (the sparse formats store zeros by position only), and the count."""
    neg = (w == 0) & torch.signbit(w)
    n = int(neg.sum())
    return (w.masked_fill(neg, 0.0) if n else w), n


def check_24(name: str, w: torch.Tensor) -> None:
    """At most 2 non-zeros in every aligned group of 4 along the input dimension."""
    if w.dim() != 2 or w.shape[1] % 4:
        raise ExportError(f"layer {name} {tuple(w.shape)}: the 2:4 format needs 2-D weights with in_features % 4 == 0")
    worst = int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max())
    if worst > 2:
        raise ExportError(f"layer {name} has {worst} non-zeros in a group of 4, so it is not 2:4 sparse; the output "
                          f"was changed after pruning (re-prune with --pattern 2:4)")


def _cast(tensors: dict[str, torch.Tensor], dtype: str | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return tensors
    to = getattr(torch, dtype)
    out = {k: (v.to(to) if v.is_floating_point() else v) for k, v in tensors.items()}
    for k, v in out.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ExportError(f"{k} has non-finite values in {dtype} (out of range); export in float32 or bfloat16")
    return out


def _nbytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


# ---- writing ---------------------------------------------------------------------------------

def _copy_side_files(src: Path, dst: Path) -> None:
    """Everything but the weights, their index and the manifest (config, tokenizer, ...)."""
    weights = {p.name for p in shard_files(src)} | {INDEX, MANIFEST}
    for p in src.iterdir():
        if p.name in weights or p.name.startswith("."):
            continue
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, dst / p.name)


def _write_shard(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})


def _write_index(src: Path, dst: Path, keys_by_file: dict[str, list[str]]) -> None:
    if not (src / INDEX).exists():
        return
    index = json.loads((src / INDEX).read_text())
    index["weight_map"] = {k: name for name, keys in keys_by_file.items() for k in sorted(keys)}
    index.setdefault("metadata", {})["total_size"] = _nbytes([dst / n for n in keys_by_file])
    (dst / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _set_config(dst: Path, dtype: str | None, drop_quantization: bool) -> None:
    f = dst / "config.json"
    cfg = json.loads(f.read_text())
    for key in ("dtype", "torch_dtype"):
        if dtype is not None and key in cfg:
            cfg[key] = dtype
    if drop_quantization:
        cfg.pop("quantization_config", None)
    f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _dtype_of(files: list[Path]) -> str:
    from safetensors import safe_open

    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
    with safe_open(str(files[0]), framework="pt") as f:
        found = (f.get_slice(k).get_dtype() for k in f.keys())
        return next((names[d] for d in found if d in names), "float32")


def export(source: str | os.PathLike, output: str | os.PathLike | None = None, format: str = "compressed-tensors",
           overwrite: bool = False, dtype: str | None = None, progress: bool = True) -> ExportResult:
    """Write the compresskit output ``source`` to ``output`` in ``format``.

    Args:
        source: a directory written by ``compresskit prune --output`` (dense, or an earlier export).
        output: the new directory [default: ``SOURCE-compressed-tensors`` / ``SOURCE-dense``].
        format: ``compressed-tensors`` (bitmask or 2:4 format, from the manifest's pattern) or
            ``dense`` (plain safetensors; decompresses an earlier compressed-tensors export).
        overwrite: replace an existing ``output``, which must itself be a compresskit output.
        dtype: cast floating tensors to ``float32``, ``bfloat16`` or ``float16`` [default: keep].
        progress: show progress bars.

    Raises:
        ExportError: ``source`` is not a compresskit output, is a ViT, or its weights no longer
            match its manifest; or the written export does not decompress to the same weights.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    src, manifest, src_sparsity = _source(source)
    out = Path(output) if output is not None else src.with_name(f"{src.name}-{format}")
    _check_output(src, out, overwrite)
    if format == "compressed-tensors" and src_sparsity is not None:
        raise ExportError(f"{src} is already in compressed-tensors format ({src_sparsity['format']})")
    if format == "compressed-tensors" or src_sparsity is not None:
        version = ct_backend.require()
    files = shard_files(src)
    with atomic_directory(out, replace=True) as tmp:
        _copy_side_files(src, tmp)
        if format == "compressed-tensors":
            info = _write_compressed(src, tmp, manifest, files, dtype, progress, version)
        else:
            info = _write_dense(src, tmp, manifest, files, dtype, src_sparsity)
        _set_config(tmp, dtype, drop_quantization=format == "dense")
        if format == "compressed-tensors":
            ct_backend.write_config(tmp, info.pop("config"))
            _verify(tmp, info["weights_sha256"], "the written export")
        out_files = shard_files(tmp)
        info.update(format=format, dtype=dtype or _dtype_of(out_files),
                    source_bytes=_nbytes(files), output_bytes=_nbytes(out_files))
        write_manifest(tmp, {**manifest, "export": info})
    return ExportResult(out, format, info.get("sparsity_format"), info.get("sparsity_structure"), info.get("layers", 0),
                        info["dtype"], info["source_bytes"], info["output_bytes"])


def _write_compressed(src: Path, dst: Path, manifest: dict[str, Any], files: list[Path], dtype: str | None,
                      progress: bool, version: str) -> dict[str, Any]:
    choice = choose_format(manifest)
    targets = _targets(manifest, _shapes(files))
    config = ct_backend.sparsity_config(choice.format, targets, 0.0, choice.structure)
    digests: dict[str, str] = {}
    keys_by_file: dict[str, list[str]] = {}
    zeros = total = neg = 0
    for path in files:
        tensors, metadata = _read_shard(path)
        tensors = _cast(tensors, dtype)
        here = {k[: -len(".weight")] for k in tensors if k.endswith(".weight") and k[: -len(".weight")] in targets}
        for name in sorted(here):
            w, n = positive_zeros(tensors[f"{name}.weight"])
            if choice.format == ct_backend.BITMASK_24:
                check_24(name, w)
            tensors[f"{name}.weight"], neg = w, neg + n
            zeros, total = zeros + int((w == 0).sum()), total + w.numel()
        digests.update({k: digest(v) for k, v in tensors.items()})
        packed = ct_backend.compress(tensors, config, here, progress)
        _write_shard(packed, metadata, dst / path.name)
        keys_by_file[path.name] = list(packed)
    _write_index(src, dst, keys_by_file)
    return {
        "config": ct_backend.sparsity_config(choice.format, targets, zeros / total, choice.structure),
        "sparsity_format": choice.format, "sparsity_structure": choice.structure, "reason": choice.reason,
        "layers": len(targets), "global_sparsity": zeros / total, "negative_zeros_stored_as_positive": neg,
        "compressed_tensors_version": version, "weights_sha256": fingerprint(digests),
    }


def _shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    out: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return out


def _write_dense(src: Path, dst: Path, manifest: dict[str, Any], files: list[Path], dtype: str | None,
                 src_sparsity: dict[str, Any] | None) -> dict[str, Any]:
    digests: dict[str, str] = {}
    keys_by_file: dict[str, list[str]] = {}
    compressor = ct_backend.decompressor(src) if src_sparsity is not None else None
    written: dict[str, str] = {}
    for path, tensors, metadata in _iter_dense(files, compressor):
        digests.update({k: digest(v) for k, v in tensors.items()})
        tensors = _cast(tensors, dtype)
        written.update({k: digest(v) for k, v in tensors.items()} if dtype is not None else {})
        _write_shard(tensors, metadata, dst / path.name)
        keys_by_file[path.name] = list(tensors)
    recorded = manifest.get("export", {}).get("weights_sha256")
    if compressor is not None and recorded is not None and fingerprint(digests) != recorded:
        raise ExportError(f"{src}: the decompressed weights differ from the ones it was exported from "
                          f"(sha256 {fingerprint(digests)[:12]} != {recorded[:12]}); the files were changed")
    _write_index(src, dst, keys_by_file)
    return {"decompressed_from": src_sparsity["format"] if src_sparsity else None,
            "weights_sha256": fingerprint(written or digests)}


def _iter_dense(files: list[Path], compressor: Any) -> Iterator[tuple[Path, dict[str, torch.Tensor], dict[str, str]]]:
    for path in files:
        tensors, metadata = _read_shard(path)
        yield path, (ct_backend.decompress(compressor, tensors) if compressor is not None else tensors), metadata


def _verify(directory: Path, expected: str, what: str) -> None:
    """Decompress ``directory`` with the library and compare with the recorded dense fingerprint."""
    compressor = ct_backend.decompressor(directory)
    digests: dict[str, str] = {}
    for _, tensors, _ in _iter_dense(shard_files(directory), compressor):
        digests.update({k: digest(v) for k, v in tensors.items()})
    if fingerprint(digests) != expected:
        raise ExportError(f"{what} does not decompress to the dense weights (a compressed-tensors bug or a "
                          f"non-conforming layer); nothing was written")


def load_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a compresskit output as dense weights (decompressing a compressed-tensors export)."""
    src, _, sparsity = _source(directory)
    compressor = ct_backend.decompressor(src) if sparsity is not None else None
    out: dict[str, torch.Tensor] = {}
    for _, tensors, _ in _iter_dense(shard_files(src), compressor):
        out.update(tensors)
    return out
