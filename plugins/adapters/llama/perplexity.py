"""Token perplexity with the reference WikiText-2 protocol (docs/explanation/reference-semantics.md).

The documents of a corpus are joined with ``"\\n\\n"`` and tokenized once (tokenizer defaults,
so one BOS at the very start when the tokenizer adds one). The ids are cut into non-overlapping
windows of ``seqlen`` tokens; the remainder is dropped and no context crosses a window. Each
window's loss is the mean next-token cross-entropy over its ``seqlen - 1`` predictable positions;
perplexity is ``exp`` of the mean window loss (equivalently ``exp(sum_k loss_k * L / (K * L))``).
Batch size 1, no gradients, on the model's device.
"""

from __future__ import annotations

import logging
import math
import time

from typing import TYPE_CHECKING

from compresskit import distributed
from compresskit.errors import CompressKitError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_EVAL_DATA = "wiki"


def window_count(num_tokens: int, seqlen: int) -> int:
    """Number of full non-overlapping windows of ``seqlen`` in ``num_tokens`` tokens."""
    if seqlen < 2:
        raise CompressKitError(f"perplexity needs seqlen >= 2 (got {seqlen}); pass a larger --seqlen")
    return num_tokens // seqlen


def make_windows(ids: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """``[K, seqlen]`` non-overlapping windows of a 1-D id tensor; remainder dropped; first ``limit``."""
    k = window_count(ids.numel(), seqlen)
    if limit is not None:
        k = min(k, max(int(limit), 0))
    return ids[: k * seqlen].reshape(k, seqlen)


def window_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one window: ``logits [L, V]`` predict ``ids[1:]``, in fp32."""
    import torch.nn.functional as F

    return F.cross_entropy(logits[:-1].float(), ids[1:], reduction="mean")


def perplexity_from_losses(losses: list[float]) -> float:
    """``exp`` of the mean per-window loss (the reference ``exp(sum nll / (K * L))``)."""
    if not losses:
        raise CompressKitError("no evaluation windows: the text is shorter than one window; use a smaller --seqlen")
    return math.exp(sum(losses) / len(losses))


def evaluate(model, tokenizer, data: str | None = None, seqlen: int = 512, limit: int | None = None,
             progress: bool = True) -> dict:
    """Token perplexity of a causal LM on a text source (default ``wiki``).

    Args:
        model: a causal LM returning ``.logits`` for ``input_ids``.
        tokenizer: its tokenizer (called once on the joined text).
        data: a text source (see :mod:`compresskit_plugins.adapters.llama.corpora`; default ``wiki``).
        seqlen: window length ``L`` in tokens.
        limit: evaluate only the first ``limit`` windows (``None``: all).
        progress: show a progress bar over windows.

    Returns:
        ``{"perplexity": float, "protocol": {...}}``; the protocol records the corpus
        description (with its sha256 fingerprint), seqlen, windows used/available and tokens.
    """
    import torch
    from tqdm.auto import tqdm

    from compresskit.device import model_device, to_device

    from . import corpora

    if tokenizer is None:
        raise CompressKitError("perplexity needs a tokenizer and the model has none; load a model with a tokenizer")
    data = data or DEFAULT_EVAL_DATA
    if data == "random":
        raise CompressKitError("cannot evaluate perplexity on 'random'; pass a corpus name (wiki) or a text file")
    with distributed.current().writer_first():  # under torchrun: rank 0 fills the corpus cache first
        corpus = corpora.load_corpus(data)
    joined = "\n\n".join(corpus.documents)
    ids = torch.tensor(tokenizer(joined, verbose=False)["input_ids"], dtype=torch.long)
    available = window_count(ids.numel(), seqlen)
    windows = make_windows(ids, seqlen, limit)
    if windows.shape[0] == 0:
        n = ids.numel()
        if available:  # there are windows: the limit asked for none
            raise CompressKitError(f"the window limit {limit} evaluates no window; give 1 or more (None: every window)")
        fix = f"use --seqlen {n} or less, or more text" if n >= 2 else "use a text of two tokens or more"
        raise CompressKitError(f"corpus {corpus.name!r} has {n} tokens, fewer than one window of {seqlen}; {fix}")
    device = model_device(model)
    was_training = model.training
    model.eval()
    losses: list[float] = []
    t0 = time.perf_counter()
    ctx = distributed.current()  # under torchrun each rank evaluates its shard of the windows
    start, stop = ctx.shard_range(windows.shape[0])
    with torch.no_grad():
        for w in tqdm(windows[start:stop], desc=f"perplexity {corpus.name}", disable=not progress, leave=False):
            w = to_device(w, device)
            logits = model(input_ids=w.unsqueeze(0), use_cache=False).logits[0]
            losses.append(float(window_loss(logits, w)))
    model.train(was_training)
    losses = ctx.concat(torch.tensor(losses, dtype=torch.float64), windows.shape[0]).tolist()
    ppl = perplexity_from_losses(losses)
    protocol = {
        "data": corpora.describe(data),
        "metric": "token perplexity",
        "seqlen": seqlen,
        "windows_used": len(losses),
        "windows_available": available,
        "tokens_total": int(ids.numel()),
        "tokens_evaluated": len(losses) * seqlen,
        "joined_with": "\\n\\n",
        "bos_prepended": bool(getattr(tokenizer, "bos_token_id", None) is not None and ids.numel()
                              and int(ids[0]) == tokenizer.bos_token_id),
        "seconds": time.perf_counter() - t0,
    }
    log.info("perplexity %s L=%d windows=%d/%d: %.3f", corpus.name, seqlen, len(losses), available, ppl)
    return {"perplexity": ppl, "protocol": protocol}
