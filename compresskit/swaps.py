"""Mask refinement by swaps (SparseSwaps, https://arxiv.org/abs/2512.10922): pure tensor functions.

For one layer ``W [out, in]`` with Gram ``G = X^T X`` and a mask (True = prune), row ``r``'s
reconstruction error without any update is ``L_r = e_r G e_r^T`` with ``e_r = W_r * mask_r`` (the
pruned part of the row). With ``c = e G`` kept up to date, the exact change of ``L_r`` when the
kept weight ``i`` is pruned and the pruned weight ``j`` restored is

    delta = (2 w_i c_i + w_i^2 G_ii) + (-2 w_j c_j + w_j^2 G_jj) - 2 w_i w_j G_ij

Every step makes, in each row, the best swap among its candidates when ``delta < 0`` and updates
``c`` exactly (``c_r += w_i G_i - w_j G_j``), so the per-row prune counts never change and no
row's error ever rises. Unstructured: the candidates are the ``candidates`` kept weights with
the smallest first term and the ``candidates`` pruned weights with the smallest second term, and
all their pairs are scored exactly. N:M: every (kept, pruned) pair inside each group of ``m``
is scored, so the mask stays N:M. Bookkeeping is float64 on the weight's device.
"""

from __future__ import annotations

import torch

from compresskit.errors import CompressKitError


def row_errors(w: torch.Tensor, gram: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``L_r = e_r G e_r^T`` per row (float64), ``e = W * mask``: the error of plain masking."""
    e = w.double().masked_fill(~mask, 0.0)
    return ((e @ gram.double()) * e).sum(1)


def _pairs_unstructured(w, c, gd, g, mask, k):
    a = 2 * w * c + w * w * gd  # cost of pruning a kept weight
    b = -2 * w * c + w * w * gd  # cost of restoring a pruned weight
    kk = max(1, min(k, int((~mask).sum(1).min()), int(mask.sum(1).min())))
    ai, ii = torch.topk(a.masked_fill(mask, float("inf")), kk, dim=1, largest=False)
    bj, jj = torch.topk(b.masked_fill(~mask, float("inf")), kk, dim=1, largest=False)
    wi, wj = w.gather(1, ii), w.gather(1, jj)
    delta = ai.unsqueeze(2) + bj.unsqueeze(1) - 2 * wi.unsqueeze(2) * wj.unsqueeze(1) * g[ii.unsqueeze(2), jj.unsqueeze(1)]
    best, arg = delta.flatten(1).min(1)
    return best, ii.gather(1, (arg // kk).unsqueeze(1)).squeeze(1), jj.gather(1, (arg % kk).unsqueeze(1)).squeeze(1)


def _pairs_nm(w, c, gd, g, mask, m):
    out, n_in = w.shape
    a = (2 * w * c + w * w * gd).masked_fill(mask, float("inf")).view(out, n_in // m, m)
    b = (-2 * w * c + w * w * gd).masked_fill(~mask, float("inf")).view(out, n_in // m, m)
    idx = torch.arange(n_in, device=w.device).view(n_in // m, m)
    gb = g[idx.unsqueeze(2), idx.unsqueeze(1)]  # [groups, m, m] diagonal blocks of G
    wg = w.view(out, n_in // m, m)
    delta = a.unsqueeze(3) + b.unsqueeze(2) - 2 * wg.unsqueeze(3) * wg.unsqueeze(2) * gb.unsqueeze(0)
    best, arg = delta.flatten(1).min(1)
    grp, rest = arg // (m * m), arg % (m * m)
    return best, grp * m + rest // m, grp * m + rest % m


def refine_mask(w: torch.Tensor, gram: torch.Tensor, mask: torch.Tensor, max_swaps: int = 100,
                candidates: int = 8, nm_m: int | None = None) -> tuple[torch.Tensor, int]:
    """Swap kept and pruned weights within rows (or N:M groups) while it lowers each row's error.

    Args:
        w: ``[out, in]`` dense weights (not modified).
        gram: ``[in, in]`` Gram matrix of the layer inputs.
        mask: boolean ``[out, in]``, True = prune (not modified).
        max_swaps: at most this many swaps per row.
        candidates: kept/pruned candidates per row and step (unstructured).
        nm_m: the group width for N:M masks (swaps stay inside groups); None for unstructured.

    Returns:
        ``(refined mask, swaps made in all rows)``; prune counts per row (and per group) unchanged.
    """
    if mask.shape != w.shape or gram.shape != (w.shape[1], w.shape[1]):
        raise CompressKitError(f"swaps need mask {tuple(w.shape)} and Gram {(w.shape[1],) * 2}; got "
                               f"{tuple(mask.shape)} and {tuple(gram.shape)}")
    if nm_m is not None and w.shape[1] % nm_m:
        raise CompressKitError(f"N:M swaps need in_features ({w.shape[1]}) divisible by m={nm_m}")
    g = gram.to(dtype=torch.float64)
    wd = w.to(torch.float64)
    mask = mask.to(dtype=torch.bool).clone()
    if not torch.isfinite(g).all() or not torch.isfinite(wd).all():
        raise CompressKitError("swaps got non-finite weights or Gram matrix; check the calibration forward passes")
    if not mask.any() or mask.all():
        return mask, 0
    gd = g.diagonal().unsqueeze(0)
    c = wd.masked_fill(~mask, 0.0) @ g
    rows = torch.arange(w.shape[0], device=w.device)
    total = 0
    for _ in range(max_swaps):
        if nm_m is None:
            best, i, j = _pairs_unstructured(wd, c, gd, g, mask, candidates)
        else:
            best, i, j = _pairs_nm(wd, c, gd, g, mask, nm_m)
        scale = (c * wd.masked_fill(~mask, 0.0)).sum(1).abs()
        take = best < -1e-12 * (scale + 1e-30)  # a strict, numerically meaningful decrease only
        if not take.any():
            break
        r, i, j = rows[take], i[take], j[take]
        wi, wj = wd[r, i], wd[r, j]
        c[r] += wi.unsqueeze(1) * g[i] - wj.unsqueeze(1) * g[j]
        mask[r, i], mask[r, j] = True, False
        total += int(take.sum())
    return mask, total
