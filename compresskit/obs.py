"""Optimal Brain Surgeon sweeps: SparseGPT's mask selection and weight reconstruction.

Pure tensor functions (no modules, hooks or devices) behind the ``sparsegpt`` metric and the
``obs`` solver. They follow the reference SparseGPT procedure (IST-DASLab/sparsegpt, Frantar &
Alistarh 2023, https://arxiv.org/abs/2301.00774):

1. **Hessian.** The reference accumulates ``H = (2/N) sum_t x_t x_t^T``; the runner hands over
   the plain Gram matrix ``G = sum_t x_t x_t^T``. The scale is irrelevant: dampening is relative
   to ``mean(diag H)``, and with ``H -> cH`` the factor ``U`` scales by ``1/sqrt(c)`` so the
   weight updates ``err * U`` are unchanged and every saliency is multiplied by the same ``c``
   (identical masks and weights).
2. **Preconditioning** (:func:`inverse_hessian_factor`). Dead inputs (``H_jj == 0``) get
   ``H_jj = 1`` and their weight column is zeroed; ``percdamp * mean(diag H)`` is added to the
   diagonal; ``H^-1`` is formed by Cholesky and its *upper* Cholesky factor ``U``
   (``H^-1 = U^T U``) is all the sweep uses. A failed factorisation is retried with ten times
   the dampening, a bounded number of times.
3. **Sweep** (:func:`obs_sweep`). Columns left to right in blocks of ``blocksize``: inside a
   block every column ``j`` is quantised to ``q`` (masked rows set to 0), the error
   ``(w_j - q) / U_jj`` is propagated to the rest of the block at once, and the block's errors
   are applied to all later columns in one matrix product (lazy batch update).
4. **Mask selection** happens inside the sweep on the *current* (already updated) weights,
   with the saliency ``w^2 / U_jj^2`` (:func:`obs_saliency`): at the start of every block for
   unstructured sparsity (one threshold over the whole block across rows), at every m-th
   column for N:M. :func:`obs_update` runs the same sweep with a fixed, precomputed mask
   (the Wanda repository's ``ablate_*_seq`` idea: "wanda + OBS update").

Computation is float32 (float64 inputs stay float64, which the tests use).
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple

import torch

from compresskit.errors import CompressKitError
from compresskit.ops import kth_smallest, row_prune_count

log = logging.getLogger(__name__)

# (saliency scores of a selection window [out, k], sparsity) -> boolean mask, True = prune.
Select = Callable[[torch.Tensor, float], torch.Tensor]
# (current weights of a window [out, k], U's diagonal for those columns [k]) -> mask [out, k].
Chooser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class HessianFactor(NamedTuple):
    """Upper Cholesky factor of the dampened inverse Hessian and what preconditioning did.

    Attributes:
        u: ``[in, in]`` upper-triangular ``U`` with ``(H + damp*I)^-1 = U^T U``.
        dead: boolean ``[in]``, True for inputs whose Hessian diagonal was zero.
        percdamp: the dampening fraction that succeeded (larger than asked after retries).
    """

    u: torch.Tensor
    dead: torch.Tensor
    percdamp: float


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def inverse_hessian_factor(h: torch.Tensor, percdamp: float = 0.01, max_retries: int = 4) -> HessianFactor:
    """Precondition ``h`` (dead inputs, dampening) and return the upper factor of its inverse.

    ``h`` is not modified. When a Cholesky factorisation fails (``h`` not positive definite in
    floating point), the dampening is multiplied by 10 and the factorisation retried, at most
    ``max_retries`` times; a warning names the dampening finally used.

    Args:
        h: ``[in, in]`` Hessian / Gram matrix (any positive scale).
        percdamp: dampening as a fraction of ``mean(diag H)`` (reference 0.01).
        max_retries: how many times to retry with 10x the dampening.

    Raises:
        CompressKitError: ``h`` holds NaN/inf, or every retry failed.
    """
    h = h.to(_work_dtype(h)).clone()
    if not torch.isfinite(h).all():
        raise CompressKitError(
            "the Hessian (Gram matrix of the layer inputs) holds NaN or inf values; the calibration "
            "forward passes produced non-finite activations. Check the model dtype and calibration data."
        )
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    mean = diag.mean()
    damp = percdamp
    for attempt in range(max_retries + 1):
        hd = h.clone()
        hd.diagonal().add_(damp * mean)
        low, info = torch.linalg.cholesky_ex(hd)
        if info == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
            if info == 0 and torch.isfinite(u).all():
                if attempt:
                    log.warning(
                        "Cholesky of the dampened Hessian failed at percdamp=%g; succeeded with percdamp=%g "
                        "after %d retr%s (set a larger percdamp to skip the retries)",
                        percdamp, damp, attempt, "y" if attempt == 1 else "ies",
                    )
                return HessianFactor(u, dead, damp)
        damp *= 10.0
    raise CompressKitError(
        f"Cholesky factorisation of the dampened Hessian failed for percdamp={percdamp:g} and "
        f"{max_retries} retries up to {damp / 10:g}: the Hessian is far from positive definite. "
        "Use more calibration samples, or a larger dampening (-o update.percdamp=0.1)."
    )


def obs_saliency(w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """OBS saliency ``w^2 / d^2`` of each weight, with ``d`` the diagonal of ``U`` for its column.

    ``U_jj^2 = [(H_{F,F})^-1]_jj`` with ``F`` the columns ``j..end`` still unprocessed, so this
    is the classic OBS loss ``w^2 / [H^-1]_jj`` of the sequential scheme (SparseGPT's mask score).
    """
    return w.pow(2) / d.pow(2).unsqueeze(0)


def block_threshold_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """SparseGPT's adaptive mask: one threshold over the whole window, all rows jointly.

    The threshold is the score at 0-based position ``floor(sparsity * numel)`` of the sorted
    scores and every score ``<=`` it is pruned (``floor(...) + 1`` entries plus ties), as the
    reference does. ``sparsity <= 0`` prunes nothing.
    """
    if sparsity <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    flat = scores.flatten()
    k = min(row_prune_count(flat.numel(), sparsity), flat.numel() - 1)
    return scores <= kth_smallest(flat, k + 1)


def obs_sweep(
    w: torch.Tensor,
    u: torch.Tensor,
    blocksize: int = 128,
    mask: torch.Tensor | None = None,
    choose: Chooser | None = None,
    stride: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked OBS sweep with lazy batch updates (docs/explanation/algorithms.md). Returns ``(new_weight, mask)``.

    Args:
        w: ``[out, in]`` weights (not modified), already zero on dead input columns.
        u: upper Cholesky factor of the dampened inverse Hessian (:func:`inverse_hessian_factor`).
        blocksize: columns per block; later columns get the block's errors in one product.
        mask: fixed boolean mask (True = prune), or None to let ``choose`` build it.
        choose: called at every ``stride``-th column of each block with the current weights of
            the next ``stride`` columns (clipped to the block) and ``U``'s diagonal there;
            returns their mask. It overrides ``mask`` on those columns.
        stride: selection window of ``choose`` (``blocksize`` for unstructured, ``m`` for N:M).
    """
    # Work on the transpose so that a column of W is a contiguous row: the per-column rank-1
    # updates then touch one contiguous slab instead of a strided one (~3x faster on CPU).
    #
    # Two kernels per column (on a GPU the sweep is bound by launches and their Python calls,
    # ~35k columns per 7B block). The error (w - q) / d is w / d where the column is pruned and 0
    # where kept: one division by a divisor that is d where pruned and inf where kept (set once
    # per selection window). The rank-1 update runs over the whole block: U is upper triangular,
    # so the columns already done receive zeros, and the current column's pruned entries are
    # zeroed once per block after its sweep (nothing reads a column again once it is done; its
    # kept entries receive zeros). The values are those of the plain loop bit for bit; only the
    # sign of a zero can differ. Rows are split into views once per block, not per column. On CUDA
    # a whole block's columns (mask fixed for the block) replay as one captured CUDA graph
    # (:mod:`compresskit.obs_graph`), the same kernels on the same numbers.
    from compresskit import obs_graph

    wt = w.t().contiguous()
    mt = mask.t().contiguous() if mask is not None else torch.zeros_like(wt, dtype=torch.bool)
    cols = wt.shape[0]
    stride = stride or blocksize
    inf = torch.full((), float("inf"), dtype=wt.dtype, device=wt.device)
    graph = obs_graph.get(blocksize, wt.shape[1], wt.dtype, wt.device, sweep_columns) if stride >= blocksize else None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        wb, mb, ub = wt[i1:i2], mt[i1:i2], u[i1:i2, i1:i2]  # views: edits land in wt and mt
        d = ub.diagonal().unsqueeze(1)
        if choose is not None and stride >= blocksize:
            mb[:] = choose(wb.t(), d[:, 0]).t()
        div = torch.where(mb, d, inf)
        if graph is not None and i2 - i1 == blocksize:
            err = graph.run(wb, div, ub)
        else:
            err = torch.empty_like(wb)
            rows = wb.unbind(0), div.unbind(0), err.unbind(0), ub.unbind(0)
            for i in range(0, i2 - i1, stride):
                e = min(i + stride, i2 - i1)
                if choose is not None and stride < blocksize:
                    mb[i:e] = choose(wb[i:e].t(), d[i:e, 0]).t()
                    torch.where(mb[i:e], d[i:e], inf, out=div[i:e])
                sweep_columns(wb, *rows, i, e)
        wb.masked_fill_(mb, 0.0)
        if i2 < cols:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), err, alpha=-1.0)
    return wt.t().contiguous(), mt.t().contiguous()


