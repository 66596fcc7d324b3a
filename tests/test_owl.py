"""The owl allocation: targets from the definition, mean kept at S, composability, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compresskit.api import prune
from compresskit.errors import IncompatiblePatternError, OptionError
from compresskit.testing import check_allocation
from compresskit_plugins.allocations.owl import OWLAllocation, outlier_ratio, owl_targets

BASE = dict(nsamples=4, seqlen=32, device="cpu", progress=False, report_error=False)


def _reference_targets(ratios, sizes, s, lmbda, weighted=True):
    d = np.asarray(ratios, dtype=np.float64)
    r = (d - d.min()) / (d.max() - d.min()) * 2 * lmbda
    w = np.asarray(sizes, dtype=np.float64) if weighted else np.ones_like(r)
    return s - (r - (w * r).sum() / w.sum())


def test_owl_targets_formula_and_mean():
    rng = np.random.default_rng(0)
    ratios, sizes = rng.uniform(0.001, 0.02, 7).tolist(), rng.integers(100, 1000, 7).tolist()
    for weighting, weighted in (("size", True), ("block", False)):
        got = np.asarray(owl_targets(ratios, sizes, 0.6, 0.08, weighting))
        np.testing.assert_allclose(got, _reference_targets(ratios, sizes, 0.6, 0.08, weighted), atol=1e-12)
        w = np.asarray(sizes, dtype=np.float64) if weighted else np.ones(7)
        assert (w * got).sum() / w.sum() == pytest.approx(0.6, abs=1e-12)
        assert got.max() - got.min() == pytest.approx(0.16, abs=1e-12)  # the range is 2*lmbda wide
        assert np.argmax(got) == np.argmin(ratios)  # fewest outliers -> pruned most
    assert owl_targets([0.01, 0.01, 0.01], [1, 2, 3], 0.5, 0.08) == [0.5, 0.5, 0.5]


def test_outlier_ratio_pools_the_block_strictly():
    a, b = torch.tensor([1.0, 1.0, 1.0, 9.0]), torch.tensor([[1.0, 2.0], [3.0, 13.0]])
    # pooled mean 4; above 2 * 4 = 8: 9 and 13 -> 2 of 8; exactly 8 would not count
    assert outlier_ratio([a, b], 2.0) == 2 / 8
    assert outlier_ratio([torch.tensor([1.0, 3.0])], 1.5) == 0.0  # 3 == 1.5 * mean 2: not strictly above


def _dense_ratios(model, batches, m):
    """OWL's outlier ratio per block from one plain dense forward with hooks (independent of walk_blocks)."""
    sq, handles = {}, []
    for i, block in enumerate(model.model.layers):
        for name, mod in block.named_modules():
            if isinstance(mod, torch.nn.Linear):
                def hook(module, args, key=(i, name)):
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                    sq[key] = sq.get(key, 0) + x.pow(2).sum(0)
                handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], use_cache=False)
    for h in handles:
        h.remove()
    ratios, sizes = [], []
    for i, block in enumerate(model.model.layers):
        scores = np.concatenate([(mod.weight.detach().double().abs() * sq[(i, name)].sqrt()).flatten().numpy()
                                 for name, mod in block.named_modules() if isinstance(mod, torch.nn.Linear)])
        ratios.append(float((scores > m * scores.mean()).sum()) / scores.size)
        sizes.append(scores.size)
    return ratios, sizes


def test_owl_targets_match_the_definition_on_random_small():
    opts = {"m": 2.0, "lmbda": 0.1}
    result = prune(model="random:small", metric="wanda", sparsity=0.5, allocation="owl", allocation_options=opts, **BASE)
    notes = result.manifest["notes"]["owl"]
    from compresskit_plugins.adapters.llama.sources import random_model

    dense, _ = random_model("small")
    ratios, sizes = _dense_ratios(dense, result.run.batches, 2.0)
    assert len(set(ratios)) > 1, "the oracle needs blocks with different outlier ratios"
    np.testing.assert_allclose(notes["outlier_ratios"], ratios, rtol=1e-9)
    np.testing.assert_allclose(notes["targets"], _reference_targets(ratios, sizes, 0.5, 0.1), atol=1e-9)
    assert notes["target_mean"] == pytest.approx(0.5, abs=1e-12)
    assert result.report.overall_target == pytest.approx(0.5, abs=1e-9)
    for row in result.report.layers:
        assert row.target == notes["targets"][row.block]  # every layer of a block gets its block's target
    assert notes["achieved_sparsity"] == pytest.approx(result.report.overall_sparsity)
    assert abs(notes["achieved_sparsity"] - 0.5) < 0.01  # per-row flooring only


def test_owl_prepass_does_not_disturb_the_run():
    """With lmbda=0 every target is S: the run must equal a uniform run bit for bit."""
    a = prune(model="random:tiny", metric="wanda", sparsity=0.5, allocation="owl", allocation_options={"lmbda": 0.0}, **BASE)
    b = prune(model="random:tiny", metric="wanda", sparsity=0.5, **BASE)
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), k


@pytest.mark.parametrize("metric,update", [("sparsegpt", "none"), ("gblm", "none"), ("magnitude", "none"),
                                           ("wanda", "obs")])
def test_owl_composes(metric, update):
    result = prune(model="random:tiny", metric=metric, update=update, sparsity=0.6, allocation="owl", **BASE)
    targets = result.manifest["notes"]["owl"]["targets"]
    assert len(set(targets)) == 2 and result.report.overall_target == pytest.approx(0.6)
    assert abs(result.report.overall_sparsity - 0.6) < 0.02


def test_owl_refuses_nm_and_out_of_range_targets():
    with pytest.raises(IncompatiblePatternError, match="allocation owl"):
        prune(model="random:tiny", metric="wanda", pattern="2:4", allocation="owl", **BASE)
    with pytest.raises(OptionError, match="allocation.lmbda"):
        prune(model="random:tiny", metric="wanda", sparsity=0.9, allocation="owl",
              allocation_options={"lmbda": 0.2}, **BASE)
    with pytest.raises(OptionError, match="lmbda"):
        prune(model="random:tiny", metric="wanda", allocation="owl", allocation_options={"lmbda": 0.6}, **BASE)


@pytest.mark.parametrize("options", [None, {"m": 3.0, "lmbda": 0.05, "weighting": "block"}])
def test_owl_conformance(options):
    assert "targets" in check_allocation(OWLAllocation, options=options)
