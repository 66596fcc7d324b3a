"""ADMM weight update (fixed and gradual mask) and mask refinement by swaps."""

from __future__ import annotations

import pytest
import torch

from compresskit.admm import admm_update, cubic_schedule
from compresskit.api import prune
from compresskit.errors import OptionError
from compresskit.ops import lowest_mask, reconstruction_error
from compresskit.swaps import refine_mask, row_errors
from compresskit.testing import check_solver
from compresskit_plugins.patterns.nm import NMPattern
from compresskit_plugins.patterns.unstructured import UnstructuredPattern
from compresskit_plugins.solvers.admm import ADMMSolver
from compresskit_plugins.solvers.swaps import SwapsSolver

BASE = dict(model="random:tiny", nsamples=4, seqlen=32, device="cpu", progress=False, report_error=False)


def _problem(out=6, inp=12, tokens=40, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g, dtype=dtype)
    x = torch.randn(tokens, inp, generator=g, dtype=dtype) * torch.linspace(0.2, 3, inp, dtype=dtype)
    return w, x.t() @ x


def _masked_lstsq(w, gram, mask, percdamp):
    """Direct float64 solve of min (w - w') Gd (w - w')^T per row with w' = 0 where masked; Gd is
    the Gram dampened as ADMM does (lambda * mean(diag Gn) in the normalised space = lambda * d^2)."""
    d = gram.diagonal().sqrt() + 1e-8
    gn_mean = (gram / d.unsqueeze(0) / d.unsqueeze(1)).diagonal().mean()
    gd = gram + torch.diag(percdamp * gn_mean * d * d)
    out = torch.zeros_like(w)
    for r in range(w.shape[0]):
        k = ~mask[r]
        rhs = (w[r] @ gd)[k]
        out[r, k] = torch.linalg.solve(gd[k][:, k], rhs)
    return out


@pytest.mark.parametrize("percdamp", [0.0, 0.1])
def test_converged_admm_equals_direct_masked_least_squares(percdamp):
    w, gram = _problem()
    mask = lowest_mask(w.abs(), 5)
    new, m = admm_update(w, gram, mask, iters=3000, percdamp=percdamp)
    assert torch.equal(m, mask) and not new[mask].any()
    torch.testing.assert_close(new, _masked_lstsq(w, gram, mask, percdamp), rtol=1e-6, atol=1e-7)


def test_twenty_iterations_are_close_to_converged_and_beat_plain_masking_and_obs():
    from compresskit.obs import obs_update

    w, gram = _problem(16, 32, 64, dtype=torch.float32)
    mask = lowest_mask(w.abs(), 16)
    new, _ = admm_update(w, gram, mask)
    assert new.dtype == torch.float32
    err = reconstruction_error(w, new, gram)
    assert err <= 1.01 * reconstruction_error(w, admm_update(w, gram, mask, iters=500)[0], gram)
    assert err < reconstruction_error(w, obs_update(w, mask, gram), gram) < reconstruction_error(w, w.masked_fill(mask, 0), gram)


def test_cubic_schedule_reaches_the_target_at_the_last_gradual_step():
    assert cubic_schedule(0, 15, 0.6) < 0.2 and cubic_schedule(14, 15, 0.6) == 0.6 and cubic_schedule(19, 15, 0.6) == 0.6


@pytest.mark.parametrize("options", [{}, {"ramp": True}, {"seed": "reference"}, {"scope": "pattern"},
                                     {"ramp": True, "seed": "reference", "swaps": 5}])
@pytest.mark.parametrize("target", [0.5, 0.7, 0.33])
def test_gradual_reaches_exactly_the_target(options, target):
    w, gram = _problem(8, 24, 64, dtype=torch.float32)
    pattern = UnstructuredPattern()
    seed = pattern.mask(w.abs(), target)
    solver = ADMMSolver(ADMMSolver.Options(gradual=True, **options))
    mask, new = solver.refine_and_solve(w, seed, {"gram": gram}, pattern, target)
    k = int(seed.sum()) if options.get("scope") == "pattern" else int(w.numel() * target + 1e-9)
    assert int(mask.sum()) == k and not new[mask].any() and torch.isfinite(new).all()


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("options", [{"gradual": True}, {"gradual": True, "ramp": True, "seed": "reference"},
                                     {"swaps": 10}, {}])
