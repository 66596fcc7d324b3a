"""The public conformance checks, run on every registered built-in and on broken plugins."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from compresskit import hookimpl
from compresskit.interfaces import MaskPattern, ScoreMetric
from compresskit.options import option
from compresskit.testing import (
    PluginConformanceError,
    check_adapter,
    check_metric,
    check_pattern,
    fresh_registry,
    random_model,
    registry_names,
)

REGISTRY = fresh_registry()


@pytest.mark.parametrize("name", registry_names("metric", REGISTRY))
def test_builtin_metric_conforms(name):
    passed = check_metric(REGISTRY.get("metric", name).cls, registry=REGISTRY)
    assert "update batch-size and order independence" in passed
    assert any(p.startswith("end-to-end") for p in passed)


@pytest.mark.parametrize("name", registry_names("pattern", REGISTRY))
def test_builtin_pattern_conforms(name):
    passed = check_pattern(REGISTRY.get("pattern", name).cls, registry=REGISTRY)
    assert "mask shape/dtype/count/monotone" in passed


@pytest.mark.parametrize("name", registry_names("adapter", REGISTRY))
def test_builtin_adapter_conforms(name):
    from compresskit.errors import MissingDependencyError

    try:
        passed = check_adapter(REGISTRY.get("adapter", name).cls, registry=REGISTRY)
    except MissingDependencyError as exc:  # e.g. the vit extra (timm) is not installed
        pytest.skip(str(exc))
    assert "capture and replay" in passed


def test_fresh_registry_is_isolated_and_takes_modules():
    import types

    mod = types.ModuleType("throwaway_plugin")

    class Half(ScoreMetric):
        """Test metric."""

        name = "throwaway"
        summary = "test"
        needs_calibration = False

        def score(self, weight, state, grad):
            return weight.abs()

    @hookimpl
    def register_metrics(register):
        register(Half)

    mod.register_metrics = register_metrics
    reg = fresh_registry(mod, builtins=False)
    assert registry_names("metric", reg) == ["throwaway"]
    assert registry_names("pattern", reg) == []
    assert "throwaway" not in registry_names("metric", fresh_registry())
    assert check_metric(Half, end_to_end=False)


def test_random_model_is_seeded():
    a, _ = random_model("tiny", seed=3)
    b, _ = random_model("tiny", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ---- the checks must catch broken plugins ------------------------------------------------


class _Base(ScoreMetric):
    """A metric for negative tests."""

    name = "broken"
    summary = "broken on purpose"

    def init_state(self, layer):
        return {"sq": torch.zeros(layer.in_features), "n": 0}

    def update(self, state, inputs):
        state["sq"] += inputs.pow(2).sum(0)
        state["n"] += inputs.shape[0]

    def score(self, weight, state, grad):
        return weight.abs() * state["sq"].sqrt()


def test_good_base_passes():
    check_metric(_Base, end_to_end=False)


def test_catches_weight_mutation():
    class Mutates(_Base):
        """Mutates."""

        def score(self, weight, state, grad):
            return weight.abs_()

    with pytest.raises(PluginConformanceError, match="modified the weight"):
        check_metric(Mutates, end_to_end=False)


def test_catches_batch_size_dependence():
    class PerBatchMean(_Base):
        """Averages per batch, so two batches of 4 differ from one of 8."""

        def update(self, state, inputs):
            state["sq"] = inputs.pow(2).mean(0) + state["sq"] * 0.5

    with pytest.raises(PluginConformanceError, match="batch-size/order independent"):
        check_metric(PerBatchMean, end_to_end=False)


def test_catches_missing_help_and_default():
    class NoHelp(_Base):
        """No help."""

        @dataclasses.dataclass(frozen=True)
        class Options:
            alpha: float = 1.0

    with pytest.raises(PluginConformanceError, match="no help text"):
        check_metric(NoHelp, end_to_end=False)

    class NoDefault(_Base):
        """No default."""

        @dataclasses.dataclass(frozen=True)
        class Options:
            alpha: float = dataclasses.field(metadata={"help": "x"})

    with pytest.raises(PluginConformanceError, match="no default"):
        check_metric(NoDefault, end_to_end=False)


def test_catches_non_finite_scores():
    class Divides(_Base):
        """Divides by zero."""

        def score(self, weight, state, grad):
            return weight.abs() / torch.zeros_like(weight)

    with pytest.raises(PluginConformanceError, match="non-finite"):
        check_metric(Divides, end_to_end=False)


def test_catches_bad_pattern_count_and_monotonicity():
    class Greedy(MaskPattern):
        """Prunes the lowest 10 percent, whatever the sparsity."""

        name = "greedy"
        summary = "wrong count"

        def mask(self, scores, sparsity):
            return scores < scores.quantile(0.1)

    with pytest.raises(PluginConformanceError, match="pruned"):
        check_pattern(Greedy, end_to_end=False)

    class Inverted(MaskPattern):
        """Prunes the highest scores."""

        name = "inverted"
        summary = "wrong direction"

        def mask(self, scores, sparsity):
            k = int(scores.shape[-1] * sparsity)
            idx = torch.sort(scores, dim=-1, descending=True)[1][..., :k]
            return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)

    with pytest.raises(PluginConformanceError, match="monotone"):
        check_pattern(Inverted, end_to_end=False)


def test_catches_pattern_without_check():
    from compresskit_plugins.patterns.nm import NMPattern

    class NoCheck(NMPattern):
        """N:M that forgets to validate."""

        name = "nocheck"

        def check(self, layer_name, weight_shape, sparsity):
            return None

    with pytest.raises(PluginConformanceError, match="check\\(\\) accepted"):
        check_pattern(NoCheck, end_to_end=False)


def test_end_to_end_catches_wrong_sparsity():
    class Keeps(MaskPattern):
        """Never prunes, but its unit probe lies about the count: caught end to end."""

        name = "keeps_all"
        summary = "prunes nothing"

        @dataclasses.dataclass(frozen=True)
        class Options:
            probe: bool = option(True, "behave during the unit probe")

        def mask(self, scores, sparsity):
            if scores.shape == (16, 64):
                k = int(scores.shape[-1] * sparsity)
                idx = torch.sort(scores, dim=-1, stable=True)[1][..., :k]
                return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)
            return torch.zeros_like(scores, dtype=torch.bool)

    with pytest.raises(PluginConformanceError, match="misses the target"):
        check_pattern(Keeps)
