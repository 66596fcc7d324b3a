"""Every public ``check_*`` rejects a deliberately broken plugin of its kind with the documented message.

``tests/test_testing.py`` runs the checks on the built-ins (they must pass); here each rule a check
documents (docs/plugins/testing.md, the checks' docstrings) is broken once on purpose and the
check must raise :class:`PluginConformanceError` naming that rule.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from compresskit import hookimpl
from compresskit.errors import IncompatiblePatternError
from compresskit.interfaces import Allocation, MaskPattern, ScoreMetric, Solver, Structure
from compresskit.ops import lowest_mask
from compresskit.stats import Statistic
from compresskit.testing import (
    PluginConformanceError,
    check_adapter,
    check_allocation,
    check_hooks,
    check_metric,
    check_pattern,
    check_solver,
    check_statistic,
)
from compresskit.testing._base import ADAPTIVE_SLACK, rounding
from compresskit_plugins.adapters.llama import LlamaAdapter


def _rejects(match: str, check, *args, **kwargs) -> None:
    with pytest.raises(PluginConformanceError, match=match):
        check(*args, **kwargs)


# ---- check_statistic ---------------------------------------------------------------------


class _Replaces(Statistic):
    """Assigns instead of adding: a second batch replaces the first."""

    name = "replaces"

    def init(self, layer):
        return {"s": torch.zeros(layer.in_features)}

    def update(self, parts, x):
        parts["s"].copy_(x.pow(2).sum(0))


class _FloatPart(Statistic):
    """Keeps a Python float among its parts."""

    name = "float_part"

    def init(self, layer):
        return {"s": torch.zeros(layer.in_features), "n": 0.0}

    def update(self, parts, x):
        parts["s"] += x.pow(2).sum(0)


class _NoOp(Statistic):
    """Forgets to fold anything."""

    name = "noop"

    def init(self, layer):
        return {"s": torch.zeros(layer.in_features)}


@pytest.mark.parametrize("stat, match", [(_Replaces(), "is not additive: update\\(\\) does not accumulate"),
                                         (_FloatPart(), "init\\(\\) parts must be tensors"),
                                         (_NoOp(), "update\\(\\) did not change its parts")])
def test_check_statistic_rejects(stat, match):
    _rejects(match, check_statistic, type(stat), stat)


# ---- check_metric ------------------------------------------------------------------------


class _Metric(ScoreMetric):
    """A metric for negative tests (this one is correct)."""

    name = "broken_metric"
    summary = "broken on purpose"

    def statistics(self):
        return ("act_sq",)

    def score(self, weight, stats):
        return weight.abs() * stats["act_sq"].sqrt()


def test_check_metric_accepts_the_unbroken_base():
    check_metric(_Metric, end_to_end=False)


class _WrongShape(_Metric):
    """One score per row."""

    def score(self, weight, stats):
        return weight.abs().sum(1)


class _IntScores(_Metric):
    """Integer scores."""

    def score(self, weight, stats):
        return (weight.abs() * 100).long()


class _NoScore(ScoreMetric):
    """Neither score() nor a mask solver."""

    name = "no_score"
    summary = "broken"


class _UnknownSolver(_Metric):
    """Names a mask solver nobody registered."""

    mask_solver = "no_such_solver"


class _Upper(_Metric):
    """Upper-case name."""

    name = "Broken"


class _NoSummary(_Metric):
    """No summary."""

    summary = " "


class _NoDoc(_Metric):
    pass


class _MutableOptions(_Metric):
    """Options not frozen."""

    @dataclasses.dataclass
    class Options:
        alpha: float = dataclasses.field(default=1.0, metadata={"help": "x"})


class _DropsOptions(_Metric):
    """Forgets super().__init__(options)."""

    def __init__(self, options=None):
        self.options = None


@pytest.mark.parametrize("cls, match", [
    (_WrongShape, "score\\(\\) returned .* not a float tensor of shape"),
    (_IntScores, "not a float tensor"),
    (_NoScore, "defines neither score\\(\\) nor mask_solver"),
    (_UnknownSolver, "mask_solver 'no_such_solver' is not a registered solver"),
    (_Upper, "is not a lowercase registry key"),
    (_NoSummary, "has no `summary`"),
    (_NoDoc, "has no docstring"),
    (_MutableOptions, "Options is not a frozen dataclass"),
    (_DropsOptions, "does not store its Options instance"),
    (int, "does not subclass ScoreMetric"),
])
def test_check_metric_rejects(cls, match):
    _rejects(match, check_metric, cls, end_to_end=False)


# ---- check_pattern -----------------------------------------------------------------------


class _Row(MaskPattern):
    """Lowest half per row (correct)."""

    name = "broken_rows"
    summary = "broken on purpose"

    @property
    def structure(self):
        return Structure("row")

    def mask(self, scores, sparsity):
        return lowest_mask(scores, int(scores.shape[-1] * sparsity))


def test_check_pattern_accepts_the_unbroken_base():
    check_pattern(_Row, end_to_end=False)


class _WritesScores(_Row):
    """Sorts the scores in place."""

    def mask(self, scores, sparsity):
        m = super().mask(scores, sparsity)
        scores.mul_(2)
        return m


class _FloatMask(_Row):
    """Returns 0/1 floats."""

    def mask(self, scores, sparsity):
        return super().mask(scores, sparsity).float()


class _OneFewer(_Row):
    """Prunes one weight fewer per row than the floor."""

    def mask(self, scores, sparsity):
        return lowest_mask(scores, int(scores.shape[-1] * sparsity) - 1)


class _Misaligned(_Row):
    """Says 2:4 but prunes the lowest half of each row, ignoring the groups."""

    @property
    def structure(self):
        return Structure("nm", 2, 4)

    def check(self, layer_name, shape, sparsity):
        if sparsity is not None and abs(sparsity - 0.5) > 1e-9:
            raise IncompatiblePatternError(f"{layer_name}: 2:4 implies 0.5")
        if shape[1] % 4:
            raise IncompatiblePatternError(f"{layer_name}: width {shape[1]} is not a multiple of 4")


class _CheckRaisesValueError(_Misaligned):
    """Refuses with a plain ValueError."""

    def check(self, layer_name, shape, sparsity):
        if sparsity is not None and abs(sparsity - 0.5) > 1e-9:
            raise IncompatiblePatternError(f"{layer_name}: 2:4 implies 0.5")
        if shape[1] % 4:
            raise ValueError("bad width")

    def mask(self, scores, sparsity):  # 2 lowest of every aligned group of 4 (correct)
        groups = scores.reshape(scores.shape[0], -1, 4)
        idx = torch.topk(groups, 2, dim=-1, largest=False)[1]
        return torch.zeros_like(groups, dtype=torch.bool).scatter(-1, idx, True).reshape(scores.shape)


class _AcceptsAnyWidth(_CheckRaisesValueError):
    """Never refuses anything."""

    def check(self, layer_name, shape, sparsity):
        return None


class _ErrorWithoutLayer(_CheckRaisesValueError):
    """Refuses an indivisible width without naming the layer."""

    def check(self, layer_name, shape, sparsity):
        if sparsity is not None and abs(sparsity - 0.5) > 1e-9:
            raise IncompatiblePatternError(f"{layer_name}: 2:4 implies 0.5")
        if shape[1] % 4:
            raise IncompatiblePatternError("width is not a multiple of 4")


@pytest.mark.parametrize("cls, match", [
    (_WritesScores, "mask\\(\\) modified the scores"),
    (_FloatMask, "must return a bool tensor of the scores' shape"),
    (_OneFewer, "mask\\(\\) pruned 0.2344 of the weights at sparsity 0.25"),
    (_Misaligned, "does not prune exactly 2 in every aligned group of 4"),
    (_CheckRaisesValueError, "check\\(\\) raised ValueError for an indivisible width"),
    (_AcceptsAnyWidth, "check\\(\\) accepted a contradicting sparsity"),
    (_ErrorWithoutLayer, "error for an indivisible width does not name the layer"),
])
def test_check_pattern_rejects(cls, match):
    _rejects(match, check_pattern, cls, end_to_end=False)


# ---- check_solver ------------------------------------------------------------------------


class _Solver(Solver):
    """Plain masking (correct)."""

    name = "broken_solver"
    summary = "broken on purpose"

    def solve(self, weight, mask, stats):
        return weight.masked_fill(mask, 0.0)


def test_check_solver_accepts_the_unbroken_base():
    check_solver(_Solver, end_to_end=False)


class _KeepsPruned(_Solver):
    """Returns the weight unchanged."""

    def solve(self, weight, mask, stats):
        return weight.clone()


class _NaN(_Solver):
    """Divides by zero."""

    def solve(self, weight, mask, stats):
        return weight.masked_fill(mask, 0.0) / 0.0


class _Float64(_Solver):
    """Computes in float64 and forgets to cast back."""

    def solve(self, weight, mask, stats):
        return weight.double().masked_fill(mask, 0.0)


class _InPlace(_Solver):
    """Zeros the given weight in place."""

    def solve(self, weight, mask, stats):
        return weight.masked_fill_(mask, 0.0)


class _Worse(_Solver):
    """Halves every kept weight."""

    def solve(self, weight, mask, stats):
        return weight.masked_fill(mask, 0.0) * 0.5


class _MissesInRealLayers(_Solver):
    """Correct on the 32-wide probe, but zeros 8 more weights per row of a real (64-wide) layer."""

    def solve(self, weight, mask, stats):
        new = weight.masked_fill(mask, 0.0)
        if weight.shape[1] == 64:
            new[:, :8] = 0.0
        return new


@pytest.mark.parametrize("cls, match", [
    (_KeepsPruned, "left pruned weights non-zero"),
    (_NaN, "must return finite weights"),
    (_Float64, "returned torch.float64 weights for a torch.float32 layer"),
    (_InPlace, "modified the weight, mask or statistics it was given"),
    (_Worse, "reconstructs the layer output worse than plain masking"),
])
def test_check_solver_rejects(cls, match):
    _rejects(match, check_solver, cls, end_to_end=False)


def test_the_end_to_end_prune_rejects_a_layer_that_misses_its_target():
    _rejects(r"end-to-end sparsity 0\.\d+ of layer 0\.\S+ misses its target 0\.5000 by more than the rounding "
             "of its 'row' groups", check_solver, _MissesInRealLayers)


# ---- check_allocation and check_hooks -----------------------------------------------------


class _Allocation(Allocation):
    """Uniform (correct)."""

    name = "broken_allocation"
    summary = "broken on purpose"


def test_check_allocation_accepts_the_unbroken_base():
    check_allocation(_Allocation)


class _AllOrNothing(_Allocation):
    """Prunes whole MLP layers (a target of 1.0)."""

    def sparsity(self, run, block_index, layer_name):
        return 1.0 if layer_name.startswith("mlp.") else None


class _Negative(_Allocation):
    """A negative target."""

    def sparsity(self, run, block_index, layer_name):
        return -0.1


@pytest.mark.parametrize("cls, got", [(_AllOrNothing, "1.0"), (_Negative, "-0.1")])
def test_check_allocation_rejects_targets_outside_0_1(cls, got):
    _rejects(rf"a target is outside \[0, 1\) \(the target of layer 0\.\S+ must be in \[0, 1\), got {got}",
             check_allocation, cls)


def test_check_hooks_rejects_a_target_that_is_not_reached(monkeypatch):
    """A run whose layers stop two weights per row short of the hook's target (the report is altered:
    the runner itself always reaches a pattern's count)."""
    import types

    mod = types.ModuleType("promises_more")

    @hookimpl
    def layer_sparsity(run, block_index, layer_name):
        return 0.25

    mod.layer_sparsity = layer_sparsity
    assert check_hooks(mod) == ["registers", "targets achieved"]

    import compresskit.api as api

    original = api.prune

    def under_pruned(**kwargs):
        result = original(**kwargs)
        for row in result.report.layers:
            row.sparsity = row.target - 2.0 / row.shape[1]
        return result

    monkeypatch.setattr(api, "prune", under_pruned)
    _rejects(r"layer 0\.\S+ reached 0\.\d+, not its target 0\.2500", check_hooks, mod)


