"""What the llama adapter gives a streamed run: the checkpoint, a weight-less model, the head's loss."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from compresskit.cache import atomic_directory, cache_dir
from compresskit.errors import CompressKitError
from compresskit.interfaces import Loaded

log = logging.getLogger(__name__)


def checkpoint_dir(source: str) -> Path:
    """The safetensors directory of a source: a local directory, the packaged SmolLM2 cache, a
    ``random:*`` preset written once to the cache, or a hub snapshot (needs network or the hub cache)."""
    from . import sources

    if source.startswith("random:"):
        return _random_dir(source.split(":", 1)[1])
    if source == "smollm2":
        return sources.smollm2_dir()
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CompressKitError(f"--model {source}: no config.json in that directory, so it is not a "
                                   "save_pretrained model (empty or the wrong folder?)")
        return path
    if source.startswith((".", "/", "~")) or (os.sep in source and source.count("/") != 1):
        raise CompressKitError(f"--model {source}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                              "*.txt"]))
    except Exception as exc:
        raise CompressKitError(f"could not fetch {source!r} from the hub ({type(exc).__name__}: {str(exc)[:200]}); "
                               "download it first and pass its local directory") from exc


def _random_dir(preset: str) -> Path:
    from . import sources

    target = cache_dir() / "models" / f"random-{preset}-seed0"
    if not (target / "config.json").is_file():
        model, tok = sources.random_model(preset)
        with atomic_directory(target, keep_existing=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
    return target


def load_empty(directory: Path, source: str, dtype: Any, blocks: str | None) -> Loaded:
    """The model of ``directory`` on the meta device (no weight read), with its tokenizer."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from . import sources

    try:
        config = AutoConfig.from_pretrained(directory)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.tie_weights()  # not done on the meta device; from_pretrained ties after loading
    except Exception as exc:
        raise CompressKitError(f"could not build the model of {directory} ({type(exc).__name__}: "
                               f"{str(exc)[:300]})") from exc
    try:
        tok = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):
        log.warning("no tokenizer found in %s; text calibration will need one", directory)
        tok = None
    info = {"family": "llama", "origin": "streamed", "checkpoint": str(directory),
            "model_type": model.config.model_type, "blocks": sources.blocks_path(model, blocks)}
    return Loaded(model=model.eval(), processor=tok, source=source, info=info)


def save_extras(loaded: Loaded, directory: Path, dtype: Any) -> None:
    """``config.json`` (with the saved dtype), ``generation_config.json`` and the tokenizer."""
    model = loaded.model
    model.config.dtype = dtype
    model.config.save_pretrained(directory)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if loaded.processor is not None and hasattr(loaded.processor, "save_pretrained"):
        loaded.processor.save_pretrained(directory)


def head_loss(model: Any, hidden: Any, batch: dict) -> Any:
    """The loss from the last block's output ``hidden``; called with the blocks bypassed (the last
    returns ``hidden``), so ``inputs_embeds`` only sets shapes and the embeddings are never read."""
    ids = batch["input_ids"]
    return model(inputs_embeds=hidden.detach().new_zeros(hidden.shape), labels=ids, use_cache=False).loss
