"""Block-local gradient statistics: per-sample gradients of a block's own objective.

Statistics with ``source == "block_gradients"`` (e.g. :class:`compresskit.stats.BlockGradNorm`,
Wanda++'s regional gradients) are collected here, one block at a time, by the runner
(:func:`compresskit.engine.runner.prune_model`): for every calibration input of the block, one forward
with gradients through that block only, ``objective(output)`` (the statistic's scalar, e.g. the
output's L2 norm), and one backward to the block's prunable weights, whose gradients are folded
into the statistic's additive parts and freed. Nothing outside the block is touched, so memory
is one block with its activations for one sample. The block's weights are those before any of
its layers is pruned; its inputs are the run's (outputs of the already pruned blocks above).

The model-level gradient path (:mod:`compresskit.engine.gradients`, GBLM's loss gradients of the whole
dense model) is separate and unchanged.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

from compresskit.errors import CompressKitError
from compresskit.engine.walk import block_output

if TYPE_CHECKING:
    from torch import nn

    from compresskit.stats import Parts, Statistic
    from compresskit.engine.walk import BlockInput


@contextlib.contextmanager
def requires_grad_only(module: nn.Module, wanted: Iterable[nn.Parameter]) -> Iterator[None]:
    """Inside: only ``wanted`` parameters of ``module`` require grad; flags and ``.grad`` restored after."""
    params = list(module.parameters())
    old = [(p, p.requires_grad, p.grad) for p in params]
    keep = {id(p) for p in wanted}
    try:
        for p in params:
            p.requires_grad_(id(p) in keep)
            p.grad = None
        yield
    finally:
        for p, flag, grad in old:
            p.requires_grad_(flag)
            p.grad = grad


def collect(block: nn.Module, layers: dict[str, nn.Linear], inputs: Sequence[BlockInput],
            specs: Sequence[Statistic], accumulate: str = "float32") -> dict[str, dict[str, Parts]]:
    """Parts of every block-gradient statistic for every layer: ``parts[layer name][stat.key()]``.

    Args:
        block: the block, on the compute device (its weights are not changed).
        layers: its prunable layers by name (the weights whose gradients are folded).
        inputs: the block's calibration inputs, ``(args, kwargs)`` per sample.
        specs: statistics with ``source == "block_gradients"`` (``objective``, ``fold``).
        accumulate: dtype of the sums (``float64``: see :class:`compresskit.config.RunConfig`).

    Raises:
        CompressKitError: a non-finite objective, or a layer the objective does not depend on.
    """
    import torch

    from compresskit.engine.distributed import accumulators

    parts = {n: accumulators({s.key(): s.init(layer) for s in specs}, accumulate) for n, layer in layers.items()}
    if not specs:
        return parts
    names = list(layers)
    weights = [layers[n].weight for n in names]
    with requires_grad_only(block, weights), torch.enable_grad():
        for k, (args, kwargs) in enumerate(inputs):
            out = block_output(block, args, kwargs)
            for j, s in enumerate(specs):
                value = s.objective(out)
                if not torch.isfinite(value):
                    raise CompressKitError(f"the block-local objective of statistic {s.name!r} is {value.item()} on "
                                           f"calibration sample {k}; check the model weights and dtype "
                                           "(float16 can overflow: load with -o adapter.dtype=float32)")
                grads = torch.autograd.grad(value, weights, retain_graph=j + 1 < len(specs), allow_unused=True)
                for n, g in zip(names, grads):
                    if g is None:
                        raise CompressKitError(f"layer {n!r} does not affect its block's output, so it has no "
                                               "block gradient; exclude it from adapter.prunable()")
                    s.fold(parts[n][s.key()], g)
            del out
    return parts
