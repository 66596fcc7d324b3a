"""The calls into the ``compressed-tensors`` library: sparse compression of safetensors shards,
its ``config.json`` entry, and decompression.

Kept in one module because the library's sparse API changed across releases: 0.15 removed the
sparse compressors (``sparse-bitmask``, ``sparse-24-bitmask``) and 0.14 requires transformers < 5,
so the ``export`` extra pins ``compressed-tensors>=0.13,<0.14``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch

from compresskit.errors import CompressKitError, MissingDependencyError

BITMASK = "sparse-bitmask"
BITMASK_24 = "sparse-24-bitmask"
SPARSE_FORMATS = (BITMASK, BITMASK_24)
INSTALL = "pip install 'compresskit[export]' (compressed-tensors>=0.13,<0.14)"


def require() -> str:
    """Import the library's sparse compressors, or fail with the install command; returns its version."""
    try:
        import compressed_tensors
    except ImportError as exc:
        raise MissingDependencyError(f"--format compressed-tensors needs the compressed-tensors library ({exc}); "
                                     f"install it with: {INSTALL}") from exc
    try:
        from compressed_tensors.compressors import BitmaskCompressor, Sparse24BitMaskCompressor  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            f"compressed-tensors {compressed_tensors.__version__} has no sparse compressors (removed in 0.15); "
            f"install a release that has them: {INSTALL}") from exc
    return str(compressed_tensors.__version__)


def sparsity_config(fmt: str, targets: Iterable[str], global_sparsity: float, structure: str) -> Any:
    """The library's config object for ``fmt`` (``sparse-bitmask`` or ``sparse-24-bitmask``)."""
    require()
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig

    cls = {BITMASK: BitmaskConfig, BITMASK_24: Sparse24BitMaskConfig}[fmt]
    return cls(targets=sorted(targets), ignore=[], global_sparsity=global_sparsity, sparsity_structure=structure)


def compress(tensors: dict[str, torch.Tensor], config: Any, targets: set[str], progress: bool = False) -> dict[str, torch.Tensor]:
    """Replace ``<target>.weight`` in one shard's tensors by the format's compressed parameters."""
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.load_from_registry(config.format, config=config)
    return compressor.compress(tensors, compression_targets=targets, show_progress=progress)


def write_config(directory: Path, config: Any) -> None:
    """Add ``quantization_config`` (``quant_method: compressed-tensors`` with the ``sparsity_config``)
    to ``directory/config.json``, exactly as the library writes it for llm-compressor's saves."""
    from compressed_tensors import ModelCompressor

    ModelCompressor(sparsity_config=config).update_config(str(directory))


def read_config(directory: Path) -> dict[str, Any] | None:
    """The ``sparsity_config`` of ``directory/config.json``, or None if the model is not sparse-compressed.

    The format string is checked against the two known formats before the library sees it (the
    library's registry would otherwise try to import an arbitrary name).
    """
    f = Path(directory) / "config.json"
    if not f.exists():
        return None
    qc = json.loads(f.read_text()).get("quantization_config") or {}
    sc = qc.get("sparsity_config") or None
    if sc is None:
        return None
    if qc.get("quant_method") != "compressed-tensors" or sc.get("format") not in SPARSE_FORMATS:
        raise CompressKitError(f"{f}: quantization_config {qc.get('quant_method')!r} with sparsity format "
                               f"{sc.get('format')!r} is not one compresskit reads ({', '.join(SPARSE_FORMATS)})")
    return sc


def decompressor(directory: Path) -> Any:
    """The library's sparsity compressor configured from ``directory/config.json``."""
    require()
    from compressed_tensors import ModelCompressor

    sc = read_config(directory)
    if sc is None:
        raise CompressKitError(f"{directory}/config.json has no compressed-tensors sparsity_config")
    return ModelCompressor.from_compression_config({"quant_method": "compressed-tensors", "sparsity_config": sc}).sparsity_compressor


def decompress(compressor: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense tensors of one shard: compressed layers become ``<layer>.weight``, the rest pass through."""
    return dict(compressor.decompress_from_state_dict(tensors))
