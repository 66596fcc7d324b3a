"""What a plugin needs to work under ``torchrun``: this process's place in the run, and sums across ranks.

Public and stable. Without ``torchrun`` :func:`current` is a single-process context whose methods
do nothing, so a plugin written with these runs unchanged in one process:

- ``current().is_writer``: this process writes caches and outputs (rank 0, or the only one);
- ``with current().writer_first():`` rank 0 runs the block first (fills a cache), the others after;
- ``current().from_writer(load)``: rank 0 loads, every rank receives the tensors;
- ``current().shard(items)`` / ``current().concat(part, total)``: split work over ranks and join it;
- :func:`combine` sums a plugin's additive statistics (``{name: tensor}`` trees) across ranks.

The machinery behind it is the engine's (:mod:`compresskit.engine.distributed`).
"""

from compresskit.engine.distributed import Context, combine, current

__all__ = ["Context", "combine", "current"]
