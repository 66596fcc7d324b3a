"""Models larger than memory: block streaming, streamed exact gradients, resumable runs.

A streamed run instantiates the model without weights (meta device), reads each block from the
checkpoint's safetensors when the walk reaches it, prunes it and writes it as one shard of the
output; calibration activations stay in memory within a budget and go to the work directory
beyond it; GBLM's gradients are computed block by block (:mod:`.grads`); every finished step is
recorded in the work directory so that ``--resume`` continues after a crash. See
docs/howto/large-models.md.

Modules: :mod:`.engine` (the run), :mod:`.grads` (gradients), :mod:`.session` (the streaming
residency), :mod:`.checkpoint` (weights on demand), :mod:`.activations` (the budgeted store),
:mod:`.workdir` (progress and resume), :mod:`.memory` (the memory model), :mod:`.tensorfile`
(safetensors I/O).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from compresskit.config import RunConfig
    from compresskit.engine.registry import Registry

log = logging.getLogger(__name__)

FIT_SHARE = 0.9
"""A run streams automatically when its in-memory estimate exceeds this share of the available memory."""


def wanted(config: RunConfig, registry: Registry | None = None) -> bool:
    """Stream this run? Yes with ``max_memory``, ``work_dir`` or ``resume``; otherwise when the
    model is a local safetensors checkpoint whose in-memory estimate exceeds the available memory."""
    if config.max_memory is not None or config.work_dir or config.resume:
        return True
    source = config.model
    if not source or not Path(source).expanduser().is_dir() or config.evaluate:
        return False
    try:
        estimate = in_memory_estimate(config, registry)
    except Exception as exc:  # the ordinary path reports real problems with the model
        log.debug("no memory estimate for %s (%s)", source, exc)
        return False
    from compresskit.engine.stream.memory import available_memory, current_rss, fmt

    avail = available_memory()
    if avail is None or current_rss() + estimate <= FIT_SHARE * avail:
        return False
    log.warning("the in-memory run needs about %s and %s is available: streaming block by block (choose the "
                "budget with --max-memory)", fmt(estimate), fmt(avail))
    return True


def in_memory_estimate(config: RunConfig, registry: Registry | None = None) -> int:
    """Bytes an in-memory run of ``config`` needs beyond the runtime, from the checkpoint's headers."""
    import json

    import torch

    from compresskit.engine.planning import plan
    from compresskit.engine.stream.checkpoint import Checkpoint
    from compresskit.engine.stream.tensorfile import torch_dtype

    p = plan(config, registry)
    ck = Checkpoint(Path(config.model).expanduser())
    dtype = getattr(torch, getattr(p.adapter.options, "dtype", "float32"))
    s = torch.empty((), dtype=dtype).element_size()
    params = 0
    for name in ck.where:
        e = ck.entry(name)
        n = e.nbytes // torch.empty((), dtype=torch_dtype(e.dtype)).element_size()
        params += n
    cfg = json.loads((ck.directory / "config.json").read_text())
    d = int(cfg.get("hidden_size", 0) or 0)
    acts = 3 * config.nsamples * config.seqlen * d * s
    return params * s + len(p.gradient_stats) * params * 4 + acts
