"""Guards against silent wrong results: non-finite numbers, and settings that do less than asked.

Each check runs once, where it is cheap (``bench/checks.py`` measures the cost):

* :func:`check_model` — every floating parameter and buffer of the input checkpoint, once
  after loading (one reduction per tensor).
* :func:`check_layer_stats` — every finished statistic of a layer (``act_sq``/``gram`` of its
  calibration inputs, gradient statistics), once per layer in the runner; a NaN or inf
  activation anywhere in the calibration data ends up in these sums.
* :func:`check_tensor` — a layer's scores and the solver's new weights, once per layer.
* :func:`check_seqlen` — ``--seqlen`` against the model's context length.
* :func:`rounding_report` — what ``--sparsity`` really prunes once each comparison group
  rounds its count down (``floor(in_features * sparsity)`` per row).
* :func:`finite_result` — an evaluation result with non-finite numbers made JSON-safe.

A non-finite value raises :class:`~compresskit.errors.NonFiniteError` naming the layer, the
source and the fix, before anything is written. torch is imported inside functions.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from compresskit.errors import NonFiniteError, OptionError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compresskit.interfaces import Loaded, MaskPattern, ModelAdapter
    from compresskit.stats import LayerStats

log = logging.getLogger(__name__)

WEAK_ROUNDING = 0.9
"""Warn when the rounding keeps less than this fraction of the requested pruning in some layer."""


def all_finite(t: torch.Tensor) -> bool:
    """True when every element of ``t`` is finite (integer and bool tensors always are).

    One reduction: NaN and inf survive a sum, so a finite sum proves every element finite; a
    non-finite sum (which a sum of huge finite values can also give) is confirmed elementwise.
    """
    import torch

    if not t.is_floating_point() and not t.is_complex():
        return True
    if t.numel() == 0:
        return True
    wide = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    if bool(torch.isfinite(t.sum(dtype=wide))):
        return True
    return bool(torch.isfinite(t).all())


def describe_nonfinite(t: torch.Tensor) -> str:
    """``"3 NaN and 1 inf of 4096 values, first at [3, 5]"`` (for error messages)."""
    import torch

    bad = ~torch.isfinite(t)
    nan = int(torch.isnan(t).sum())
    inf = int(bad.sum()) - nan
    first = bad.nonzero()[0].tolist() if bad.any() else []
    parts = [f"{nan} NaN"] if nan else []
    parts += [f"{inf} inf"] if inf else []
    return f"{' and '.join(parts) or 'no non-finite'} of {t.numel()} values, first at {first}"


def check_tensor(t: Any, what: str, fix: str) -> None:
    """Raise :class:`NonFiniteError` ``"<what> holds <counts>; <fix>"`` unless ``t`` is all finite.

    ``t`` may be a tensor, a float, or a (nested) mapping/sequence of them; other values pass.
    """
    bad = _first_bad(t)
    if bad is not None:
        label, value = bad
        detail = describe_nonfinite(value) if hasattr(value, "isfinite") else repr(value)
        where = f" at {label}" if label else ""
        raise NonFiniteError(f"{what}{where} holds non-finite values ({detail}); {fix}")


def _first_bad(obj: Any, label: str = "") -> tuple[str, Any] | None:
    import torch

    if isinstance(obj, torch.Tensor):
        return None if all_finite(obj) else (label, obj)
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (label, obj)
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            found = _first_bad(v, f"{label}[{k!r}]")
            if found:
                return found
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = _first_bad(v, f"{label}[{i}]")
            if found:
                return found
    return None


def check_model(loaded: Loaded) -> None:
    """Refuse a model with a NaN or inf in any floating parameter or buffer (once, after loading)."""
    model = loaded.model
    seen: set[int] = set()
    named = [*model.named_parameters(), *model.named_buffers()]
    for name, t in named:
        if id(t) in seen:
            continue
        seen.add(id(t))
        check_tensor(t.detach(), f"the input checkpoint {loaded.source!r}: tensor {name}",
                     "the checkpoint is damaged (or saved after a diverged step); use an intact checkpoint")


def layer_label(stats: LayerStats) -> str:
    return f"block {stats.block_index} {stats.name}"


def check_layer_stats(stats: LayerStats, input_statistics: Iterable[str] = ()) -> None:
    """Refuse non-finite finished statistics of one layer, naming the layer and where they came from.

    Args:
        stats: the layer's finished statistics.
        input_statistics: names collected from the layer's calibration inputs; every other
            statistic is taken to be a gradient statistic.
    """
    from_inputs = set(input_statistics)
    for name in stats:
        value = stats[name]
        if name in from_inputs:
            what = f"{layer_label(stats)}: statistic {name!r} of its calibration inputs (activations)"
            fix = ("the activations overflowed or earlier blocks produce NaN: load in float32 (-o adapter.dtype="
                   "float32), check the input weights, or use other calibration data")
        else:
            what = f"{layer_label(stats)}: gradient statistic {name!r}"
            fix = ("recompute the gradients (--recompute-gradients) in float32 (-o adapter.dtype=float32), "
                   "or check the --gradients file")
        check_tensor(value, what, fix)


def check_scores(scores: torch.Tensor, stats: LayerStats, metric: str) -> None:
    """Refuse non-finite scores: they would sort last and silently decide the mask."""
    check_tensor(scores, f"{layer_label(stats)}: the scores of metric {metric!r}",
                 "the metric divided by zero or overflowed; guard it (e.g. an epsilon), or check its options")


def check_new_weights(weight: torch.Tensor, stats: LayerStats, solver: str) -> None:
    """Refuse non-finite weights written by a solver."""
    check_tensor(weight, f"{layer_label(stats)}: the weights from solver {solver!r}",
                 "the reconstruction diverged; raise its dampening (e.g. -o update.percdamp=0.1) or use --update none")


def check_seqlen(loaded: Loaded, seqlen: int, flag: str = "--seqlen") -> None:
    """Refuse a window longer than the model's context (``loaded.info["context_length"]``, if known)."""
    limit = loaded.info.get("context_length")
    if isinstance(limit, int) and limit > 0 and seqlen > limit:
        raise OptionError(f"{flag} {seqlen} exceeds the context length of this model ({limit} tokens); positions "
                          f"beyond it were never trained: use {flag} {limit} or less")


