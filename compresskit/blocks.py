"""Walking a model block by block, for plugins that need their own pass over the blocks.

Public and stable: an allocation's pre-pass (OWL measures each block's outliers on the dense
model) or a block-level solver (regional optimisation compares a pruned block's output with the
dense one) uses these instead of the engine's internals, which may change between releases.

- :func:`walk_blocks` yields one :class:`BlockStep` per block with its captured inputs, on the
  compute device, propagating dense or pruned outputs to the next block;
- :func:`block_output` runs one block on one captured input and returns its hidden states;
- :func:`requires_grad_only` makes only the given parameters require gradients, for a block-local
  backward pass, and restores the flags afterwards.
"""

from compresskit.engine.blockgrad import requires_grad_only
from compresskit.engine.walk import BlockStep, block_output, walk_blocks

__all__ = ["BlockStep", "block_output", "requires_grad_only", "walk_blocks"]
