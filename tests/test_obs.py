"""compresskit.obs against an independent float64 restatement of SparseGPT (SPEC section 4)."""

from __future__ import annotations

import logging

import pytest
import torch

from compresskit.errors import CompressKitError
from compresskit.obs import (
    block_threshold_mask,
    inverse_hessian_factor,
    obs_saliency,
    obs_sweep,
    obs_update,
    sparsegpt_prune,
)
from compresskit.ops import reconstruction_error
from compresskit_plugins.patterns.nm import NMPattern
from compresskit_plugins.patterns.unstructured import UnstructuredPattern


def reference_obs(w, h, blocksize, percdamp, sparsity=0.0, nm=None, mask=None):
    """Textbook sequential OBS in float64, no Cholesky factor and no lazy batching.

    Column j is pruned/kept with the inverse of the Hessian restricted to the columns not yet
    processed, ``Hf = inv(H[j:, j:])``: ``err = (w_j - q_j) / Hf[0, 0]`` and every later column
    gets ``-err * Hf[0, k]`` right away. Masks use the saliency ``w^2 / Hf[0, 0]``, chosen at the
    start of each block (unstructured, one threshold over the block) or every m-th column (N:M).
    """
    w, h = w.double().clone(), h.double().clone()
    cols = w.shape[1]
    dead = torch.diagonal(h) == 0
    for j in torch.nonzero(dead).flatten().tolist():
        h[j, j] = 1.0
    w[:, dead] = 0.0
    h = h + percdamp * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype)
    hf_all = [torch.linalg.inv(h[j:, j:]) for j in range(cols)]  # inverse of the unprocessed part
    hinv_diag = [hf[0, 0] for hf in hf_all]
    m = torch.zeros_like(w, dtype=torch.bool) if mask is None else mask.clone()
    for j in range(cols):
        if mask is None and nm is None and j % blocksize == 0:
            hi = min(j + blocksize, cols)
            sal = w[:, j:hi] ** 2 / torch.stack(hinv_diag[j:hi]).unsqueeze(0)
            k = int(sal.numel() * sparsity + 1e-9)
            m[:, j:hi] = sal <= torch.sort(sal.flatten())[0][k]
        if mask is None and nm is not None and j % nm[1] == 0:
            n, mm = nm
            sal = w[:, j : j + mm] ** 2 / torch.stack(hinv_diag[j : j + mm]).unsqueeze(0)
            idx = torch.argsort(sal, dim=1)[:, :n]
            m[:, j : j + mm] = torch.zeros_like(sal, dtype=torch.bool).scatter(1, idx, True)
        hf = hf_all[j]
        q = w[:, j].masked_fill(m[:, j], 0.0)
        err = (w[:, j] - q) / hf[0, 0]
        w[:, j + 1 :] -= torch.outer(err, hf[0, 1:])
        w[:, j] = q
    return w, m | dead.unsqueeze(0)


def _layer(out=24, cols=64, tokens=512, seed=0, dead=()):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g)  # correlated inputs
    x = torch.randn(tokens, cols, generator=g) @ mix * torch.rand(cols, generator=g) * 3  # uneven scales
    x[:, list(dead)] = 0.0
    return torch.randn(out, cols, generator=g), x.t() @ x


def _rank_deficient(out=24, cols=64, tokens=20, seed=1):
    return _layer(out, cols, tokens, seed)  # fewer tokens than inputs: rank(H) = 20 < 64


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize(
    "make", [_layer, _rank_deficient, lambda: _layer(dead=(3, 40))], ids=["full", "rankdef", "dead"]
)
@pytest.mark.parametrize("blocksize", [16, 128])
def test_unstructured_matches_float64_restatement(make, blocksize):
    w, h = make()
    new, mask = sparsegpt_prune(w, h, 0.5, blocksize=blocksize)
    ref_w, ref_m = reference_obs(w, h, blocksize, 0.01, sparsity=0.5)
    assert torch.equal(mask, ref_m)
    assert new.dtype == torch.float32 and _rel(new, ref_w) < 1e-4
    assert (new[mask] == 0).all() and (new[~mask] != 0).all()
    new64, mask64 = sparsegpt_prune(w.double(), h.double(), 0.5, blocksize=blocksize)
    assert torch.equal(mask64, ref_m) and _rel(new64, ref_w) < 1e-9  # same maths, exactly


