"""Accuracy of a timm ViT on labelled images, plus agreement and feature cosine against the dense model."""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from compresskit import distributed
from compresskit.cache import cache_dir, tensor_fingerprint
from compresskit.errors import CompressKitError

from .images import eval_transform, labels_usable, open_images, sample_indices, stack
from .probe import forward_all

log = logging.getLogger(__name__)


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of images whose top-1 class equals the reference's."""
    return float((logits.argmax(-1) == reference.argmax(-1)).float().mean())


def feature_cosine(features: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity between matching feature vectors."""
    return float(nn.functional.cosine_similarity(features, reference, dim=-1).mean())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy."""
    return float((logits.argmax(-1) == labels).float().mean())


def evaluate(model: nn.Module, info: dict[str, Any], data: str, limit: int | None, batch_size: int = 64,
             load_dense: Callable[[], nn.Module] | None = None) -> dict[str, Any]:
    """Top-1 accuracy on ``data``'s test split plus agreement and feature cosine vs the dense model.

    The dense model's logits/features on the same images are cached under
    ``<cache>/vit-eval/<dense weights fingerprint>-<images fingerprint>``: written whenever the
    evaluated model *is* the dense one, read otherwise (``load_dense`` rebuilds it when the
    cache is cold).
    """
    from .timm_models import save_tensors_atomic, weights_fingerprint

    with distributed.current().writer_first():  # under torchrun: rank 0 unpacks the images first
        images = open_images(data, "test")
    idx = sample_indices(images.size, limit or images.size, 0)
    x = stack(images, idx, eval_transform(model))
    logits, feats = _forward_sharded(model, x, batch_size)
    dense_fp = info.get("dense_fingerprint")
    path = cache_dir() / "vit-eval" / f"{dense_fp}-{tensor_fingerprint(x)[:16]}.safetensors"
    ref = None
    is_dense = bool(dense_fp) and weights_fingerprint(model) == dense_fp
    if is_dense:
        if distributed.current().is_writer:  # under torchrun: rank 0 alone writes caches
            save_tensors_atomic({"logits": logits, "features": feats}, path)
        ref = {"logits": logits, "features": feats}  # the dense model is its own reference
    elif dense_fp:  # rank 0's cached reference (sent to every rank under torchrun), else rebuilt below
        ref = distributed.current().from_writer(lambda: _cached_reference(path))
    if ref is None and dense_fp and load_dense is not None and not is_dense:
        try:
            from compresskit.device import model_device, on_device

            with on_device(load_dense(), model_device(model)) as dense:  # on the evaluated model's device
                ref_logits, ref_feats = _forward_sharded(dense, x, batch_size)
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


def _forward_sharded(model: nn.Module, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`forward_all`; under ``torchrun`` each rank runs its shard of the images and the rows
    are gathered in order (every rank runs them all when there are fewer images than ranks)."""
    ctx = distributed.current()
    if len(x) < ctx.world_size:
        return forward_all(model, x, batch_size)
    start, stop = ctx.shard_range(len(x))
    logits, feats = forward_all(model, x[start:stop], batch_size)
    return ctx.concat(logits, len(x)), ctx.concat(feats, len(x))


def _cached_reference(path) -> dict[str, torch.Tensor] | None:
    """The cached dense logits/features, or None when missing or unreadable (then rebuilt)."""
    from safetensors.torch import load_file

    if not path.exists():
        return None
    try:
        return load_file(str(path))
    except Exception as exc:  # a damaged cache entry: rebuild the reference
        log.warning("the cached dense reference %s is unreadable (%s); recomputing it", path, exc)
        return None
