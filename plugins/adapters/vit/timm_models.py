"""Building timm Vision Transformers: the import, creation with or without weights, state dicts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresskit.cache import atomic_write, tensor_fingerprint
from compresskit.errors import CompressKitError, MissingDependencyError

log = logging.getLogger(__name__)


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
    load_strict(model, sd, source)
    return model.float().eval()


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 (16 hex digits) over the state dict: names, shapes, dtypes and bytes."""
    return tensor_fingerprint(model.state_dict())[:16]


def info_dict(name: str, kwargs: dict[str, Any], origin: str, source: str) -> dict[str, Any]:
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


def load_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CompressKitError(
            f"weights of {source!r} do not fit the timm architecture ({exc}); check the timm model name before '@'"
        ) from exc
