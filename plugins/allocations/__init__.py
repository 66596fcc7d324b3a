"""Built-in allocations (the ``--allocation`` stage: per-layer targets)."""