# ---- check_adapter -----------------------------------------------------------------------


class _Adapter(LlamaAdapter):
    """The llama adapter under another name (correct)."""

    name = "broken_llama"
    summary = "broken on purpose"


class _TrainMode(_Adapter):
    """Leaves the model in training mode."""

    def load(self, source):
        loaded = super().load(source)
        loaded.model.train()
        return loaded


class _NoBlocks(_Adapter):
    """Finds no blocks."""

    def blocks(self, model):
        return []


class _GroupsMissLayer(_Adapter):
    """Its groups forget the MLP's down projection."""

    def groups(self, block):
        return [[n for n in grp if n != "mlp.down_proj"] for grp in super().groups(block)]


class _UnseededCalibration(_Adapter):
    """Draws calibration samples from the global random state."""

    def calibration_batches(self, loaded, nsamples, seqlen, seed, data):
        return [{"input_ids": torch.randint(0, 256, (1, seqlen))} for _ in range(nsamples)]


class _ReversedBlocks(_Adapter):
    """Returns the blocks in reverse execution order."""

    def blocks(self, model):
        return list(reversed(list(super().blocks(model))))


class _SavesNothing(_Adapter):
    """Writes no files."""

    def save(self, loaded, directory):
        return None


class _LossWithoutGraph(_Adapter):
    """Returns a detached loss."""

    def loss(self, model, batch):
        return super().loss(model, batch).detach()


