"""Metric and pattern math on hand-sized tensors."""

from __future__ import annotations

import pytest
import torch

from compresskit.errors import IncompatiblePatternError, OptionError
from compresskit.ops import adaptive_row_mask, kth_smallest, reconstruction_error
from compresskit.options import build, describe
from compresskit import stats
from compresskit.ops import wanda_score
from compresskit_plugins.metrics.wanda import WandaMetric
from compresskit_plugins.patterns.nm import NMPattern
from compresskit_plugins.patterns.unstructured import UnstructuredPattern


def test_wanda_score_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.5, 0.5, -0.5, 0.5]])
    x = torch.tensor([[1.0, 0.0, 2.0, 1.0], [1.0, 3.0, 0.0, 1.0]])  # [tokens, in]
    act = stats.ActSq()
    parts = act.init(torch.nn.Linear(4, 2, bias=False))
    act.update(parts, x)
    col = torch.tensor([2.0, 9.0, 4.0, 2.0]).sqrt()  # column norms by hand
    assert torch.allclose(wanda_score(w, act.finish(parts)), w.abs() * col)


def test_statistics_are_additive_and_merge():
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    layer = torch.nn.Linear(16, 4, bias=False)
    for stat in (stats.ActSq(), stats.Gram()):
        a, b, c = stat.init(layer), stat.init(layer), stat.init(layer)
        stat.update(a, x)
        stat.update(b, x[:4])
        stat.update(c, x[4:])
        merged = stats.merge(b, c)
        assert torch.allclose(stat.finish(a), stat.finish(merged), rtol=1e-5, atol=1e-6), stat.name
        stats.merge_into(b, c)
        assert torch.equal(stat.finish(b), stat.finish(merged))
    g = stats.GradNorm("l2", 100.0)
    whole, half1, half2 = g.init(layer), g.init(layer), g.init(layer)
    grads = torch.randn(3, 4, 16)
    for k in range(3):
        g.fold(whole, grads[k])
        g.fold(half1 if k < 2 else half2, grads[k])
    assert torch.allclose(g.finish(whole), g.finish(stats.merge(half1, half2)))
    assert torch.allclose(g.finish(whole), (100 * grads).pow(2).sum(0).sqrt())
    with pytest.raises(ValueError, match="different parts"):
        stats.merge({"a": torch.zeros(1)}, {"b": torch.zeros(1)})


def test_layer_stats_name_what_was_not_collected():
    s = stats.LayerStats({"act_sq": torch.zeros(2)}, 3, "mlp.up_proj", tokens=5, samples=1)
    assert s.tokens == 5 and s["act_sq"].shape == (2,)
    with pytest.raises(KeyError, match="'gram' was not collected for layer 3.mlp.up_proj.*statistics"):
        s["gram"]


def test_row_scope_prunes_exact_count_per_row():
    torch.manual_seed(0)
    s = torch.rand(7, 40)
    for sp in (0.1, 0.5, 0.63):
        mask = UnstructuredPattern().mask(s, sp)
        assert (mask.sum(dim=1) == int(40 * sp)).all()
        # pruned entries are the smallest in each row
        kept_min = s.masked_fill(mask, float("inf")).min(dim=1).values
        pruned_max = s.masked_fill(~mask, float("-inf")).max(dim=1).values
        assert (pruned_max <= kept_min).all()


def test_row_scope_breaks_ties_by_column_index():
    s = torch.ones(1, 8)
    assert UnstructuredPattern().mask(s, 0.5).tolist() == [[True] * 4 + [False] * 4]


