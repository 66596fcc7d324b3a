"""The memory plan of the in-memory gradient pass: checkpointing and layer groups chosen to fit a budget.

The pass (:func:`compresskit.engine.gradients.compute`) holds on the compute device, for its
whole length: the model's weights, a float32 accumulator per prunable weight and statistic, and
the backward's activations of one sample. Two settings trade time for memory:

* **checkpointing** keeps only each block's input during the forward and recomputes one block
  at a time in the backward (about one extra forward per sample);
* **groups** ``G`` split the prunable layers into ``G`` contiguous groups (block order, balanced
  by accumulator bytes) and run the pass once per group over all samples, with gradients and
  accumulators of that group only; a finished group's sums rest on disk (on the CPU under
  ``torchrun`` or when the cache cannot be written). The device then holds the largest group's
  accumulators instead of all of them, for ``G`` times the passes; on a CPU only when they go to
  disk, since otherwise they rest in the same memory.

Estimate, in bytes (``L`` tokens per sample, ``d`` the hidden size, ``d_ff`` the MLP width,
``B`` the blocks, ``s`` bytes per weight of the model dtype, ``V`` the vocabulary, ``W`` the
largest prunable layer)::

    peak = weights + accumulators on the device + activations
    block      = L * (10 d + 4 d_ff) * s    what autograd keeps of one sample through one block
    head       = 4 * L * V * 4              logits, their float32 copy, log-softmax, its gradient
    fold       = 3 * W * 4                  one layer's gradient and the temporaries it is folded from
    plain      = B * block + head + fold
    checkpoint = B * L * d * s + block + head + fold

``10 d + 4 d_ff`` counts the tensors a LLaMA block saves for its backward: the normed input of
q/k/v, q, k and v after the rotary embedding, the attention output, both RMSNorms' float32
intermediates (about 2 d each in model-dtype units), the MLP's input, gate, up, silu(gate) and
their product. At LLaMA-2-7B (bfloat16, 2048 tokens) it gives 11.85 GiB; the measured pass
(``bench/gpu.py``: 47.98 GiB peak, less 12.55 GiB weights and 24.13 GiB accumulators) kept
11.30 GiB. No attention-score term: HF's default (SDPA) kernels do not keep the ``L x L`` matrix.

:func:`plan_gradient_pass` picks the cheapest plan that fits: no checkpointing and one group;
else checkpointing; else checkpointing and the smallest ``G``. Settings the user gave are kept.
:func:`plan_pass` gathers its inputs for a model (sizes, activations, the budget: the user's, else
a CUDA device's free memory) and logs what it chose.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from typing import TYPE_CHECKING, Any, Sequence

from compresskit.engine import distributed
from compresskit.engine.device import as_device, free_memory, is_cuda, model_device
from compresskit.errors import GradientError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compresskit.interfaces import ModelAdapter
    from compresskit.stats import GradNorm

log = logging.getLogger(__name__)

GiB = 2**30
FREE_SHARE = 0.95
"""Without ``gradient.max_memory``: the budget is this share of the CUDA device's free memory
(the rest is left to the allocator's slack and temporaries the estimate does not count)."""
MAX_GROUPS_OF_A_TOTAL = 1024
"""Most groups tried when the accumulators are given as one total (no per-layer sizes)."""


@dataclasses.dataclass(frozen=True)
class Activations:
    """Bytes the backward keeps for one sample, without and with activation checkpointing."""

    plain: int
    checkpointed: int


@dataclasses.dataclass(frozen=True)
class GradientPlan:
    """The settings the pass runs with and what they were chosen from (all bytes)."""

    checkpointing: bool
    groups: int
    estimate: int | None = None
    budget: int | None = None
    budget_source: str | None = None
    chosen: str = "user"

    def as_info(self) -> dict[str, Any]:
        """The plan for the manifest (``gradients.plan``)."""
        out = dataclasses.asdict(self)
        out["estimate_gib"] = None if self.estimate is None else round(self.estimate / GiB, 3)
        out["budget_gib"] = None if self.budget is None else round(self.budget / GiB, 3)
        return out


def activation_estimate(blocks: int, hidden: int, intermediate: int, tokens: int, itemsize: int, vocab: int = 0,
                        largest_layer: int = 0) -> Activations:
    """The module docstring's ``plain`` and ``checkpoint`` activation bytes of one sample."""
    block = tokens * (10 * hidden + 4 * intermediate) * itemsize
    rest = 4 * tokens * vocab * 4 + 3 * largest_layer * 4
    return Activations(plain=blocks * block + rest, checkpointed=blocks * tokens * hidden * itemsize + block + rest)


def split(sizes: Sequence[int], groups: int) -> list[tuple[int, int]]:
    """``groups`` contiguous, non-empty index ranges ``[start, stop)`` over ``sizes``, balanced by
    their sums: range ``k`` ends where the running sum comes closest to ``(k + 1) / groups`` of
    the total (before or after the item that crosses it).

    Raises:
        GradientError: more groups than items.
    """
    n = len(sizes)
    if not 1 <= groups <= n:
        raise GradientError(f"gradient.groups={groups} asks for more groups than the {n} prunable layers; "
                            f"use at most {n}")
    prefix = list(itertools.accumulate(sizes))
    total, bounds = prefix[-1], [0]
    for k in range(1, groups):
        lo, hi = bounds[-1] + 1, n - (groups - k)  # non-empty, and room for the ranges after it
        stop = next((i + 1 for i in range(lo - 1, n) if prefix[i] * groups >= k * total), n)
        if stop - 1 >= lo and k * total - prefix[stop - 2] * groups < prefix[stop - 1] * groups - k * total:
            stop -= 1  # the sum before the crossing item is nearer the target
        bounds.append(min(max(stop, lo), hi))
    bounds.append(n)
    return [(bounds[k], bounds[k + 1]) for k in range(groups)]


def largest_group(sizes: Sequence[int] | int, groups: int) -> int:
    """Bytes of the largest group's accumulators (a total alone: split evenly, rounded up)."""
    if isinstance(sizes, int):
        return -(-sizes // groups)
    return max(sum(sizes[a:b]) for a, b in split(sizes, groups))


def peak(weight_bytes: int, accumulator_bytes: Sequence[int] | int, activations: Activations, checkpointing: bool,
         groups: int, rest_on_device: bool = False) -> int:
    """Estimated peak bytes on the compute device (``rest_on_device``: the compute device is where
    finished groups rest too, the CPU when they cannot go to disk, so every accumulator counts
    whatever ``groups``)."""
    total = accumulator_bytes if isinstance(accumulator_bytes, int) else sum(accumulator_bytes)
    acc = total if rest_on_device else largest_group(accumulator_bytes, groups)
    return weight_bytes + acc + (activations.checkpointed if checkpointing else activations.plain)


def plan_gradient_pass(weight_bytes: int, accumulator_bytes: Sequence[int] | int, activations: Activations,
                       budget_bytes: int, checkpointing: bool | None = None, groups: int | None = None,
                       rest_on_device: bool = False, budget_source: str | None = None) -> GradientPlan:
    """The cheapest ``(checkpointing, groups)`` whose :func:`peak` fits ``budget_bytes``.

    Tried in order of cost: no checkpointing and one group; checkpointing and one group;
    checkpointing and 2, 3, ... groups (up to one per layer). ``checkpointing`` or ``groups``
    given (not None) are the user's and are kept; with both given the plan is theirs, fitting or not.

    Raises:
        GradientError: no plan fits; the message names the smallest budget that would.
    """
    n = MAX_GROUPS_OF_A_TOTAL if isinstance(accumulator_bytes, int) else len(accumulator_bytes)
    ckpts = [False, True] if checkpointing is None else [checkpointing]
    if groups is not None:
        candidates = [(c, groups) for c in ckpts]
    else:
        candidates = [(c, 1) for c in ckpts] + [(ckpts[-1], g) for g in range(2, n + 1)]
    estimates = {cand: peak(weight_bytes, accumulator_bytes, activations, *cand, rest_on_device) for cand in candidates}
    if checkpointing is not None and groups is not None:
        return GradientPlan(checkpointing, groups, estimates[(checkpointing, groups)], budget_bytes, budget_source,
                            chosen="user")
    for (c, g), est in estimates.items():
        if est <= budget_bytes:
            return GradientPlan(c, g, est, budget_bytes, budget_source, chosen="plan")
    (c, g), least = min(estimates.items(), key=lambda kv: (kv[1], kv[0][1]))
    need = math.ceil(least / GiB * 100) / 100  # rounded up: a budget of this many GiB fits
    given = " and ".join(f"gradient.{k}={v}" for k, v in (("checkpointing", checkpointing), ("groups", groups))
                         if v is not None)
    keep = f" with {given}" if given else ""
    raise GradientError(
        f"the gradient pass needs at least {need:.2f} GiB{keep} (checkpointing={c}, groups={g}: weights "
        f"{weight_bytes / GiB:.2f} GiB + accumulators + activations) but the budget is {budget_bytes / GiB:.2f} GiB"
        + (f" ({budget_source})" if budget_source else "") + "; "
        f"use a device with that much free and give gradient.max_memory={need:.2f}GiB"
        + (f", drop {given}" if given else "")
        + ", or use a streamed run (--max-memory), which holds one block at a time")


def plan_pass(adapter: ModelAdapter, model: nn.Module, layers: dict[str, nn.Linear], sizes: list[int],
              batches: Sequence[dict[str, torch.Tensor]], device: torch.device, ckpt: bool | None = None,
              groups: int | None = None, max_memory: str | int | None = None, groups_on_disk: bool = False
              ) -> GradientPlan:
    """Checkpointing and groups of a gradient pass: ``ckpt`` and ``groups`` where the user gave them
    (None: ``auto``), the rest planned against ``max_memory`` (``gradient.max_memory``), else a CUDA
    device's free memory; on a CPU without a budget, today's pass (one group, checkpointing only if
    asked). ``groups_on_disk``: finished groups go to disk, so on a CPU they leave the memory the
    pass runs in."""
    weights = weight_bytes(model)
    acts = model_activations(adapter, model, layers, batches[0]) if batches else None
    if max_memory is not None:
        from compresskit.engine.stream.memory import parse_size

        budget, source = parse_size(max_memory), "gradient.max_memory"
    elif is_cuda(device):
        held = weights if model_device(model) == as_device(device) else 0  # already there: not free, but ours
        budget, source = int(free_memory(device) * FREE_SHARE) + held, "free device memory"
        budget = min(distributed.current().gather(budget))  # under torchrun: every rank the same plan
    else:
        budget, source = None, None
    rest_on_device = as_device(device).type == "cpu" and not groups_on_disk  # finished groups rest in that memory
    default = GradientPlan(bool(ckpt), groups or 1, budget=budget, budget_source=source,
                           chosen="user" if ckpt is not None and groups is not None else "default")
    if acts is not None:
        default = dataclasses.replace(default, estimate=peak(weights, sizes, acts, default.checkpointing,
                                                             default.groups, rest_on_device))
    if budget is None:
        return default
    if acts is None:
        log.warning("no memory estimate for this model's gradient pass (its samples have no input_ids); running "
                    "it with checkpointing=%s and groups=%d, not planned against the %s", default.checkpointing,
                    default.groups, source)
        return default
    plan = plan_gradient_pass(weights, sizes, acts, budget, ckpt, groups, rest_on_device, source)
    if plan.estimate > budget:
        log.warning("the gradient pass with checkpointing=%s and groups=%d (both set by you) is estimated at "
                    "%.2f GiB, above the %.2f GiB budget (%s)", plan.checkpointing, plan.groups,
                    plan.estimate / GiB, budget / GiB, source)
    elif plan.checkpointing or plan.groups > 1:
        log.info("gradient pass planned for %.2f GiB (%s): checkpointing=%s, groups=%d, estimated peak %.2f GiB",
                 budget / GiB, source, plan.checkpointing, plan.groups, plan.estimate / GiB)
    return plan


# ------------------------------------------------------------------------------ sizes of a model


def accumulator_sizes(layers: dict[str, nn.Linear], stats: Sequence[GradNorm]) -> list[int]:
    """Bytes of every layer's accumulators, all statistics together (shapes and dtypes from each
    statistic's ``init`` on the meta device: nothing is allocated)."""
    import types

    import torch

    out = []
    for layer in layers.values():
        meta = types.SimpleNamespace(weight=torch.empty(layer.weight.shape, device="meta"))
        out.append(sum(t.numel() * t.element_size() for s in stats for t in s.init(meta).values()))
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (what the pass moves to the device)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def model_activations(adapter: ModelAdapter, model: nn.Module, layers: dict[str, nn.Linear],
                      batch: dict[str, torch.Tensor]) -> Activations | None:
    """:func:`activation_estimate` from the model's config (``hidden_size``, ``intermediate_size``,
    ``num_hidden_layers``, ``vocab_size``; without them: the prunable layers' shapes) and the
    tokens of one calibration sample (``input_ids``). None when the sample has no ``input_ids``."""
    ids = batch.get("input_ids") if isinstance(batch, dict) else None
    if ids is None or not layers:
        return None
    cfg = getattr(model, "config", None)
    shapes = [tuple(layer.weight.shape) for layer in layers.values()]
    hidden = getattr(cfg, "hidden_size", None) or shapes[0][1]
    inter = getattr(cfg, "intermediate_size", None) or max(max(s) for s in shapes)
    blocks = getattr(cfg, "num_hidden_layers", None) or len(list(adapter.blocks(model)))
    vocab = getattr(cfg, "vocab_size", None) or 0
    itemsize = next(iter(layers.values())).weight.element_size()
    return activation_estimate(blocks, hidden, inter, int(ids.shape[-1]), itemsize, vocab,
                               max(a * b for a, b in shapes))
