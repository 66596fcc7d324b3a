"""Text sources for calibration and evaluation."""

from __future__ import annotations

import torch

from compresskit.errors import CompressKitError


def calibration_token_ids(tokenizer, data: str | None, nsamples: int, seqlen: int, seed: int, vocab_size: int) -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids; ``random`` gives seeded uniform ids."""
    if data in (None, "random"):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (nsamples, seqlen), generator=g)
    raise CompressKitError(f"unknown calibration source {data!r}")


def describe(data: str | None) -> dict:
    return {"source": data or "random"}