def test_layer_scope_uses_one_threshold():
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    opts = build(UnstructuredPattern.Options, {"scope": "layer"})
    mask = UnstructuredPattern(opts).mask(s, 0.5)
    assert mask.tolist() == [[True] * 4, [False] * 4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kth_smallest_sort_and_selection_agree(dtype):
    # CUDA takes the sort, the CPU the selection: the same value, ties and signed zeros included.
    g = torch.Generator().manual_seed(0)
    flat = torch.randint(-5, 6, (4099,), generator=g).to(dtype) * 0.25
    flat[::7] = -0.0
    for k in (1, 2, 100, 2049, 4098, 4099):
        expect = flat.sort().values[k - 1]
        for by_sort in (True, False):
            got = kth_smallest(flat, k, by_sort=by_sort)
            assert got.dtype == dtype and got.dim() == 0 and got == expect


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_every_group_has_exactly_n_zeros(n, m):
    torch.manual_seed(1)
    s = torch.randn(16, 64)
    mask = NMPattern(NMPattern.Options(n=n, m=m)).mask(s, n / m)
    assert (mask.view(16, -1, m).sum(-1) == n).all()


def test_nm_check_fails_fast_with_fix():
    p = NMPattern(NMPattern.Options(n=2, m=4))
    with pytest.raises(IncompatiblePatternError, match="not divisible by m=4.*--pattern unstructured"):
        p.check("block 0 mlp.down_proj", (64, 37), 0.5)
    with pytest.raises(IncompatiblePatternError, match="contradicts"):
        p.check("x", (64, 64), 0.6)
    with pytest.raises(IncompatiblePatternError, match="0 < n < m"):
        NMPattern(NMPattern.Options(n=4, m=4))


def test_magnitude_defaults_to_layer_scope_at_planning():
    from compresskit.api import RunConfig, plan

    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    p = plan(RunConfig(metric="magnitude"))
    assert p.pattern.structure.group == "layer"
    assert p.pattern.mask(p.metric.score(w, None), 0.5).tolist() == [[True] * 4, [False] * 4]
    p = plan(RunConfig(metric="magnitude", metric_options={"scope": "row"}))
    assert p.pattern.mask(p.metric.score(w, None), 0.5).sum(dim=1).tolist() == [2, 2]
    assert plan(RunConfig(metric="magnitude", pattern_options={"scope": "row"})).pattern.structure.group == "row"
    assert plan(RunConfig(metric="magnitude", pattern="2:4")).pattern.structure.group == "nm"  # default: N:M keeps groups
    with pytest.raises(IncompatiblePatternError, match="does not offer"):
        plan(RunConfig(metric="magnitude", pattern="2:4", metric_options={"scope": "row"}))


def test_wanda_with_unit_activations_equals_row_magnitude():
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    st = stats.LayerStats({"act_sq": torch.ones(16)}, 0, "probe")
    m = WandaMetric()
    assert torch.equal(UnstructuredPattern().mask(m.score(w, st), 0.5), UnstructuredPattern().mask(w.abs(), 0.5))


def test_adaptive_variant_hits_layer_sparsity_and_guards_rows():
    torch.manual_seed(0)
    s = torch.rand(32, 64) * torch.linspace(0.1, 3, 32).unsqueeze(1)
    mask = adaptive_row_mask(s, 0.5)
    assert abs(mask.float().mean().item() - 0.5) < 0.01
    assert mask.sum(1).float().std() > 0  # rows get different sparsities
    one_big = torch.tensor([[100.0, 1.0, 1.0, 1.0]])
    assert not adaptive_row_mask(one_big, 0.0).any()  # no prefix fits -> prune nothing, not the row


def test_reconstruction_error_matches_direct():
    torch.manual_seed(0)
    w, x = torch.randn(5, 8), torch.randn(50, 8)
    wp = w.clone()
    wp[:, :3] = 0
    direct = ((x @ w.T - x @ wp.T) ** 2).sum() / ((x @ w.T) ** 2).sum()
    assert reconstruction_error(w, wp, x.T @ x) == pytest.approx(direct.item(), rel=1e-5)


def test_options_parse_types_and_errors():
    opts = build(NMPattern.Options, {"n": "4", "m": "8"})
    assert (opts.n, opts.m) == (4, 8)
    with pytest.raises(OptionError, match="valid options: n, m"):
        build(NMPattern.Options, {"k": "1"})
    with pytest.raises(OptionError, match="expects int"):
        build(NMPattern.Options, {"n": "two"})
    with pytest.raises(OptionError, match="not one of row, layer"):
        build(UnstructuredPattern.Options, {"scope": "column"})
    assert build(WandaMetric.Options, {"variant": "true"}).variant is True
    assert [r.name for r in describe(NMPattern.Options)] == ["n", "m"]