def effective_fraction(pattern: MaskPattern, shape: tuple[int, int], sparsity: float) -> float | None:
    """The fraction ``pattern`` really prunes in a layer of ``shape`` at ``sparsity`` (None: unknown)."""
    from compresskit.ops import row_prune_count

    group = pattern.structure.group
    out_f, in_f = shape
    if group == "row":
        return row_prune_count(in_f, sparsity) / in_f
    if group == "layer":
        return row_prune_count(out_f * in_f, sparsity) / (out_f * in_f)
    return None


def at_least(x: float) -> str:
    """``x`` rounded *up* to 4 significant digits: a suggested minimum target that still reaches ``x``
    (``1/64 = 0.015625`` shown as ``0.01562`` would prune nothing in a layer of 64 inputs)."""
    import math

    q = 10.0 ** (math.floor(math.log10(x)) - 3)
    return f"{math.ceil(x / q - 1e-9) * q:.4g}"


def rounding_report(adapter: ModelAdapter, model: nn.Module, pattern: MaskPattern, sparsity: float) -> str | None:
    """Say what ``sparsity`` really prunes when rounding loses much of it; None when it is close.

    Raises:
        OptionError: the rounding prunes nothing at all in any layer.
    """
    if sparsity <= 0:
        return None
    layers = [tuple(layer.weight.shape) for b in adapter.blocks(model) for layer in adapter.prunable(b).values()]
    fractions = [(shape, effective_fraction(pattern, shape, sparsity)) for shape in layers]
    known = [(s, f) for s, f in fractions if f is not None]
    weak = [(s, f) for s, f in known if f < sparsity * WEAK_ROUNDING]
    if not weak:
        return None
    total = sum(s[0] * s[1] for s, _ in known)
    overall = sum(s[0] * s[1] * f for s, f in known) / total
    narrow = min(s[1] for s, _ in weak)
    minimum = 1.0 / narrow
    if all(f == 0 for _, f in known):
        more = f"--sparsity {at_least(minimum)} or more, or " if minimum < 1 else ""
        raise OptionError(f"--sparsity {sparsity:g} prunes nothing: each output row prunes floor(in_features x "
                          f"sparsity) weights, which is 0 in every layer (narrowest {narrow} inputs); use {more}"
                          "one threshold per layer (-o pattern.scope=layer)")
    zero = sum(1 for _, f in weak if f == 0)
    if minimum >= 1:  # a layer of one input column: no uniform --sparsity below 1 prunes it
        return (f"--sparsity {sparsity:g} rounds down to floor(in_features x sparsity) weights per output row: "
                f"{len(weak)} of {len(known)} layers prune less than {WEAK_ROUNDING:.0%} of the target ({zero} prune "
                f"nothing; the narrowest has {narrow} input), so the run prunes {overall:.4f} overall instead of "
                f"{sparsity:g}. Use one threshold per layer (-o pattern.scope=layer)")
    return (f"--sparsity {sparsity:g} rounds down to floor(in_features x sparsity) weights per output row: "
            f"{len(weak)} of {len(known)} layers prune less than {WEAK_ROUNDING:.0%} of the target ({zero} prune "
            f"nothing), so the run prunes {overall:.4f} overall instead of {sparsity:g}. Use --sparsity "
            f"{at_least(minimum)} or more, or one threshold per layer (-o pattern.scope=layer)")


