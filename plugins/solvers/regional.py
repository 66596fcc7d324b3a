"""Regional optimisation of one pruned block against the dense block's outputs (mask fixed)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from compresskit.errors import CompressKitError

if TYPE_CHECKING:
    import torch
    from torch import nn


def sample_order(n: int, steps: int, seed: int) -> list[int]:
    """``steps`` sample indices: seeded shuffles of ``range(n)`` one after another (each sample
    once per pass, as the paper's random draw of its samples per round)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < steps and n:
        out += torch.randperm(n, generator=g).tolist()
    return out[:steps]


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in nested tuples/lists/dicts cast to ``dtype`` (masks, ids untouched)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def _float32(block: nn.Module) -> Iterator[bool]:
    """Run the block in float32 inside (True when it had to be cast); cast back afterwards."""
    import torch

    dtype = next(block.parameters()).dtype
    if dtype == torch.float32:
        yield False
        return
    block.float()
    try:
        yield True
    finally:
        block.to(dtype)


def output_error(block: nn.Module, inputs: Sequence, targets: Sequence[torch.Tensor]) -> float:
    """``sum ||f(X) - Y||^2 / sum ||Y||^2`` over the calibration inputs (no gradients)."""
    import torch

    from compresskit.blocks import block_output

    num = den = 0.0
    with torch.no_grad():
        for (args, kwargs), y in zip(inputs, targets):
            y = y.float()
            num += float((block_output(block, args, kwargs).float() - y).pow(2).sum())
            den += float(y.pow(2).sum())
    return num / max(den, 1e-30)


def block_error(block: nn.Module, inputs: Sequence, targets: Sequence[torch.Tensor]) -> float:
    """:func:`output_error` of ``block`` run in float32 (as :func:`tune_block` measures it)."""
    import torch

    with _float32(block) as cast:
        if cast:
            inputs = [_cast(x, torch.float32) for x in inputs]
        return output_error(block, inputs, [y.float() for y in targets])


def _optimizer(name: str, params: list, lr: float):
    import torch

    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)  # torch defaults alpha=0.99, eps=1e-8, as the reference
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


def tune_block(block: nn.Module, layers: dict[str, nn.Linear], masks: dict[str, torch.Tensor], inputs: Sequence,
               targets: Sequence[torch.Tensor], steps: int, lr: float, optimizer: str = "rmsprop", seed: int = 0,
               keep_best: bool = True) -> dict[str, Any]:
    """Tune ``layers``' kept weights for ``steps`` single-sample steps of ``||f(X) - Y||^2``.

    ``masks[name]`` (True = pruned) stays zero throughout. Returns the relative output errors on
    all calibration inputs before and after, and whether the tuned weights were kept.
    """
    import torch

    from compresskit.blocks import requires_grad_only
    from compresskit.blocks import block_output

    names = list(masks)
    with _float32(block) as cast:
        if cast:
            inputs = [_cast(x, torch.float32) for x in inputs]
        targets = [y.float() for y in targets]
        weights = [layers[n].weight for n in names]
        before = output_error(block, inputs, targets)
        saved = [w.detach().clone() for w in weights] if keep_best else None
        order = sample_order(len(inputs), steps, seed)
        with requires_grad_only(block, weights), torch.enable_grad():
            opt = _optimizer(optimizer, weights, lr)
            for k in order:
                args, kwargs = inputs[k]
                loss = (block_output(block, args, kwargs).float() - targets[k]).pow(2).sum()
                if not torch.isfinite(loss):
                    raise CompressKitError(f"regional optimisation diverged (loss {loss.item()} on sample {k}); "
                                           "use a smaller -o update.lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for n, w in zip(names, weights):
                    w.grad.masked_fill_(masks[n], 0.0)
                opt.step()
                with torch.no_grad():
                    for n, w in zip(names, weights):
                        w.masked_fill_(masks[n], 0.0)
            del opt
        after = output_error(block, inputs, targets)
        kept = not (keep_best and after > before)
        if not kept:
            with torch.no_grad():
                for w, s in zip(weights, saved):
                    w.copy_(s)
    return {"error_before": before, "error_after": after, "steps": len(order), "kept": kept}