def sweep_columns(wb: torch.Tensor, w_rows, div_rows, err_rows, u_rows, start: int, stop: int) -> None:
    """The sweep's inner loop over columns ``start..stop`` of one block (transposed layout: a column
    of W is a row of ``wb``; ``*_rows`` are the rows of ``wb``, the divisors, the errors and the
    block of ``U``): each column's error is its weight over its divisor, spread over the block."""
    for i in range(start, stop):
        torch.div(w_rows[i], div_rows[i], out=err_rows[i])
        wb.addr_(u_rows[i], err_rows[i], alpha=-1.0)


def _prepare(w: torch.Tensor, h: torch.Tensor, percdamp: float, max_retries: int):
    if h.shape != (w.shape[1], w.shape[1]):
        raise CompressKitError(
            f"Hessian shape {tuple(h.shape)} does not match weight {tuple(w.shape)}; it must be "
            f"[in_features, in_features] = [{w.shape[1]}, {w.shape[1]}] (the Gram matrix of the layer inputs)"
        )
    fac = inverse_hessian_factor(h, percdamp, max_retries)
    w = w.to(fac.u.dtype).clone()
    w[:, fac.dead] = 0.0
    return w, fac


def sparsegpt_prune(
    w: torch.Tensor,
    h: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    *,
    select: Select | None = None,
    max_retries: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: choose the mask inside the OBS sweep and reconstruct the kept weights.

    Args:
        w: ``[out, in]`` dense weights (not modified).
        h: ``[in, in]`` Hessian / Gram matrix of the layer inputs (not modified; any scale).
        sparsity: target fraction for unstructured masks (ignored for N:M, as the reference).
        nm: ``(n_pruned, m)`` for N:M: every m-th column selects the ``n`` lowest saliencies per
            row among the next ``m`` columns. ``blocksize`` must be a multiple of ``m``.
        blocksize: columns per lazy-update block (reference 128).
        percdamp: dampening as a fraction of ``mean(diag H)`` (reference 0.01).
        select: ``(saliency window, sparsity) -> mask``. Required for N:M (pass the pattern's
            ``mask`` so the grouping lives in one place); for unstructured it replaces the
            reference's block-wide threshold (:func:`block_threshold_mask`).
        max_retries: dampening retries when the Cholesky factorisation fails.

    Returns:
        ``(new_weight, mask)``: float32 weights (float64 for float64 inputs), zero wherever
        ``mask``; the mask includes dead input columns (zeroed as in the reference), so an N:M
        group touching a dead input can hold more than ``n`` zeros.
    """
    if nm is not None:
        if select is None:
            raise CompressKitError("N:M SparseGPT needs select=<the N:M pattern's mask>, e.g. NMPattern().mask")
        if blocksize % nm[1] or w.shape[1] % nm[1]:
            raise CompressKitError(
                f"N:M with m={nm[1]} needs blocksize ({blocksize}) and in_features ({w.shape[1]}) to be multiples "
                f"of m; use e.g. blocksize=128, or an unstructured pattern for this layer"
            )
    wd, fac = _prepare(w, h, percdamp, max_retries)
    pick = select or block_threshold_mask
    target = nm[0] / nm[1] if nm is not None else sparsity

    def choose(cols: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return pick(obs_saliency(cols, d), target)

    new, mask = obs_sweep(wd, fac.u, blocksize, choose=choose, stride=nm[1] if nm is not None else blocksize)
    return new, mask | fac.dead.unsqueeze(0)


def obs_update(
    w: torch.Tensor,
    mask: torch.Tensor,
    h: torch.Tensor,
    blocksize: int = 128,
    percdamp: float = 0.01,
    max_retries: int = 4,
) -> torch.Tensor:
    """Reconstruct the kept weights for a fixed ``mask`` (True = prune) with the OBS sweep.

    The same sweep as :func:`sparsegpt_prune` with the mask given up front: any metric's mask
    plus SparseGPT's weight update ("wanda + OBS update"). Dead input columns are zeroed too.

    Args:
        w: ``[out, in]`` dense weights (not modified).
        mask: boolean ``[out, in]``, True = prune.
        h: ``[in, in]`` Hessian / Gram matrix of the layer inputs (not modified; any scale).
        blocksize: columns per lazy-update block (reference 128).
        percdamp: dampening as a fraction of ``mean(diag H)`` (reference 0.01).
        max_retries: dampening retries when the Cholesky factorisation fails.

    Returns:
        The reconstructed weights, zero wherever ``mask`` (float32; float64 for float64 inputs).
    """
    if mask.shape != w.shape:
        raise CompressKitError(f"mask shape {tuple(mask.shape)} does not match weight {tuple(w.shape)}")
    wd, fac = _prepare(w, h, percdamp, max_retries)
    return obs_sweep(wd, fac.u, blocksize, mask=mask.to(torch.bool))[0]
