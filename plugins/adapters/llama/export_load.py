"""Loading a compressed-tensors export back as a working model (used by the llama adapter)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import ct_backend
from .export import ExportError, load_weights


def is_compressed(directory: str | os.PathLike) -> bool:
    """Whether ``directory/config.json`` declares a sparse compressed-tensors format (bitmask or 2:4)."""
    f = Path(directory) / "config.json"
    if not f.is_file():
        return False
    qc = json.loads(f.read_text()).get("quantization_config") or {}
    fmt = (qc.get("sparsity_config") or {}).get("format")
    return qc.get("quant_method") == "compressed-tensors" and fmt in ct_backend.SPARSE_FORMATS


def load_causal_lm(directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A transformers causal LM with the decompressed weights of a compressed-tensors export.

    transformers 5 does not decompress sparse compressed-tensors checkpoints (with compressed-tensors
    >= 0.15 it would initialise the pruned layers randomly), so the weights are loaded here.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    weights = load_weights(directory)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                                                 for k, v in weights.items()}, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if unexpected or set(missing) - tied:
        raise ExportError(f"{directory}: decompressed weights do not fit the model (missing "
                          f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    return model.eval()
