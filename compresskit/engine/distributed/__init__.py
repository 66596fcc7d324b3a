"""Data-parallel calibration on ``torch.distributed``: one rank per process, started by ``torchrun``.

Every statistic a run collects is a sum over calibration samples (:mod:`compresskit.stats`), so
the work splits across processes and the parts add::

    torchrun --nproc-per-node 4 -m compresskit prune --metric gblm --output out/

Each rank loads the model and draws the *whole* calibration set (so the calibration fingerprint
and the gradient cache key are those of a single-process run), checks that every rank holds the
same model and data, and keeps its contiguous shard (:meth:`Context.shard`). The gradient engine
and the runner fold their shard's samples into the additive parts; :func:`combine` sums the parts
across ranks (:meth:`Context.all_reduce`, leaves in :func:`compresskit.stats.leaves` order) before
any layer decides its mask. The ranks split the decisions of each group (:func:`owners`: largest
layers first, each to the least-loaded rank), then exchange the pruned weights and report rows
(:func:`share_decisions`), so every rank applies the same decision; each propagates its own shard
through the pruned block, and a digest of the pruned weights is compared at the end. Rank 0 (the *writer*) alone writes the output, the manifest and the caches; evaluation
shards its windows or images the same way (:meth:`Context.concat`).

Failures: every collective is preceded by a status exchange (:meth:`Context.check`). A rank that
raises joins the next exchange with its message (the :func:`session` guard does that) and every
other rank raises :class:`~compresskit.errors.DistributedError` with that message, so all ranks
stop together instead of waiting in a collective. A rank that dies outright shows up as a closed
connection; a hung one after ``$COMPRESSKIT_DIST_TIMEOUT`` seconds (default 1800).

Sums over a different split of the samples round differently in float32. ``accumulate="float64"``
(``--accumulate float64``) keeps the accumulators in float64 and casts the finished sums to
float32, so a run's statistics (and masks) no longer depend on how many ranks shared the work.

The modules: :mod:`.context` (this rank's place), :mod:`.sharding`, :mod:`.collectives`,
:mod:`.lifecycle` (the process group and the session guard), :mod:`.hooks` (what a run does
with them).

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) :func:`current` is a single-process context whose
methods do nothing, and nothing changes. This module imports torch only inside functions.
"""

from compresskit.engine.distributed.collectives import TIMEOUT_ENV
from compresskit.engine.distributed.context import ACCUMULATE, Context
from compresskit.engine.distributed.lifecycle import DEFAULT_TIMEOUT, current, guarded, launched, session
from compresskit.engine.distributed.hooks import (
    accumulators,
    check_plan,
    combine,
    decided_here,
    digest,
    owners,
    run_finished,
    run_started,
    share_decisions,
    sum_over_samples,
)

__all__ = [
    "ACCUMULATE",
    "DEFAULT_TIMEOUT",
    "TIMEOUT_ENV",
    "Context",
    "accumulators",
    "check_plan",
    "combine",
    "current",
    "decided_here",
    "digest",
    "guarded",
    "launched",
    "owners",
    "run_finished",
    "run_started",
    "session",
    "share_decisions",
    "sum_over_samples",
]
