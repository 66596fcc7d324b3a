"""The sparsegpt metric plugin and the runner's OBS update stage, end to end on random:tiny."""

from __future__ import annotations

import pytest
import torch

import compresskit
from compresskit.errors import CompressKitError
from compresskit.interfaces import LayerContext
from compresskit.obs import inverse_hessian_factor, obs_saliency, sparsegpt_prune
from compresskit.ops import find_linears
from compresskit.options import build
from compresskit.testing import check_metric
from compresskit_plugins.metrics.sparsegpt import SparseGPTMetric
from compresskit_plugins.patterns.nm import NMPattern
from compresskit_plugins.patterns.unstructured import UnstructuredPattern

RUN = dict(adapter="llama", model="random:tiny", nsamples=4, seqlen=64, seed=0, progress=False)
NM = dict(pattern="nm", pattern_options={"n": 2, "m": 4})


def _weights(result) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": lin.weight.detach().clone() for i, blk in enumerate(result.model.model.layers)
            for n, lin in find_linears(blk).items()}


@pytest.fixture(scope="module")
def runs():
    """Each configuration pruned once (same model seed, calibration seed and data)."""
    cfg = {
        "sgpt": dict(metric="sparsegpt"),
        "wanda": dict(metric="wanda"),
        "sgpt_nm": dict(metric="sparsegpt", **NM),
        "wanda_nm": dict(metric="wanda", **NM),
        "wanda_dense": dict(metric="wanda", propagate="dense"),
        "wanda_obs_dense": dict(metric="wanda", update="obs", propagate="dense"),
    }
    return {k: compresskit.prune(**RUN, **v) for k, v in cfg.items()}


def test_registered_with_typed_options(registry):
    entry = registry.get("metric", "sparsegpt")
    assert entry.cls is SparseGPTMetric
    opts = build(SparseGPTMetric.Options, {"percdamp": "0.1", "blocksize": "64", "mask_scope": "pattern"})
    assert (opts.percdamp, opts.blocksize, opts.mask_scope) == (0.1, 64, "pattern")
    assert SparseGPTMetric.Options() == SparseGPTMetric.Options(0.01, 128, "block", 4)
    assert SparseGPTMetric.needs_hessian and not SparseGPTMetric.needs_gradients
    with pytest.raises(CompressKitError, match="percdamp"):
        SparseGPTMetric(SparseGPTMetric.Options(percdamp=0.0))


def test_conforms_to_the_metric_contract():
    assert "prune decision" in check_metric(SparseGPTMetric, end_to_end=False)


def test_score_is_the_obs_saliency_from_its_own_hessian():
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 8, bias=False)
    metric = SparseGPTMetric()
    state = metric.init_state(layer)
    x = torch.randn(100, 32)
    metric.update(state, x[:60])
    metric.update(state, x[60:])
    assert torch.allclose(state, x.t() @ x, rtol=1e-5, atol=1e-4)
    w = layer.weight.detach().clone()
    expected = obs_saliency(w, inverse_hessian_factor(x.t() @ x).u.diagonal())
    assert torch.allclose(metric.score(w, state, None), expected, rtol=1e-4)
    with pytest.raises(CompressKitError, match="Hessian"):
        metric.score(w, None, None)


def test_prune_is_the_pure_function_with_the_options():
    torch.manual_seed(1)
    w, x = torch.randn(16, 64), torch.randn(200, 64)
    ctx = LayerContext(name="mlp.up_proj", block_index=0, hessian=x.t() @ x, tokens=200)
    metric = SparseGPTMetric(SparseGPTMetric.Options(percdamp=0.05, blocksize=32))
    got = metric.prune(w.clone(), None, ctx, UnstructuredPattern(), 0.6)
    new, mask = sparsegpt_prune(w, ctx.hessian, 0.6, None, 32, 0.05)
    assert torch.equal(got.mask, mask) and torch.equal(got.weight, new)
    nm = NMPattern(NMPattern.Options(4, 8))
    got = metric.prune(w.clone(), None, ctx, nm, 0.5)
    assert (got.mask.reshape(16, -1, 8).sum(-1) == 4).all()


def test_cholesky_failure_names_the_layer_and_the_fix():
    h = torch.eye(16)
    h[0, 1] = h[1, 0] = 10.0  # indefinite: 1% dampening with no retry cannot fix it
    ctx = LayerContext(name="self_attn.q_proj", block_index=3, hessian=h)
    metric = SparseGPTMetric(SparseGPTMetric.Options(max_retries=0))
    with pytest.raises(CompressKitError, match=r"block 3 self_attn.q_proj: .*metric.percdamp"):
        metric.prune(torch.randn(4, 16), None, ctx, UnstructuredPattern(), 0.5)