@pytest.mark.parametrize("make", [_layer, _rank_deficient], ids=["full", "rankdef"])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_matches_restatement_and_structure_is_exact(make, n, m):
    w, h = make()
    new, mask = sparsegpt_prune(w, h, 0.0, nm=(n, m), blocksize=16, select=NMPattern(NMPattern.Options(n, m)).mask)
    ref_w, ref_m = reference_obs(w, h, 16, 0.01, nm=(n, m))
    assert torch.equal(mask, ref_m) and _rel(new, ref_w) < 1e-4
    assert (mask.reshape(w.shape[0], -1, m).sum(-1) == n).all()
    assert ((new == 0).reshape(w.shape[0], -1, m).sum(-1) == n).all()


def test_obs_update_matches_restatement_with_fixed_mask():
    w, h = _layer(seed=3, dead=(5,))
    fixed = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    new = obs_update(w, fixed, h, blocksize=16)
    ref_w, _ = reference_obs(w, h, 16, 0.01, mask=fixed)
    assert _rel(new, ref_w) < 1e-4
    assert (new[fixed] == 0).all() and (new[:, 5] == 0).all()  # dead column zeroed, as the reference
    assert reconstruction_error(w, new, h) < reconstruction_error(w, w.masked_fill(fixed, 0), h)


def test_obs_update_with_identity_hessian_is_plain_masking():
    # Uncorrelated inputs: pruning column j says nothing about the others, so no compensation.
    w = torch.randn(8, 32)
    fixed = torch.rand(8, 32) < 0.5
    new = obs_update(w, fixed, torch.eye(32) * 7.0, blocksize=8)
    assert torch.allclose(new, w.masked_fill(fixed, 0), atol=1e-6)


def test_identity_hessian_degenerates_to_blockwise_magnitude():
    w = torch.randn(16, 64)
    _, mask = sparsegpt_prune(w, torch.eye(64), 0.5, blocksize=32)
    for i in range(0, 64, 32):  # one |W| threshold per 32-column block, all rows together
        assert torch.equal(mask[:, i : i + 32], block_threshold_mask(w[:, i : i + 32].abs(), 0.5))


def test_hessian_scale_is_irrelevant():
    w, h = _layer(seed=4)
    a = sparsegpt_prune(w, h, 0.5, blocksize=32)
    b = sparsegpt_prune(w, h * (2 / 512), 0.5, blocksize=32)  # the reference's 2/N scaling
    assert torch.equal(a[1], b[1]) and _rel(a[0], b[0]) < 1e-5


def test_unstructured_sparsity_is_close_to_target():
    w, h = _layer(out=64, cols=256, seed=5)
    for s in (0.3, 0.5, 0.7):
        _, mask = sparsegpt_prune(w, h, s, blocksize=64)
        # reference rule: floor(s * 64 * 64) + 1 per block (no ties in random data)
        assert mask.float().mean().item() == pytest.approx((int(s * 4096) + 1) / 4096, abs=1e-9)


def test_row_select_gives_exact_per_row_counts_per_block():
    w, h = _layer(out=16, cols=128, seed=6)
    _, mask = sparsegpt_prune(w, h, 0.5, blocksize=32, select=UnstructuredPattern().mask)
    assert (mask.reshape(16, 4, 32).sum(-1) == 16).all()


def test_update_lowers_reconstruction_error_against_plain_masking():
    w, h = _layer(out=32, cols=128, seed=7)
    new, mask = sparsegpt_prune(w, h, 0.5)
    assert reconstruction_error(w, new, h) < 0.8 * reconstruction_error(w, w.masked_fill(mask, 0), h)


def test_inputs_are_not_modified():
    w, h = _layer(dead=(2,))
    w0, h0 = w.clone(), h.clone()
    sparsegpt_prune(w, h, 0.5, blocksize=16)
    obs_update(w, torch.rand(w.shape) < 0.5, h)
    assert torch.equal(w, w0) and torch.equal(h, h0)


def _indefinite(cols=32):
    h = torch.eye(cols)
    h[0, 1] = h[1, 0] = 1.05  # eigenvalue -0.05 (mean diagonal 1): 1% dampening is not enough
    return h