def test_check_adapter_accepts_the_unbroken_base():
    check_adapter(_Adapter, end_to_end=False)


@pytest.mark.parametrize("cls, match", [
    (_TrainMode, "must return a Loaded with an eval-mode nn.Module"),
    (_NoBlocks, "blocks\\(\\) returned no blocks"),
    (_GroupsMissLayer, "groups\\(block 0\\) does not cover each prunable layer exactly once"),
    (_UnseededCalibration, "identical for the same seed"),
    (_ReversedBlocks, "replaying captured block-0 inputs through the blocks differs from the plain forward"),
    (_LossWithoutGraph, "loss\\(\\) must return a finite scalar tensor with a graph"),
    (_SavesNothing, "save\\(\\) wrote nothing"),
])
def test_check_adapter_rejects(cls, match):
    _rejects(match, check_adapter, cls, end_to_end=False)


# ---- the tolerance the docs promise --------------------------------------------------------


def test_end_to_end_tolerance_is_the_rounding_of_the_comparison_group():
    """Row and N:M: less than one weight per row; layer: one weight of the matrix; adaptive: Wanda's
    bisection gives no bound, so a documented slack; a third-party group of width m: m weights per row."""
    assert rounding({"group": "row"}, (16, 64)) == 1 / 64
    assert rounding({"group": "nm", "n": 2, "m": 4}, (16, 64)) == 1 / 64
    assert rounding({"group": "layer"}, (16, 64)) == 1 / 1024
    assert rounding({"group": "adaptive"}, (16, 64)) == 1 / 64 + ADAPTIVE_SLACK
    assert rounding({"group": "tiles", "m": 8}, (16, 64)) == 8 / 64
