"""Small pure tensor helpers shared by the runner and plugins (torch is imported lazily)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


def find_linears(module: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside ``module``, by qualified name, in definition order."""
    from torch import nn

    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def wanda_score(weight: torch.Tensor, act_sq: torch.Tensor) -> torch.Tensor:
    """``|W[i,j]| * ||X_j||_2`` from ``act_sq`` (per input column, the sum of squared inputs).

    Wanda's score, shared by metrics built on it (GBLM adds a gradient term). The reference
    divides the sum by the number of sequences first; that factor is uniform in a layer, so
    the ranking (and the mask) is the same.
    """
    return weight.abs() * act_sq.sqrt().unsqueeze(0)


def lowest_mask(scores: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """True at the ``k`` lowest scores along ``dim`` (stable sort: ties go to the lower index)."""
    import torch

    idx = torch.sort(scores, dim=dim, stable=True)[1].narrow(dim, 0, k)
    return torch.zeros_like(scores, dtype=torch.bool).scatter(dim, idx, True)


def kth_smallest(flat: torch.Tensor, k: int, by_sort: bool | None = None) -> torch.Tensor:
    """The ``k``-th smallest value (1-based) of a 1-D tensor, as a 0-d tensor on its device.

    Both ways give the same value (the order statistic is unique): ``torch.kthvalue``'s selection
    on the CPU, and a full sort on CUDA, where ``kthvalue`` of one long slice runs in a single
    thread block and is many times slower than the radix sort (SparseGPT's block threshold and
    ADMM's gradual selection each take one per call). ``by_sort`` forces either way (tests).
    """
    import torch

    if by_sort is None:
        by_sort = flat.is_cuda
    if by_sort:
        return torch.sort(flat).values[k - 1]
    return torch.kthvalue(flat, k).values


def sparsity(t: torch.Tensor) -> float:
    """Fraction of exact zeros in ``t``."""
    return float((t == 0).sum().item()) / max(t.numel(), 1)


def row_prune_count(in_features: int, sparsity: float) -> int:
    """Weights pruned per row at ``sparsity``: ``floor(in_features * sparsity)`` (reference rule)."""
    return int(in_features * sparsity + 1e-9)


def reconstruction_error(w_dense: torch.Tensor, w_pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative output error ``||W X - W' X||^2 / ||W X||^2`` from the Gram matrix ``X^T X``.

    With ``D = W - W'`` the numerator is ``trace(D G D^T)`` and the denominator
    ``trace(W G W^T)``; computed in float64 for stability. A layer whose dense output is zero on
    the calibration data reports 0.0 when the pruned output is zero too (else inf); a non-finite
    numerator or denominator gives NaN, never 0.0.
    """
    import math

    g = gram.double()
    d = (w_dense - w_pruned).double()
    w = w_dense.double()
    num = ((d @ g) * d).sum()
    den = ((w @ g) * w).sum()
    num, den = float(num), float(den)
    if not (math.isfinite(num) and math.isfinite(den)):
        return math.nan
    if den <= 0:
        return 0.0 if num <= 0 else math.inf
    return num / den


def adaptive_row_mask(scores: torch.Tensor, sparsity: float, tol: float = 1e-3) -> torch.Tensor:
    """Wanda's appendix variant: per-row thresholds from a shared metric-mass fraction.

    Each row prunes its smallest scores whose cumulative sum is at most ``alpha`` times the
    row's total; ``alpha`` is found by bisection (start 0.4 on [0, 0.8]) until the layer
    sparsity is within ``tol`` of the target. Unlike the reference code, a row where no prefix
    fits prunes nothing instead of everything (docs/explanation/reference-semantics.md).
    """
    import torch

    s = scores.float()
    sorted_s, order = torch.sort(s, dim=-1, stable=True)
    cums = sorted_s.cumsum(dim=-1)
    totals = s.sum(dim=-1, keepdim=True)
    lo, hi, alpha = 0.0, 0.8, 0.4

    def mask_for(a: float) -> torch.Tensor:
        count = (cums <= a * totals).sum(dim=-1, keepdim=True)  # prefix length per row
        ranks = torch.arange(s.shape[-1], device=s.device).expand_as(s)
        sorted_mask = ranks < count
        return torch.zeros_like(sorted_mask).scatter(-1, order, sorted_mask)

    mask = mask_for(alpha)
    while True:
        cur = mask.float().mean().item()
        if abs(cur - sparsity) <= tol or hi - lo < tol:
            return mask
        if cur > sparsity:
            hi = alpha
        else:
            lo = alpha
        alpha = (lo + hi) / 2
        mask = mask_for(alpha)
