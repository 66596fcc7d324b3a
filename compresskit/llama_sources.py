"""Where a LLaMA-family model comes from: ``random:<preset>``, a packaged name, a hub id or a path."""

from __future__ import annotations

import logging
from typing import Any

import torch

from compresskit.errors import CompressKitError

log = logging.getLogger(__name__)

# Tiny seeded presets: sizes divisible by 8 (N:M tests), 4 heads / 2 KV heads (GQA).
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
}


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
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in RANDOM_PRESETS:
        raise CompressKitError(f"unknown random preset {preset!r}; choose one of {', '.join(RANDOM_PRESETS)}")
    cfg = LlamaConfig(vocab_size=256, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False, **RANDOM_PRESETS[preset])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.float().eval(), byte_tokenizer()


def load(source: str, dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer, info)`` for a source string."""
    if source.startswith("random:"):
        model, tok = random_model(source.split(":", 1)[1])
        return model.to(dtype), tok, {"family": "llama", "origin": "random", "preset": source}
    from compresskit import assets

    if source in assets.PACKAGED_LMS:
        model, tok, info = assets.PACKAGED_LMS[source]()
        return model.to(dtype), tok, info
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compresskit import export_load

    try:
        if export_load.is_compressed(source):  # a `compresskit export` in compressed-tensors format: decompress
            model = export_load.load_causal_lm(source, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as exc:
        raise CompressKitError(
            f"could not load model {source!r} ({exc}). Give a local directory, a hub id (needs network), "
            f"'random:tiny', or a packaged model: {', '.join(assets.PACKAGED_LMS) or 'none installed'}"
        ) from exc
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        log.warning("no tokenizer found for %s; text calibration/evaluation will need one", source)
        tok = None
    return model.eval(), tok, {"family": "llama", "origin": "from_pretrained"}
