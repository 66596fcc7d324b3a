"""Conformance checks for the plugins that decide masks: metrics, statistics, patterns, solvers.

Each check verifies the rules of one interface (see docs/plugins/testing.md) on small seeded
tensors, with the default options and with ``options=`` you pass, then prunes ``random:tiny``
end to end through :func:`compresskit.api.prune`.
"""

from __future__ import annotations

from typing import Any

from compresskit import stats as st
from compresskit.errors import CompressKitError, IncompatiblePatternError
from compresskit.interfaces import MaskPattern, ScoreMetric, Solver
from compresskit.engine.registry import Registry
from compresskit.testing._base import PluginConformanceError, _check_class, _end_to_end, _fail, _instance, _registry_with
from compresskit.testing.factories import fresh_registry, random_inputs, random_linear

__all__ = ["PluginConformanceError", "check_metric", "check_pattern", "check_solver", "check_statistic"]


# --------------------------------------------------------------------------- statistics


def _parts(stat: st.Statistic, layer, chunks) -> st.Parts:
    parts = stat.init(layer)
    for x in chunks:
        if stat.source == "inputs":
            stat.update(parts, x.clone())
        else:
            for g in x:  # one "sample gradient" per row, shaped like the weight
                stat.fold(parts, g.reshape(layer.weight.shape))
    return parts


