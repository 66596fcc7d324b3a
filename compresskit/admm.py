"""ADMM weight reconstruction for a fixed or a gradually tightened mask (Boža 2024).

Pure tensor functions behind the ``admm`` solver ("Fast and Effective Weight Update for Pruned
Large Language Models", https://arxiv.org/abs/2401.02938). For one linear layer ``W [out, in]``
with the Gram matrix ``G = X^T X`` of its inputs, the update solves the masked least squares

    min_W' ||(W - W') X||^2   subject to  W' = 0 where the mask prunes

by ADMM, in the space preconditioned by ``d = sqrt(diag G)`` (where ``|W d|`` is the Wanda
score): ``Gn = D^-1 G D^-1 + lambda I`` with ``lambda = percdamp * mean(diag Gn)``,
``V0 = W D``, ``B = V0 Gn``; with ``U = 0`` and ``V = V0``, each iteration does

    Z = (V + U) * keep;   U += V - Z;   V = (B + rho (Z - U)) (Gn + rho I)^-1

and the result is ``Z / d`` (the exact-sparse projection). The gradual variant re-selects the
keep mask from ``|V + U|`` during the first ``gradual_iters`` iterations on the cubic schedule
``s_t = s (1 - (1 - (t+1)/gradual_iters)^3)``. Rows are outputs here (the reference works on the
transpose); the arithmetic is the same. Computation is float32 (float64 inputs stay float64),
on the weight's device.
"""

from __future__ import annotations

from typing import Callable

import torch

from compresskit.errors import CompressKitError
from compresskit.ops import kth_smallest, row_prune_count

# (scores [out, in], sparsity s_t, final step?) -> boolean mask, True = prune
Reselect = Callable[[torch.Tensor, float, bool], torch.Tensor]


def _work(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def precondition(w: torch.Tensor, gram: torch.Tensor, percdamp: float, rho: float):
    """``(d, V0, B, Hinv)``: the preconditioned problem of one layer (see the module docstring)."""
    if gram.shape != (w.shape[1], w.shape[1]):
        raise CompressKitError(f"Gram shape {tuple(gram.shape)} does not match weight {tuple(w.shape)}; it must be "
                               f"[in_features, in_features] = [{w.shape[1]}, {w.shape[1]}]")
    dt = _work(w)
    g = gram.to(dtype=dt)
    if not torch.isfinite(g).all():
        raise CompressKitError("the Gram matrix of the layer inputs holds NaN or inf values; the calibration forward "
                               "passes produced non-finite activations. Check the model dtype and calibration data.")
    d = g.diagonal().clamp_min(0).sqrt() + 1e-8
    gn = g / d.unsqueeze(0) / d.unsqueeze(1)
    gn.diagonal().add_(percdamp * gn.diagonal().mean())
    v0 = w.to(dt) * d.unsqueeze(0)
    b = v0 @ gn
    gn.diagonal().add_(rho)
    low, info = torch.linalg.cholesky_ex(gn)
    if info != 0:
        raise CompressKitError("the dampened Gram matrix is not positive definite; raise -o update.percdamp or rho")
    return d, v0, b, torch.cholesky_inverse(low)


def cubic_schedule(t: int, gradual_iters: int, sparsity: float) -> float:
    """Sparsity of gradual step ``t`` (0-based): ``s (1 - (1 - (t+1)/K)^3)``; ``s`` from step K-1 on."""
    return sparsity * (1.0 - (1.0 - min(t + 1, gradual_iters) / gradual_iters) ** 3)


def lowest_count_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Prune exactly the ``k`` lowest scores of the whole matrix (ties at the threshold by position)."""
    flat = scores.flatten()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= flat.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    v = kth_smallest(flat, k)  # far cheaper than a top-k of half the matrix
    mask = flat < v
    tied = (flat == v).nonzero().squeeze(1)
    mask[tied[: k - int(mask.sum())]] = True
    return mask.view_as(scores)


def nm_gradual_mask(scores: torch.Tensor, nm_mask: torch.Tensor, sparsity: float) -> torch.Tensor:
    """N:M under a ramp: of the weights the N:M rule would prune (``nm_mask``), the
    ``floor(numel * sparsity)`` lowest-scoring over the matrix are pruned (all at the full target)."""
    k = min(row_prune_count(scores.numel(), sparsity), int(nm_mask.sum()))
    return lowest_count_mask(scores.masked_fill(~nm_mask, float("inf")), k)


def admm_update(w: torch.Tensor, gram: torch.Tensor, mask: torch.Tensor, iters: int = 20, rho: float = 1.0,
                percdamp: float = 0.1, reselect: Reselect | None = None, gradual_iters: int = 15,
                sparsity: float = 0.0, seeded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """ADMM reconstruction of ``w`` (not modified); returns ``(new_weight, mask)``, zero where ``mask``.

    Args:
        w: ``[out, in]`` dense weights.
        gram: ``[in, in]`` Gram matrix of the layer inputs (any positive scale).
        mask: boolean ``[out, in]``, True = prune: the fixed mask, or the gradual variant's seed.
        iters: ADMM iterations (reference 20).
        rho: ADMM penalty (reference 1, fixed).
        percdamp: dampening as a fraction of ``mean(diag Gn)`` (reference 0.1).
        reselect: None for a fixed mask; else ``(|V+U|, s_t, final) -> mask`` called at each of
            the first ``gradual_iters`` iterations with the cubic schedule's ``s_t``.
        gradual_iters: iterations that re-select the mask (reference 15); the rest keep it.
        sparsity: the layer's target, for the schedule.
        seeded: the first iteration keeps ``mask`` (the metric's) instead of re-selecting.
    """
    if mask.shape != w.shape:
        raise CompressKitError(f"mask shape {tuple(mask.shape)} does not match weight {tuple(w.shape)}")
    d, v, b, hinv = precondition(w, gram, percdamp, rho)
    prune = mask.to(dtype=torch.bool)
    u = torch.zeros_like(v)
    for t in range(iters):
        if reselect is not None and t < gradual_iters and not (seeded and t == 0):
            prune = reselect((v + u).abs(), cubic_schedule(t, gradual_iters, sparsity), t == gradual_iters - 1)
        z = (v + u).masked_fill(prune, 0.0)
        u += v - z
        v = (b + rho * (z - u)) @ hinv
    z = (v + u).masked_fill(prune, 0.0)
    out = z / d.unsqueeze(0)
    if not torch.isfinite(out).all():
        raise CompressKitError("the ADMM update produced non-finite weights; raise -o update.percdamp")
    return out.to(_work(w)), prune
