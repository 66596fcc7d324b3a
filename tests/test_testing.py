"""The public conformance checks, run on every registered built-in and on broken plugins."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from compresskit import hookimpl
from compresskit.interfaces import MaskPattern, ScoreMetric, Structure
from compresskit.options import option
from compresskit.stats import Statistic
from compresskit.testing import (
    PluginConformanceError,
    check_adapter,
    check_allocation,
    check_hooks,
    check_metric,
    check_pattern,
    check_solver,
    fresh_registry,
    registry_names,
    tiny_model,
)

REGISTRY = fresh_registry()
NON_DEFAULT = {"gblm": {"grad_norm": "l2", "alpha": 10.0}, "wanda": {"variant": True}, "magnitude": {"scope": "row"},
               "gradient": {"inverse": True}, "sparsegpt": {"mask_scope": "pattern"}}


@pytest.mark.parametrize("name", registry_names("metric", REGISTRY))
def test_builtin_metric_conforms(name):
    passed = check_metric(REGISTRY.get("metric", name).cls, registry=REGISTRY)
    assert "statistics additive" in passed and any(p.startswith("end-to-end") for p in passed)


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_builtin_metric_conforms_with_non_default_options(name):
    check_metric(REGISTRY.get("metric", name).cls, registry=REGISTRY, options=NON_DEFAULT[name])


@pytest.mark.parametrize("name", registry_names("pattern", REGISTRY))
def test_builtin_pattern_conforms(name):
    passed = check_pattern(REGISTRY.get("pattern", name).cls, registry=REGISTRY)
    assert "mask shape/dtype/count/monotone" in passed and "check" in passed


@pytest.mark.parametrize("options", [{"scope": "layer"}, {"scope": "adaptive"}])
def test_unstructured_groups_conform(options):
    check_pattern(REGISTRY.get("pattern", "unstructured").cls, registry=REGISTRY, options=options)


def test_nm_conforms_at_4_8():
    check_pattern(REGISTRY.get("pattern", "nm").cls, registry=REGISTRY, options={"n": 4, "m": 8})


@pytest.mark.parametrize("name", registry_names("adapter", REGISTRY))
def test_builtin_adapter_conforms(name):
    from compresskit.errors import MissingDependencyError

    try:
        passed = check_adapter(REGISTRY.get("adapter", name).cls, registry=REGISTRY)
    except MissingDependencyError as exc:  # e.g. the vit extra (timm) is not installed
        pytest.skip(str(exc))
    assert "capture and replay" in passed


@pytest.mark.parametrize("name", registry_names("solver", REGISTRY))
def test_builtin_solver_conforms(name):
    assert "solve" in check_solver(REGISTRY.get("solver", name).cls, registry=REGISTRY)


@pytest.mark.parametrize("name", registry_names("allocation", REGISTRY))
def test_builtin_allocation_conforms(name):
    assert "targets" in check_allocation(REGISTRY.get("allocation", name).cls, registry=REGISTRY)


def test_fresh_registry_is_isolated_and_takes_modules():
    mod = types.ModuleType("throwaway_plugin")

    class Half(ScoreMetric):
        """Test metric."""

        name = "throwaway"
        summary = "test"

        def score(self, weight, stats):
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


def test_tiny_model_is_seeded():
    a, b = tiny_model(), tiny_model()
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_layer_sparsity_hooks_conform():
    mod = types.ModuleType("mlp_heavier")

    @hookimpl
    def layer_sparsity(run, block_index, layer_name):
        return 0.7 if layer_name.startswith("mlp.") else None

    mod.layer_sparsity = layer_sparsity
    assert check_hooks(mod) == ["registers", "targets achieved"]

    bad = types.ModuleType("misspelled")
    bad.layer_sparsty = hookimpl(lambda run, block_index, layer_name: 0.3)
    with pytest.raises(PluginConformanceError, match="did not register.*layer_sparsty"):
        check_hooks(bad)


# ---- the checks must catch broken plugins ------------------------------------------------


class _Base(ScoreMetric):
    """A metric for negative tests."""

    name = "broken"
    summary = "broken on purpose"

    def statistics(self):
        return ("act_sq",)

    def score(self, weight, stats):
        return weight.abs() * stats["act_sq"].sqrt()


def test_good_base_passes():
    check_metric(_Base, end_to_end=False)


def test_catches_weight_mutation():
    class Mutates(_Base):
        """Mutates."""

        def score(self, weight, stats):
            return weight.abs_()

    with pytest.raises(PluginConformanceError, match="modified the weight"):
        check_metric(Mutates, end_to_end=False)


class _MeanPerBatch(Statistic):
    """Averages per batch, so two batches of 4 differ from one of 8."""

    name = "mean_sq"

    def init(self, layer):
        return {"m": torch.zeros(layer.in_features)}

    def update(self, parts, x):
        parts["m"].copy_(x.pow(2).mean(0) + parts["m"] * 0.5)


class _NoOp(Statistic):
    """Forgets to fold anything."""

    name = "noop"

    def init(self, layer):
        return {"s": torch.zeros(layer.in_features)}


@pytest.mark.parametrize("stat, match", [(_MeanPerBatch(), "not additive"), (_NoOp(), "did not change its parts")])
def test_catches_bad_custom_statistics(stat, match):
    class UsesIt(_Base):
        """Uses a custom statistic."""

        def statistics(self, _stat=stat):
            return (_stat,)

        def score(self, weight, stats):
            return weight.abs()

    with pytest.raises(PluginConformanceError, match=match):
        check_metric(UsesIt, end_to_end=False)


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


def test_catches_non_finite_scores_only_with_the_given_options():
    class Divides(_Base):
        """Divides by zero when asked to."""

        @dataclasses.dataclass(frozen=True)
        class Options:
            eps: float = option(1e-8, "added to the denominator")

        def score(self, weight, stats):
            return weight.abs() / (torch.zeros_like(weight) + self.options.eps)

    check_metric(Divides, end_to_end=False)
    with pytest.raises(PluginConformanceError, match="non-finite"):
        check_metric(Divides, end_to_end=False, options={"eps": 0.0})


class _Row(MaskPattern):
    name = "test_rows"
    summary = "test"

    @property
    def structure(self):
        return Structure("row")


def test_catches_bad_pattern_count_and_monotonicity():
    class Greedy(_Row):
        """Prunes the lowest 10 percent, whatever the sparsity."""

        def mask(self, scores, sparsity):
            return scores < scores.quantile(0.1)

    with pytest.raises(PluginConformanceError, match="pruned"):
        check_pattern(Greedy, end_to_end=False)

    class Inverted(_Row):
        """Prunes the highest scores."""

        def mask(self, scores, sparsity):
            k = int(scores.shape[-1] * sparsity)
            idx = torch.sort(scores, dim=-1, descending=True)[1][..., :k]
            return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)

    with pytest.raises(PluginConformanceError, match="monotone"):
        check_pattern(Inverted, end_to_end=False)


def test_catches_pattern_without_check_and_one_rejecting_valid_layers():
    from compresskit_plugins.patterns.nm import NMPattern

    class NoCheck(NMPattern):
        """N:M that forgets to validate."""

        name = "nocheck"

        def check(self, layer_name, weight_shape, sparsity):
            return None

    with pytest.raises(PluginConformanceError, match="check\\(\\) accepted"):
        check_pattern(NoCheck, end_to_end=False)

    class Picky(_Row):
        """Rejects every layer."""

        def check(self, layer_name, weight_shape, sparsity):
            from compresskit.errors import IncompatiblePatternError

            raise IncompatiblePatternError("no")

        def mask(self, scores, sparsity):
            from compresskit.ops import lowest_mask

            return lowest_mask(scores, int(scores.shape[-1] * sparsity))

    with pytest.raises(PluginConformanceError, match="check\\(\\) rejected"):
        check_pattern(Picky, end_to_end=False)


def test_end_to_end_catches_wrong_sparsity():
    class Keeps(_Row):
        """Never prunes, but its unit probe lies about the count: caught end to end."""

        name = "keeps_all"

        def mask(self, scores, sparsity):
            if scores.shape == (16, 64):
                k = int(scores.shape[-1] * sparsity)
                idx = torch.sort(scores, dim=-1, stable=True)[1][..., :k]
                return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)
            return torch.zeros_like(scores, dtype=torch.bool)

    with pytest.raises(PluginConformanceError, match="misses its target"):
        check_pattern(Keeps)


def test_catches_solver_that_keeps_pruned_weights_or_worsens_the_error():
    from compresskit import Solver

    class Leaky(Solver):
        """Returns the dense weights."""

        name = "leaky"
        summary = "test"

        def solve(self, weight, mask, stats):
            return weight.clone()

    with pytest.raises(PluginConformanceError, match="left pruned weights non-zero"):
        check_solver(Leaky, end_to_end=False)

    class Noisy(Solver):
        """Adds noise to the kept weights."""

        name = "noisy"
        summary = "test"

        def solve(self, weight, mask, stats):
            return (weight + torch.randn_like(weight)).masked_fill(mask, 0.0)

    with pytest.raises(PluginConformanceError, match="worse than plain masking"):
        check_solver(Noisy, end_to_end=False)