def _same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def check_statistic(cls_for_messages: type, stat: st.Statistic) -> None:
    """A statistic's parts are sums: one batch == two batches merged == reversed; update changes them."""
    import torch

    layer = random_linear()
    shape = (8, layer.in_features) if stat.source == "inputs" else (3, layer.weight.numel())
    x = random_inputs(tokens=shape[0], in_features=shape[1], seed=2).abs() + 0.1
    first, second = x[: shape[0] // 2], x[shape[0] // 2:]
    one = _parts(stat, layer, [x])
    halves = st.merge(_parts(stat, layer, [first]), _parts(stat, layer, [second]))
    seq = _parts(stat, layer, [first, second])
    rev = _parts(stat, layer, [second, first])
    if not all(isinstance(v, torch.Tensor) for _, v in st.leaves(one)):
        _fail(cls_for_messages, f"statistic {stat.name!r}: init() parts must be tensors", "keep counts as 0-d tensors")
    if all(torch.equal(v, w) for (_, v), (_, w) in zip(st.leaves(one), st.leaves(stat.init(layer)))):
        _fail(cls_for_messages, f"statistic {stat.name!r}: update() did not change its parts",
              "fold the inputs into the parts in place (e.g. parts['sum'] += x.pow(2).sum(0))")
    if not _same(stat.finish(one), stat.finish(seq)):
        _fail(cls_for_messages, f"statistic {stat.name!r} is not additive: update() does not accumulate (two "
              "batches folded one after the other differ from the same inputs folded at once; the second replaced "
              "the first?)",
              "add into the parts in place (parts['sum'] += ...), never assign them")
    for label, other in (("two batches merged", halves), ("reversed order", rev)):
        if not _same(stat.finish(one), stat.finish(other)):
            _fail(cls_for_messages, f"statistic {stat.name!r} is not additive ({label} differ from one batch)",
                  "accumulate sums (and counts) rather than per-batch means")


def _layer_stats(metric_or_solver: Any, layer, extra: dict[str, Any] | None = None) -> st.LayerStats:
    specs = st.resolve(metric_or_solver.statistics())
    x = random_inputs(tokens=8, in_features=layer.in_features)
    values = {}
    for s in specs:
        data = [x] if s.source == "inputs" else [random_inputs(tokens=3, in_features=layer.weight.numel(), seed=5)]
        values[s.name] = s.finish(_parts(s, layer, data))
    return st.LayerStats({**values, **(extra or {})}, 0, "probe", tokens=8, samples=8)


# --------------------------------------------------------------------------- metrics


def check_metric(cls: type, registry: Registry | None = None, end_to_end: bool = True, adapter: str = "llama",
                 pattern: str = "unstructured", options: dict[str, Any] | None = None) -> list[str]:
    """Check a :class:`~compresskit.interfaces.ScoreMetric` subclass against its contract.

    Checks: class attributes and typed ``Options`` (defaults and ``options``); every statistic
    it names exists and is additive (``update`` changes the parts and accumulates: two batches
    folded in turn == one batch == two merged == reversed); ``score`` returns finite float scores of the weight's shape without modifying the
    weight (or, for a ``mask_solver`` metric, ``select`` returns a boolean mask and the solver
    exists); and, unless ``end_to_end`` is False, a real run on ``random:tiny`` with ``options``.

    Returns:
        Names of the checks that passed.

    Raises:
        PluginConformanceError: on the first broken rule.
    """
    import torch

    passed = _check_class(cls, ScoreMetric, options)
    metric = _instance(cls, options)
    try:
        specs = st.resolve(metric.statistics())
    except CompressKitError as exc:
        _fail(cls, f"statistics() is invalid ({exc})", "name built-in statistics or return Statistic instances")
    for s in specs:
        check_statistic(cls, s)
    passed.append("statistics additive")
    layer = random_linear()
    weight = layer.weight.detach().clone()
    if metric.mask_solver is None:
        if type(metric).score is ScoreMetric.score:
            _fail(cls, "defines neither score() nor mask_solver", "implement score(weight, stats)")
        scores = metric.score(weight, _layer_stats(metric, layer))
        if not torch.equal(weight, layer.weight.detach()):
            _fail(cls, "score() modified the weight it was given", "work on weight.abs()/clones, never in place")
        if not isinstance(scores, torch.Tensor) or scores.shape != weight.shape or not scores.is_floating_point():
            _fail(cls, f"score() returned {getattr(scores, 'shape', type(scores))}, not a float tensor of shape "
                  f"{tuple(weight.shape)}", "return one importance value per weight")
        if not torch.isfinite(scores).all():
            _fail(cls, "score() returned non-finite values", "guard divisions (e.g. add an epsilon)")
        passed.append("score shape/finite/no mutation")
    else:
        reg = registry or fresh_registry()
        try:
            reg.get("solver", metric.mask_solver)
        except KeyError:
            _fail(cls, f"mask_solver {metric.mask_solver!r} is not a registered solver", "name an installed solver")
        saliency = weight.pow(2)
        mask = metric.select(saliency, _ProbeRowPattern(), 0.5)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != weight.shape:
            _fail(cls, "select() must return a boolean mask of the saliencies' shape", "return pattern.mask(...)")
        passed.append("select mask")
    if end_to_end:
        reg = _registry_with("metric", cls, registry)
        _end_to_end(cls, reg, adapter=adapter, metric=cls.name, pattern=pattern, sparsity=0.5,
                    metric_options=dict(options or {}))
        passed.append(f"end-to-end prune ({adapter}, {pattern})")
    return passed


class _ProbeRowPattern(MaskPattern):
    """Lowest half per row, stable; used to probe metrics and solvers without a registry."""

    name = "probe_rows"
    summary = "test probe"

    @property
    def structure(self):
        from compresskit.interfaces import Structure

        return Structure("row")

    def mask(self, scores, sparsity):
        from compresskit.ops import lowest_mask

        return lowest_mask(scores, int(scores.shape[-1] * sparsity))


# --------------------------------------------------------------------------- patterns


def _expected_count(structure, out_f: int, in_f: int, s: float) -> tuple[int, float]:
    """(exact number pruned or -1 when only a tolerance applies, tolerance on the fraction)."""
    from compresskit.ops import row_prune_count

    if structure.group == "row":
        return out_f * row_prune_count(in_f, s), 0.0
    if structure.group == "layer":
        return row_prune_count(out_f * in_f, s), 0.0
    if structure.group == "nm":
        return out_f * in_f * structure.n // structure.m, 0.0
    return -1, 1.0 / in_f + 2e-3


def check_pattern(cls: type, registry: Registry | None = None, end_to_end: bool = True, metric: str = "wanda",
                  adapter: str = "llama", options: dict[str, Any] | None = None) -> list[str]:
    """Check a :class:`~compresskit.interfaces.MaskPattern` subclass against its contract.

    Checks: class attributes and typed ``Options`` (defaults and ``options``); ``structure`` is a
    :class:`~compresskit.interfaces.Structure`; on a probe whose width fits the structure,
    ``mask`` returns a boolean tensor of the scores' shape without modifying them, prunes the
    count its structure promises (per row, per layer, ``n`` per aligned group of ``m``; within
    rounding otherwise) and is monotone; for every pattern, ``check`` accepts the probe at each
    tested sparsity and refuses only with :class:`~compresskit.errors.IncompatiblePatternError`
    (never another exception): a contradicting sparsity (patterns that fix their own) and an
    indivisible width (any structure grouping ``m > 1`` columns); and an end-to-end prune.

    Returns:
        Names of the checks that passed.

    Raises:
        PluginConformanceError: on the first broken rule.
    """
    import torch

    from compresskit.interfaces import Structure

    passed = _check_class(cls, MaskPattern, options)
    pattern = _instance(cls, options)
    structure = pattern.structure
    if not isinstance(structure, Structure):
        _fail(cls, "structure is not a compresskit.Structure", "return Structure('row') (or 'layer', 'nm', ...)")
    implied = pattern.implied_sparsity
    out_f, in_f = 16, 64 * (structure.m if structure.m and 64 % structure.m else 1)
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(out_f, in_f, generator=g)
    for s in [implied] if implied is not None else [0.25, 0.5, 0.75]:
        try:
            pattern.check("probe", (out_f, in_f), s)
        except IncompatiblePatternError as exc:
            _fail(cls, f"check() rejected a {out_f}x{in_f} probe at sparsity {s} ({exc})", "accept layers that fit")
        except Exception as exc:
            _fail(cls, f"check() raised {type(exc).__name__} on a {out_f}x{in_f} probe at sparsity {s} ({exc})",
                  "accept layers that fit; refuse others only with IncompatiblePatternError")
        before = scores.clone()
        mask = pattern.mask(scores, s)
        if not torch.equal(before, scores):
            _fail(cls, "mask() modified the scores", "never write into the scores tensor")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != scores.shape:
            _fail(cls, "mask() must return a bool tensor of the scores' shape", "return e.g. scores < threshold")
        exact, tol = _expected_count(structure, out_f, in_f, s)
        got = int(mask.sum())
        if (exact >= 0 and got != exact) or (exact < 0 and abs(got / mask.numel() - s) > tol):
            _fail(cls, f"mask() pruned {got / mask.numel():.4f} of the weights at sparsity {s} (structure "
                  f"{structure.group!r})", "prune floor(sparsity * group size) weights per comparison group")
        if structure.group == "nm" and not (mask.reshape(out_f, -1, structure.m).sum(-1) == structure.n).all():
            _fail(cls, f"mask() does not prune exactly {structure.n} in every aligned group of {structure.m}",
                  "take the n lowest scores of each group of m consecutive input columns")
        kept, pruned = (~mask).nonzero()[0].tolist(), mask.nonzero()[0].tolist()
        up, down = scores.clone(), scores.clone()
        up[tuple(kept)] = scores.max() + 1.0
        down[tuple(pruned)] = scores.min() - 1.0
        if pattern.mask(up, s)[tuple(kept)] or not pattern.mask(down, s)[tuple(pruned)]:
            _fail(cls, "mask() is not monotone in the scores", "prune the lowest scores (higher score = keep)")
    passed.append("mask shape/dtype/count/monotone")
    if implied is not None:
        _expect_incompatible(cls, pattern, "probe", (out_f, in_f), min(implied + 0.1, 0.95), "a contradicting sparsity")
    if structure.m > 1:  # any pattern grouping m input columns (N:M or a third-party group)
        _expect_incompatible(cls, pattern, "probe_layer", (out_f, structure.m * 4 + 1), implied if implied is not None
                             else 0.5, "an indivisible width")
    passed.append("check")
    if end_to_end:
        reg = _registry_with("pattern", cls, registry)
        _end_to_end(cls, reg, adapter=adapter, metric=metric, pattern=cls.name, sparsity=implied,
                    pattern_options=dict(options or {}))
        passed.append(f"end-to-end prune ({adapter}, {metric})")
    return passed


def _expect_incompatible(cls, pattern, layer, shape, sparsity, what) -> None:
    try:
        pattern.check(layer, shape, sparsity)
    except IncompatiblePatternError as exc:
        if layer != "probe" and layer not in str(exc):
            _fail(cls, f"check() error for {what} does not name the layer", "include layer_name in the message")
        return
    except Exception as exc:
        _fail(cls, f"check() raised {type(exc).__name__} for {what} ({exc})",
              "raise IncompatiblePatternError naming the layer and the fix")
    _fail(cls, f"check() accepted {what}", "raise IncompatiblePatternError naming the layer and the fix")


# --------------------------------------------------------------------------- solvers


def check_solver(cls: type, registry: Registry | None = None, end_to_end: bool = True, metric: str = "wanda",
                 options: dict[str, Any] | None = None) -> list[str]:
    """Check a :class:`~compresskit.interfaces.Solver` subclass against its contract.

    Checks: class attributes and typed ``Options``; its statistics are additive; ``solve`` on a
    probe layer returns finite float32 weights of the weight's shape, zero wherever the mask
    prunes, without modifying its inputs, and with a reconstruction error (from the ``gram``
    statistic) no larger than plain masking; and an end-to-end prune with ``--update`` it.

    Raises:
        PluginConformanceError: on the first broken rule.
    """
    import torch

    from compresskit.ops import lowest_mask, reconstruction_error

    passed = _check_class(cls, Solver, options)
    solver = _instance(cls, options)
    for s in st.resolve(solver.statistics()):
        check_statistic(cls, s)
    layer = random_linear(out_features=16, in_features=32)
    x = random_inputs(tokens=64, in_features=32)
    gram = x.t() @ x
    stats = _layer_stats(solver, layer, {"gram": gram})
    weight = layer.weight.detach().clone()
    mask = lowest_mask(weight.abs(), 16)
    given_weight, given_mask, given_gram = weight.clone(), mask.clone(), gram.clone()
    new = solver.solve(given_weight, given_mask, stats)
    if not (torch.equal(given_weight, weight) and torch.equal(given_mask, mask) and torch.equal(gram, given_gram)):
        _fail(cls, "solve() modified the weight, mask or statistics it was given", "work on a clone, never in place")
    if not isinstance(new, torch.Tensor) or new.shape != weight.shape or not torch.isfinite(new).all():
        _fail(cls, "solve() must return finite weights of the weight's shape", "return the reconstructed weight")
    if new.dtype != weight.dtype:
        _fail(cls, f"solve() returned {new.dtype} weights for a {weight.dtype} layer",
              "return the weight's dtype (float32 here; cast back after computing in another precision)")
    if new[mask].any():
        _fail(cls, "solve() left pruned weights non-zero", "zero the entries where mask is True")
    plain = reconstruction_error(weight, weight.masked_fill(mask, 0.0), gram)
    if reconstruction_error(weight, new, gram) > plain * (1 + 1e-4) + 1e-9:
        _fail(cls, "solve() reconstructs the layer output worse than plain masking", "minimise ||WX - W'X||")
    passed.append("solve")
    if end_to_end:
        reg = _registry_with("solver", cls, registry)
        _end_to_end(cls, reg, metric=metric, update=cls.name, update_options=dict(options or {}))
        passed.append(f"end-to-end prune ({metric})")
    return passed