def test_nm_output_is_exactly_nm(n, m, options):
    w, gram = _problem(8, 32, 64, dtype=torch.float32)
    pattern = NMPattern(NMPattern.Options(n=n, m=m))
    seed = pattern.mask(w.abs(), n / m)
    mask, new = ADMMSolver(ADMMSolver.Options(**options)).refine_and_solve(w, seed, {"gram": gram}, pattern, 0.5)
    assert (mask.view(8, -1, m).sum(-1) == n).all()
    assert ((new == 0) | ~mask).all() and not new[mask].any()


@pytest.mark.parametrize("nm_m, k", [(None, 12), (4, None), (8, None)])
def test_swaps_never_raise_the_error_and_keep_the_counts(nm_m, k):
    w, gram = _problem(10, 32, 80, seed=3)
    if nm_m is None:
        mask = lowest_mask(w.abs(), k)
    else:
        mask = NMPattern(NMPattern.Options(n=nm_m // 2, m=nm_m)).mask(w.abs(), 0.5)
    before = row_errors(w, gram, mask)
    prev = before
    for steps in range(1, 30):
        ref, _ = refine_mask(w, gram, mask, max_swaps=steps, nm_m=nm_m)
        now = row_errors(w, gram, ref)
        assert (now <= prev * (1 + 1e-12)).all()
        prev = now
    assert now.sum() < 0.95 * before.sum()  # it found something on this random layer
    assert torch.equal(ref.sum(1), mask.sum(1))
    if nm_m:
        assert torch.equal(ref.view(10, -1, nm_m).sum(-1), mask.view(10, -1, nm_m).sum(-1))


def test_options_are_checked():
    with pytest.raises(OptionError, match="gradual_iters"):
        ADMMSolver.Options(iters=10, gradual_iters=15)
    with pytest.raises(OptionError, match="max_swaps"):
        SwapsSolver.Options(max_swaps=-1)


@pytest.mark.parametrize("cls, options", [(ADMMSolver, None), (ADMMSolver, {"gradual": True}),
                                          (SwapsSolver, None), (SwapsSolver, {"then": "admm"}),
                                          (SwapsSolver, {"then": "obs"})])
def test_conformance(cls, options):
    assert "solve" in check_solver(cls, options=options)


@pytest.mark.parametrize("kw", [dict(update="admm", update_options={"gradual": True}, pattern="2:4"),
                                dict(update="admm", update_options={"gradual": True}, allocation="owl"),
                                dict(update="swaps", update_options={"then": "admm"}, pattern="4:8")])
def test_end_to_end_masks_follow_pattern_and_targets(kw):
    r = prune(metric="wanda", sparsity=0.5, **BASE, **kw)
    for row in r.report.layers:
        assert row.sparsity == pytest.approx(row.target, abs=0.02)


@pytest.mark.cuda
def test_cuda_results_stay_on_the_device_and_match_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    w, gram = _problem(16, 32, 64, dtype=torch.float32)
    pattern = NMPattern(NMPattern.Options(n=2, m=4))
    seed = pattern.mask(w.abs(), 0.5)
    solver = ADMMSolver(ADMMSolver.Options(gradual=True, swaps=5))
    cpu = solver.refine_and_solve(w, seed, {"gram": gram}, pattern, 0.5)
    gpu = solver.refine_and_solve(w.cuda(), seed.cuda(), {"gram": gram.cuda()}, pattern, 0.5)
    assert all(t.is_cuda for t in gpu)
    assert (gpu[0].cpu() != cpu[0]).float().mean() < 0.02
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=1e-3, atol=1e-3)
