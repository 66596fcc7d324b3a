"""Image data for ViT calibration and evaluation, the fixed linear-probe head, and accuracy.

Image sources (``data`` strings):

- ``random``: seeded uniform-noise RGB images, no labels (tests, smoke runs).
- ``fashion-mnist``: Debian ``dataset-fashion-mnist`` (60k train / 10k test, 28x28 grayscale,
  10 classes, MIT), unpacked into the cache by :func:`compresskit.assets.ensure_debian_package`
  (``apt-get download`` + ``dpkg-deb -x``; nothing is installed).
- ``tuxpaint``: Debian ``tuxpaint-stamps-default`` (GPL-2): 369 photos and clip-art stamps in 5
  coarse classes (animals, food, plants, town, vehicles) from their folder names; a fixed split
  (every 5th image of each class, sorted by path, is test: 71 test / 298 train).
- a directory: an ImageFolder (one sub-folder per class; a flat folder has no labels). If it has
  ``train/`` and ``val/`` (or ``test/``) sub-folders those are the splits, else both splits are
  the same folder.

Every image goes through the model's own timm eval transform (resize, center crop,
normalisation), with the input size taken from the model itself; grayscale becomes 3 channels.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from compresskit.errors import CompressKitError, MissingDependencyError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FASHION_DEB = "dataset-fashion-mnist"
TUXPAINT_DEB = "tuxpaint-stamps-default"
TUXPAINT_CLASSES = ["animals", "food", "plants", "town", "vehicles"]
FASHION_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


@dataclasses.dataclass
class ImageSet:
    """One split of an image source: a lazy image getter, labels and class names.

    Attributes:
        name: the source string it came from (``fashion-mnist``, a path, ``random``).
        split: ``train`` or ``test``.
        size: number of images.
        get: ``get(i)`` returns image ``i`` as an RGB ``PIL.Image``.
        labels: int64 ``[size]`` or None when the source has no labels.
        classes: class names (index = label) or None.
    """

    name: str
    split: str
    size: int
    get: Callable[[int], Any]
    labels: torch.Tensor | None
    classes: list[str] | None


def open_images(data: str, split: str) -> ImageSet:
    """Open one split (``train``/``test``) of an image source.

    Raises:
        CompressKitError: an unknown source, with the valid choices.
    """
    if data == "random":
        return _random_set(split)
    if data in ("fashion-mnist", "fashion_mnist"):
        return _fashion_mnist(split)
    if data == "tuxpaint":
        return _tuxpaint(split)
    path = Path(data)
    if path.is_dir():
        return _image_folder(path, split)
    raise CompressKitError(f"unknown image source {data!r}; use 'fashion-mnist', 'tuxpaint', 'random' or an ImageFolder directory")


def _random_set(split: str, size: int = 4096, px: int = 32) -> ImageSet:
    from PIL import Image

    base = 0 if split == "train" else 1_000_000

    def get(i: int):
        g = np.random.default_rng(base + i)
        return Image.fromarray(g.integers(0, 256, (px, px, 3), dtype=np.uint8))

    return ImageSet("random", split, size, get, None, None)


def _image_folder(root: Path, split: str) -> ImageSet:
    from PIL import Image

    names = {"train": ("train",), "test": ("val", "test")}[split]
    sub = next((root / n for n in names if (root / n).is_dir()), root)
    classes = sorted(d.name for d in sub.iterdir() if d.is_dir())
    files: list[tuple[Path, int]] = []
    if classes:
        for label, c in enumerate(classes):
            files += [(f, label) for f in sorted((sub / c).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [(f, -1) for f in sorted(sub.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise CompressKitError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {sub}; point --calibration/--eval-data at an ImageFolder")
    labels = torch.tensor([lab for _, lab in files]) if classes else None
    return ImageSet(str(root), split, len(files), lambda i: Image.open(files[i][0]).convert("RGB"), labels, classes or None)


def _fashion_mnist(split: str) -> ImageSet:
    from PIL import Image

    pixels, labels = _fashion_arrays(split)
    return ImageSet("fashion-mnist", split, len(labels), lambda i: Image.fromarray(pixels[i]).convert("RGB"), labels, list(FASHION_CLASSES))


@functools.lru_cache(maxsize=2)
def _fashion_arrays(split: str) -> tuple[np.ndarray, torch.Tensor]:
    """Decoded ``(pixels [N,28,28] uint8, labels [N])``, kept per process (decoding takes seconds)."""
    root = _debian(FASHION_DEB) / "usr/share/datasets/fashion-mnist"
    stem = "train" if split == "train" else "t10k"
    with gzip.open(root / f"{stem}-images-idx3-ubyte.gz") as f:
        pixels = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(root / f"{stem}-labels-idx1-ubyte.gz") as f:
        labels = torch.from_numpy(np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64))
    return pixels, labels


def _debian(package: str) -> Path:
    from compresskit.data import ensure_debian_package

    try:
        return ensure_debian_package(package)
    except MissingDependencyError as exc:
        raise MissingDependencyError(
            f"this image source comes from Debian '{package}' ({exc}). Fix: make `apt-get download {package}` "
            "work (a reachable Debian mirror), or pass an ImageFolder directory as --calibration/--eval-data"
        ) from exc


def _tuxpaint(split: str) -> ImageSet:
    """Tux Paint stamps (photos and clip-art, GPL-2) in 5 coarse classes; every 5th image per class is test."""
    from PIL import Image

    root = _debian(TUXPAINT_DEB) / "usr/share/tuxpaint/stamps"
    files: list[tuple[Path, int]] = []
    for label, c in enumerate(TUXPAINT_CLASSES):
        pngs = sorted((root / c).rglob("*.png"))
        files += [(f, label) for k, f in enumerate(pngs) if (k % 5 == 4) == (split == "test")]

    def get(i: int):
        rgba = Image.open(files[i][0]).convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")  # transparent stamp background -> white

    return ImageSet("tuxpaint", split, len(files), get, torch.tensor([lab for _, lab in files]), list(TUXPAINT_CLASSES))


def eval_transform(model: nn.Module) -> Callable[[Any], torch.Tensor]:
    """The model's own timm eval transform, at the input size the model was built for."""
    try:
        from timm.data import create_transform, resolve_model_data_config
    except ImportError as exc:
        raise MissingDependencyError(f"image transforms need timm ({exc}); pip install 'compresskit[vit]'") from exc
    cfg = resolve_model_data_config(model)
    h, w = model.patch_embed.img_size  # pretrained_cfg may describe another resolution (dinov2: 518)
    cfg["input_size"] = (3, h, w)
    return create_transform(**cfg, is_training=False)


def sample_indices(size: int, n: int, seed: int) -> list[int]:
    """``n`` distinct indices (fewer if the split is smaller), a seeded permutation prefix."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=g)[:n].tolist()


def stack(images: ImageSet, indices: list[int], transform: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    """``[len(indices), 3, H, W]`` float32 through ``transform``."""
    return torch.stack([transform(images.get(i)) for i in indices])


def labels_usable(info: dict[str, Any], images: ImageSet, num_classes: int) -> bool:
    """Whether ``images``' labels index the model's head classes (same data / same class count)."""
    if images.labels is None:
        return False
    if info.get("head_data"):
        return info["head_data"] == images.name
    return images.classes is not None and len(images.classes) == num_classes
