"""The fixed linear-probe head a headless backbone (DINOv2) gets, fitted on its dense features."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from compresskit.cache import cache_dir, tensor_fingerprint
from compresskit.errors import CompressKitError

from .images import eval_transform, open_images, sample_indices, stack

log = logging.getLogger(__name__)


@torch.no_grad()
def forward_all(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, features)`` for every image: features are the pre-logits (pooled) vectors."""
    from tqdm.auto import tqdm

    from compresskit.device import model_device, to_device, to_host

    logits, feats = [], []
    device = model_device(model)
    chunks = x.split(batch_size)
    for chunk in tqdm(chunks, desc="images", unit="batch", leave=False, disable=len(chunks) < 4):
        f = model.forward_head(model.forward_features(to_device(chunk, device)), pre_logits=True)
        feats.append(to_host(f.float()))
        logits.append(to_host(model.get_classifier()(f).float() if model.num_classes else f.new_zeros(len(f), 0)))
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

    from .timm_models import save_tensors_atomic, weights_fingerprint

    images = open_images(data, "train")
    if images.labels is None:
        raise CompressKitError(f"the linear-probe head needs labelled data, but {data!r} has none; set -o adapter.probe_data=fashion-mnist or an ImageFolder with class folders")
    key = f"{weights_fingerprint(model)}-{tensor_fingerprint(None, images.name, images.size, samples, seed)[:16]}"
    path = cache_dir() / "vit-probe" / f"{key}.safetensors"
    head = None
    if path.exists():
        try:
            head = load_file(str(path))
        except Exception as exc:  # a damaged cache entry costs a refit, not the run
            log.warning("the cached probe head %s is unreadable (%s); fitting it again", path, exc)
    if head is None:
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