def test_cholesky_retry_logs_and_succeeds(caplog):
    w = torch.randn(8, 32)
    with caplog.at_level(logging.WARNING, logger="compresskit.obs"):
        fac = inverse_hessian_factor(_indefinite())
        new, mask = sparsegpt_prune(w, _indefinite(), 0.5, blocksize=16)
    assert fac.percdamp == pytest.approx(0.1)
    assert "percdamp=0.01" in caplog.text and "percdamp=0.1" in caplog.text
    assert torch.isfinite(new).all() and (new[mask] == 0).all()
    h = _indefinite() + 0.1 * torch.eye(32)
    assert torch.allclose(fac.u.t() @ fac.u, torch.linalg.inv(h), atol=1e-4)


def test_cholesky_failure_after_retries_names_the_fix():
    h = torch.eye(32)
    h[0, 1] = h[1, 0] = 10.0  # eigenvalue -9: needs percdamp >= 9
    with pytest.raises(CompressKitError, match=r"percdamp.*update.percdamp"):
        inverse_hessian_factor(h, max_retries=2)
    assert inverse_hessian_factor(h, max_retries=3).percdamp == pytest.approx(10.0)


def test_non_finite_hessian_and_bad_shapes_are_clear_errors():
    h = torch.eye(8)
    h[0, 0] = float("nan")
    with pytest.raises(CompressKitError, match="NaN"):
        sparsegpt_prune(torch.randn(4, 8), h, 0.5)
    with pytest.raises(CompressKitError, match=r"\[8, 8\]"):
        sparsegpt_prune(torch.randn(4, 8), torch.eye(4), 0.5)
    with pytest.raises(CompressKitError, match="multiples of m"):
        sparsegpt_prune(torch.randn(4, 8), torch.eye(8), 0.5, nm=(2, 4), blocksize=6, select=NMPattern().mask)
    with pytest.raises(CompressKitError, match="in_features"):
        sparsegpt_prune(torch.randn(4, 10), torch.eye(10), 0.5, nm=(2, 4), select=NMPattern().mask)
    with pytest.raises(CompressKitError, match="select="):
        sparsegpt_prune(torch.randn(4, 8), torch.eye(8), 0.5, nm=(2, 4))


def test_saliency_uses_the_factor_diagonal():
    w, h = _layer(cols=16, seed=8)
    fac = inverse_hessian_factor(h)
    hd = h.double() + 0.01 * torch.diagonal(h).double().mean() * torch.eye(16, dtype=torch.float64)
    first = w[:, 0].double() ** 2 / torch.linalg.inv(hd)[0, 0]  # column 0: full inverse
    assert torch.allclose(obs_saliency(w, fac.u.diagonal())[:, 0].double(), first, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_sweep_matches_cpu():
    w, h = _layer(out=64, cols=256, seed=9)
    cpu_w, cpu_m = sparsegpt_prune(w, h, 0.5, blocksize=64)
    gpu_w, gpu_m = sparsegpt_prune(w.cuda(), h.cuda(), 0.5, blocksize=64)
    assert gpu_w.is_cuda and (gpu_m.cpu() == cpu_m).float().mean() > 0.999
    assert _rel(gpu_w.cpu(), cpu_w) < 1e-3


def _plain_sweep(w, u, blocksize, mask):
    """The sweep as written before it was made launch-cheap: quantise, error, rank-1 update, write."""
    wt, mt = w.t().contiguous(), mask.t().contiguous()
    for i1 in range(0, wt.shape[0], blocksize):
        i2 = min(i1 + blocksize, wt.shape[0])
        wb, mb, ub = wt[i1:i2], mt[i1:i2], u[i1:i2, i1:i2]
        d, err = ub.diagonal(), torch.empty_like(wt[i1:i2])
        for i in range(i2 - i1):
            q = wb[i].masked_fill(mb[i], 0.0)
            torch.div(wb[i] - q, d[i], out=err[i])
            wb[i + 1 :].addr_(ub[i, i + 1 :], err[i], alpha=-1.0)
            wb[i] = q
        if i2 < wt.shape[0]:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), err, alpha=-1.0)
    return wt.t().contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_two_kernel_sweep_gives_the_same_bits_as_the_plain_one(dtype):
    """Equal values; with no zero among the inputs the signs of the zeros agree too."""
    w, h = _layer(out=40, cols=200, seed=3)
    w, h = w.to(dtype), h.to(dtype)
    u = inverse_hessian_factor(h).u
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(4)) < 0.5
    got = obs_sweep(w, u, 64, mask=mask)[0]
    want = _plain_sweep(w, u, 64, mask)
    assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))
