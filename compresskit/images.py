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
import hashlib
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


def cache_root() -> Path:
    from compresskit.vit_sources import cache_root as root

    return root()


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
    from compresskit.assets import ensure_debian_package

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


def fingerprint(x: torch.Tensor, *extra: Any) -> str:
    """sha256 (16 hex digits) of a tensor's bytes plus any extra identifiers."""
    h = hashlib.sha256(repr(extra).encode())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def forward_all(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, features)`` for every image: features are the pre-logits (pooled) vectors."""
    from tqdm.auto import tqdm

    logits, feats = [], []
    device = next(model.parameters()).device
    chunks = x.split(batch_size)
    for chunk in tqdm(chunks, desc="images", unit="batch", leave=False, disable=len(chunks) < 4):
        f = model.forward_head(model.forward_features(chunk.to(device)), pre_logits=True)
        feats.append(f.float().cpu())
        logits.append(model.get_classifier()(f).float().cpu() if model.num_classes else f.new_zeros(len(f), 0).cpu())
    return torch.cat(logits), torch.cat(feats)


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float = 1e-3, steps: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression ``softmax(W f + b)`` by full-batch L-BFGS (deterministic).

    Args:
        features: ``[N, D]`` float32 dense features.
        labels: ``[N]`` int64.
        weight_decay: L2 penalty on ``W`` (mean over samples scale).

    Returns:
        ``(weight [C, D], bias [C])`` for an ``nn.Linear(D, C)`` head.
    """
    f = features.double()
    mu, sd = f.mean(0), f.std(0).clamp_min(1e-6)
    z = (f - mu) / sd  # standardise for conditioning; folded back into W, b below
    w = torch.zeros(num_classes, f.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe", history_size=20)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z @ w.t() + b, labels) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_raw = (w / sd).detach()
    return w_raw.float(), (b - w_raw @ mu).detach().float()


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of images whose top-1 class equals the reference's."""
    return float((logits.argmax(-1) == reference.argmax(-1)).float().mean())


def feature_cosine(features: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity between matching feature vectors."""
    return float(nn.functional.cosine_similarity(features, reference, dim=-1).mean())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy."""
    return float((logits.argmax(-1) == labels).float().mean())


def attach_probe_head(model: nn.Module, info: dict[str, Any], data: str, samples: int, seed: int, batch_size: int = 64) -> None:
    """Give a headless backbone a fixed linear-probe head fitted on its dense features.

    ``samples`` labelled images of ``data``'s train split (seeded) go through the dense model;
    a logistic-regression head is fitted on their pre-logits features and installed with
    ``model.reset_classifier``. The head is cached per (weights, data, samples, seed), never
    pruned, and afterwards part of the model: it gives GBLM its logits and the evaluation its
    accuracy. ``info`` records it (``head``, ``head_data``, ``timm_kwargs.num_classes``).

    Raises:
        CompressKitError: ``data`` has no labels.
    """
    from safetensors.torch import load_file

    from compresskit.vit_sources import save_tensors_atomic, weights_fingerprint

    images = open_images(data, "train")
    if images.labels is None:
        raise CompressKitError(f"the linear-probe head needs labelled data, but {data!r} has none; set -o adapter.probe_data=fashion-mnist or an ImageFolder with class folders")
    key = f"{weights_fingerprint(model)}-{fingerprint(torch.zeros(0), images.name, images.size, samples, seed)}"
    path = cache_root() / "vit-probe" / f"{key}.safetensors"
    if path.exists():
        head = load_file(str(path))
    else:
        idx = sample_indices(images.size, samples, seed)
        _, feats = forward_all(model, stack(images, idx, eval_transform(model)), batch_size)
        w, b = fit_linear_probe(feats, images.labels[idx], len(images.classes))
        head = {"weight": w, "bias": b}
        save_tensors_atomic(head, path)
        log.info("fitted a %d-class linear probe on %d dense features of %s", len(w), len(idx), data)
    model.reset_classifier(head["weight"].shape[0])
    model.get_classifier().load_state_dict(head)
    info["timm_kwargs"]["num_classes"] = head["weight"].shape[0]
    info.update(head="linear probe on dense features (fixed)", head_data=images.name, head_classes=images.classes,
                head_samples=samples, head_seed=seed)


def labels_usable(info: dict[str, Any], images: ImageSet, num_classes: int) -> bool:
    """Whether ``images``' labels index the model's head classes (same data / same class count)."""
    if images.labels is None:
        return False
    if info.get("head_data"):
        return info["head_data"] == images.name
    return images.classes is not None and len(images.classes) == num_classes


def evaluate(model: nn.Module, info: dict[str, Any], data: str, limit: int | None, batch_size: int = 64,
             load_dense: Callable[[], nn.Module] | None = None) -> dict[str, Any]:
    """Top-1 accuracy on ``data``'s test split plus agreement and feature cosine vs the dense model.

    The dense model's logits/features on the same images are cached under
    ``<cache>/vit-eval/<dense weights fingerprint>-<images fingerprint>``: written whenever the
    evaluated model *is* the dense one, read otherwise (``load_dense`` rebuilds it when the
    cache is cold).
    """
    from safetensors.torch import load_file

    from compresskit.vit_sources import save_tensors_atomic, weights_fingerprint

    images = open_images(data, "test")
    idx = sample_indices(images.size, limit or images.size, 0)
    x = stack(images, idx, eval_transform(model))
    logits, feats = forward_all(model, x, batch_size)
    dense_fp = info.get("dense_fingerprint")
    path = cache_root() / "vit-eval" / f"{dense_fp}-{fingerprint(x)}.safetensors"
    ref = None
    if dense_fp and weights_fingerprint(model) == dense_fp:
        save_tensors_atomic({"logits": logits, "features": feats}, path)
        ref = {"logits": logits, "features": feats}  # the dense model is its own reference
    elif dense_fp and path.exists():
        ref = load_file(str(path))
    elif dense_fp and load_dense is not None:
        try:
            ref_logits, ref_feats = forward_all(load_dense(), x, batch_size)
            ref = {"logits": ref_logits, "features": ref_feats}
        except CompressKitError as exc:
            log.warning("no dense reference for agreement/cosine: %s", exc)
    use_labels = labels_usable(info, images, model.num_classes)
    out: dict[str, Any] = {
        "accuracy": accuracy(logits, images.labels[idx]) if use_labels and model.num_classes else None,
        "agreement": agreement(logits, ref["logits"]) if ref is not None and model.num_classes else None,
        "feature_cosine": feature_cosine(feats, ref["features"]) if ref is not None else None,
        "n": len(idx),
        "data": images.name,
        "split": "test",
        "protocol": (f"top-1 of the model's {'fixed linear-probe head' if info.get('head_data') else 'own head'} on "
                     f"{len(idx)} seeded {images.name} test images ({'labelled' if use_labels else 'no usable labels'}); "
                     "agreement/cosine of top-1 and pre-logits features vs the dense model"),
    }
    return out