def finite_result(result: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``(copy with every non-finite float replaced by None, dotted keys that were non-finite)``."""
    bad: list[str] = []

    def clean(obj: Any, key: str) -> Any:
        if isinstance(obj, float) and not math.isfinite(obj):
            bad.append(key)
            return None
        if isinstance(obj, Mapping):
            return {k: clean(v, f"{key}.{k}" if key else str(k)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v, f"{key}[{i}]") for i, v in enumerate(obj)]
        return obj

    return clean(result, ""), bad



def map_rounding_report(pattern: MaskPattern, layers: list[tuple[str, tuple[int, int], float]]) -> str | None:
    """What a sparsity map's per-layer targets really prune after rounding (``layers``: label, shape,
    target); None when every layer gets at least ``WEAK_ROUNDING`` of its target.

    The same target rounds differently in layers of different widths (floor(in_features x target)
    per output row), so a map is checked layer by layer: a layer whose target rounds to nothing is
    refused (the map asked for pruning there), weaker rounding is warned about.

    Raises:
        OptionError: a layer with a positive target prunes nothing; names it and the smallest target that prunes.
    """
    weak = []
    for label, shape, target in layers:
        if target <= 0:
            continue
        f = effective_fraction(pattern, shape, target)
        if f is None or f >= target * WEAK_ROUNDING:
            continue
        if f == 0:
            unit = 1.0 / (shape[1] if pattern.structure.group == "row" else shape[0] * shape[1])
            fix = (f"give it {at_least(unit)} or more in the map, or " if unit < 1 else "give it 0 in the map, or use ")
            raise OptionError(f"sparsity map: layer {label} {shape[0]}x{shape[1]} has target {target:g}, which prunes "
                              f"nothing (floor(in_features x target) = 0 weights per output row); {fix}one threshold "
                              "per layer (-o pattern.scope=layer)")
        weak.append(f"{label} {target:g} -> {f:.4f}")
    if not weak:
        return None
    return (f"sparsity map: {len(weak)} layers prune less than {WEAK_ROUNDING:.0%} of their target after rounding "
            f"to whole weights per output row ({'; '.join(weak[:5])}{'; ...' if len(weak) > 5 else ''}); raise "
            "their targets or use one threshold per layer (-o pattern.scope=layer)")
