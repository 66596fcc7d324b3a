"""The sparsegpt metric plugin and the runner's OBS update stage, end to end on random:tiny."""

from __future__ import annotations

import pytest
import torch

import compresskit
from compresskit.errors import CompressKitError
from compresskit.obs import obs_update, sparsegpt_prune
from compresskit.ops import find_linears
from compresskit.options import build
from compresskit.stats import LayerStats
from compresskit.testing import check_metric, check_solver
from compresskit_plugins.metrics.sparsegpt import SparseGPTMetric
from compresskit_plugins.solvers.obs import OBSSolver
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
    assert registry.get("metric", "sparsegpt").cls is SparseGPTMetric
    assert SparseGPTMetric.mask_solver == "obs" and SparseGPTMetric().statistics() == ("gram",)
    assert build(SparseGPTMetric.Options, {"mask_scope": "pattern"}).mask_scope == "pattern"
    solver = registry.get("solver", "obs").cls
    assert solver is OBSSolver and OBSSolver.Options() == OBSSolver.Options(0.01, 128, 4)
    opts = build(OBSSolver.Options, {"percdamp": "0.1", "blocksize": "64"})
    assert (opts.percdamp, opts.blocksize) == (0.1, 64)
    with pytest.raises(CompressKitError, match="percdamp"):
        OBSSolver.Options(percdamp=0.0)


def test_old_metric_options_point_at_the_solver():
    with pytest.raises(CompressKitError, match=r"'percdamp' is an option of the update scope: -o update.percdamp"):
        compresskit.prune(**RUN, metric="sparsegpt", metric_options={"percdamp": 0.1})


def test_conforms_to_the_metric_and_solver_contracts():
    assert "select mask" in check_metric(SparseGPTMetric, end_to_end=False)
    assert "solve" in check_solver(OBSSolver, end_to_end=False)


def _stats(h):
    return LayerStats({"gram": h}, 0, "mlp.up_proj")


def test_select_and_solve_is_the_pure_function_with_the_options():
    torch.manual_seed(1)
    w, x = torch.randn(16, 64), torch.randn(200, 64)
    h = x.t() @ x
    solver, metric = OBSSolver(OBSSolver.Options(percdamp=0.05, blocksize=32)), SparseGPTMetric()
    mask, new = solver.select_and_solve(w.clone(), _stats(h), metric, UnstructuredPattern(), 0.6)
    ref_new, ref_mask = sparsegpt_prune(w, h, 0.6, None, 32, 0.05)
    assert torch.equal(mask, ref_mask) and torch.equal(new, ref_new)
    mask, _ = solver.select_and_solve(w.clone(), _stats(h), metric, NMPattern(NMPattern.Options(4, 8)), 0.5)
    assert (mask.reshape(16, -1, 8).sum(-1) == 4).all()
    assert torch.equal(solver.solve(w, ref_mask, _stats(h)), obs_update(w, ref_mask, h, 32, 0.05))


def test_cholesky_failure_names_the_layer_and_the_fix():
    h = torch.eye(64)
    h[0, 1] = h[1, 0] = 10.0  # indefinite: 1% dampening with no retry cannot fix it
    with pytest.raises(CompressKitError, match=r"block \d+ \S+: .*update.percdamp"):
        run = dict(RUN, metric="sparsegpt", update_options={"max_retries": 0})
        from compresskit_plugins.solvers import obs as obs_plugin

        real = obs_plugin.OBSSolver.select_and_solve

        def indefinite(self, weight, stats, metric, pattern, sparsity):
            n = weight.shape[1]
            bad = torch.eye(n)
            bad[0, 1] = bad[1, 0] = 10.0
            return real(self, weight, LayerStats({"gram": bad}, 0, "x"), metric, pattern, sparsity)

        obs_plugin.OBSSolver.select_and_solve = indefinite
        try:
            compresskit.prune(**run)
        finally:
            obs_plugin.OBSSolver.select_and_solve = real


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
    import types

    from compresskit import Solver, hookimpl
    from compresskit.testing import fresh_registry

    class Other(Solver):
        """Another solver."""

        name = "other"
        summary = "test"

    mod = types.SimpleNamespace(register_solvers=hookimpl(lambda register: register(Other)))
    with pytest.raises(CompressKitError, match="chooses its mask inside the 'obs' solver"):
        compresskit.prune(**RUN, metric="sparsegpt", update="other", registry=fresh_registry(mod))
    quiet = compresskit.prune(**RUN, metric="sparsegpt", report_error=False, update="obs")
    assert all(r.error is None for r in quiet.report.layers)
    ref, got = _weights(runs["sgpt"]), _weights(quiet)
    assert all(torch.equal(ref[n], got[n]) for n in ref)  # the metric's own update, once


def test_pattern_scope_gives_exact_counts_per_row_and_block():
    res = compresskit.prune(**RUN, metric="sparsegpt", metric_options={"mask_scope": "pattern"},
                            update_options={"blocksize": 32})
    for name, w in _weights(res).items():
        per_block = (w == 0).reshape(w.shape[0], -1, 32).sum(-1)
        assert (per_block == 16).all(), name


@pytest.mark.slow
def test_smollm2_sparsegpt_reconstructs_better_than_wanda(monkeypatch):
    """The packaged SmolLM2-135M: lower layer errors than Wanda's masks, sane perplexity."""
    import math
    import statistics

    from compresskit_plugins.adapters.llama import perplexity

    monkeypatch.delenv("COMPRESSKIT_CACHE")  # reuse the developer's real cache
    kw = dict(adapter="llama", model="smollm2", nsamples=8, seqlen=128, calibration="handbook", progress=False)
    sgpt, wanda = compresskit.prune(metric="sparsegpt", **kw), compresskit.prune(metric="wanda", **kw)
    es, ew = [r.error for r in sgpt.report.layers], [r.error for r in wanda.report.layers]
    assert len(es) == 210 and sgpt.report.overall_sparsity == pytest.approx(0.5, abs=1e-3)
    assert statistics.mean(es) < 0.9 * statistics.mean(ew)
    assert sum(a < b for a, b in zip(es, ew)) >= 0.9 * len(es)
    ppl = perplexity.evaluate(sgpt.model, sgpt.loaded.processor, "wiki", 256, limit=8, progress=False)["perplexity"]
    assert math.isfinite(ppl) and ppl < 200