def test_unstructured_sparsity_and_lower_error_than_wanda_on_every_layer(runs):
    sgpt, wanda = runs["sgpt"].report.layers, runs["wanda"].report.layers
    assert [(r.block, r.name) for r in sgpt] == [(r.block, r.name) for r in wanda] and len(sgpt) == 14
    for s, w in zip(sgpt, wanda):
        rows, cols = s.shape
        blocks = -(-cols // 128)
        # reference rule per 128-column block: floor(0.5 * rows * width) + 1 pruned (no ties here)
        assert s.sparsity == pytest.approx(0.5 + blocks / (rows * cols), abs=1e-9), s.name
        assert s.error is not None and s.error < w.error, (s.block, s.name, s.error, w.error)
    assert runs["sgpt"].report.overall_sparsity == pytest.approx(0.5, abs=1e-3)


def test_nm_structure_is_exact_and_error_lower_than_wanda(runs):
    for name, w in _weights(runs["sgpt_nm"]).items():
        assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all(), name
    for s, w in zip(runs["sgpt_nm"].report.layers, runs["wanda_nm"].report.layers):
        assert s.error < w.error, (s.block, s.name, s.error, w.error)


def test_wanda_with_obs_update_keeps_the_mask_and_lowers_the_error(runs):
    # propagate=dense: both runs see the dense network's inputs, so Wanda's masks must coincide.
    plain, updated = _weights(runs["wanda_dense"]), _weights(runs["wanda_obs_dense"])
    for name in plain:
        assert torch.equal(plain[name] == 0, updated[name] == 0), name
        assert not torch.equal(plain[name], updated[name]), name  # kept weights moved
    for p, u in zip(runs["wanda_dense"].report.layers, runs["wanda_obs_dense"].report.layers):
        assert u.error < p.error, (p.block, p.name, u.error, p.error)


def test_wanda_obs_update_with_pruned_propagation_keeps_block_zero_masks(runs):
    updated = compresskit.prune(**RUN, metric="wanda", update="obs")
    plain, upd = _weights(runs["wanda"]), _weights(updated)
    for name in (n for n in plain if n.startswith("0.")):
        assert torch.equal(plain[name] == 0, upd[name] == 0), name
    assert all(u.error < p.error for p, u in zip(runs["wanda"].report.layers, updated.report.layers))


def test_runs_without_error_report_and_update_flag_is_not_applied_twice(runs):
    quiet = compresskit.prune(**RUN, metric="sparsegpt", report_error=False, update="obs")
    assert all(r.error is None for r in quiet.report.layers)
    ref, got = _weights(runs["sgpt"]), _weights(quiet)
    assert all(torch.equal(ref[n], got[n]) for n in ref)  # the metric's own update, once


def test_pattern_scope_gives_exact_counts_per_row_and_block():
    res = compresskit.prune(**RUN, metric="sparsegpt", metric_options={"mask_scope": "pattern", "blocksize": 32})
    for name, w in _weights(res).items():
        per_block = (w == 0).reshape(w.shape[0], -1, 32).sum(-1)
        assert (per_block == 16).all(), name


@pytest.mark.slow
def test_smollm2_sparsegpt_reconstructs_better_than_wanda(monkeypatch):
    """The packaged SmolLM2-135M: lower layer errors than Wanda's masks, sane perplexity."""
    import math
    import statistics

    from compresskit import perplexity

    monkeypatch.delenv("COMPRESSKIT_CACHE")  # reuse the developer's real cache
    kw = dict(adapter="llama", model="smollm2", nsamples=8, seqlen=128, calibration="handbook", progress=False)
    sgpt, wanda = compresskit.prune(metric="sparsegpt", **kw), compresskit.prune(metric="wanda", **kw)
    es, ew = [r.error for r in sgpt.report.layers], [r.error for r in wanda.report.layers]
    assert len(es) == 210 and sgpt.report.overall_sparsity == pytest.approx(0.5, abs=1e-3)
    assert statistics.mean(es) < 0.9 * statistics.mean(ew)
    assert sum(a < b for a, b in zip(es, ew)) >= 0.9 * len(es)
    ppl = perplexity.evaluate(sgpt.model, sgpt.loaded.processor, "wiki", 256, limit=8, progress=False)["perplexity"]
    assert math.isfinite(ppl) and ppl < 200
