"""SparseGPT: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh 2023)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from compresskit import hookimpl
from compresskit.errors import CompressKitError
from compresskit.interfaces import LayerContext, MaskPattern, PruneDecision, ScoreMetric
from compresskit.obs import inverse_hessian_factor, obs_saliency, sparsegpt_prune
from compresskit.ops import gram_update
from compresskit.options import option


@hookimpl
def register_metrics(register):
    register(SparseGPTMetric)


class SparseGPTMetric(ScoreMetric):
    """SparseGPT, https://arxiv.org/abs/2301.00774 (IST-DASLab/sparsegpt).

    Per linear layer, with the Hessian ``H = sum_t x_t x_t^T`` of its calibration inputs (the
    reference's ``2/N`` factor changes nothing: dampening is relative and the update is
    scale-free), columns are swept left to right in blocks of ``blocksize``. Every column is
    pruned by the Optimal Brain Surgeon rule and its error is spread over the columns not yet
    processed, so the kept weights are *updated* to reconstruct the dense layer's output. The
    mask is chosen inside the sweep from the saliency ``w^2 / U_jj^2`` (``U``: upper Cholesky
    factor of the dampened ``H^-1``) on the already-updated weights:

    - unstructured, ``mask_scope=block`` (reference): at the start of each block, one threshold
      over the whole block across all rows, pruning ``floor(s * rows * blocksize) + 1`` weights
      (plus ties); rows may differ. ``mask_scope=pattern`` instead applies the pattern's own mask
      to each block's saliencies (``unstructured`` with ``scope=row``: exactly
      ``floor(s * blocksize)`` per row and block, Wanda's comparison group).
    - N:M: at every m-th column the pattern's mask picks the ``n`` lowest saliencies per row
      among the next ``m`` columns (``blocksize`` must be a multiple of ``m``).

    Preconditioning follows the reference: inputs never seen (``H_jj = 0``) are zeroed,
    ``percdamp * mean(diag H)`` is added to the diagonal, and a failed Cholesky factorisation
    is retried with 10x the dampening (``max_retries`` times, with a warning). In a run the
    runner collects ``H`` (``needs_hessian``), which also makes it run the calibration forwards;
    ``needs_calibration`` is False because the runner need not keep a second, per-metric copy of
    ``H``. Outside the runner, ``init_state``/``update`` accumulate ``H`` so that ``score`` works
    on its own. Usage::

        compresskit prune --metric sparsegpt --sparsity 0.5
        compresskit prune --metric sparsegpt --pattern 2:4 -o metric.blocksize=64

    ``--update obs`` is implied (the metric returns the updated weights itself). The update fits
    the kept weights to the calibration inputs, so with few calibration tokens per input feature
    it overfits them: the in-sample error reported per layer drops far more than the error on
    held-out text. Use many samples (the reference: 128 x 2048 tokens) or a larger ``percdamp``.
    """

    name = "sparsegpt"
    summary = "OBS reconstruction (SparseGPT): adaptive mask + weight update from the layer Hessian"
    needs_calibration = False  # no per-metric accumulator in runs: needs_hessian runs the forwards
    needs_hessian = True

    @dataclasses.dataclass(frozen=True)
    class Options:
        percdamp: float = option(0.01, "dampening added to diag(H), as a fraction of its mean (reference 0.01)")
        blocksize: int = option(128, "columns per lazy-update block; a multiple of m for N:M (reference 128)")
        mask_scope: Literal["block", "pattern"] = option(
            "block", "unstructured comparison group: whole block across rows (reference) or the pattern's own"
        )
        max_retries: int = option(4, "times a failed Cholesky is retried with 10x the dampening")

    def __init__(self, options=None) -> None:
        super().__init__(options)
        o = self.options
        if o.percdamp <= 0 or o.blocksize < 1 or o.max_retries < 0:
            raise CompressKitError(
                f"sparsegpt needs percdamp > 0, blocksize >= 1 and max_retries >= 0 (got {o.percdamp}, "
                f"{o.blocksize}, {o.max_retries}); e.g. -o metric.percdamp=0.01 -o metric.blocksize=128"
            )

    def init_state(self, layer) -> torch.Tensor:
        """A zero ``[in, in]`` Hessian accumulator (used outside the runner, see the class doc)."""
        n = layer.in_features
        return torch.zeros(n, n, dtype=torch.float32, device=layer.weight.device)

    def update(self, state: torch.Tensor, inputs: torch.Tensor) -> None:
        gram_update(state, inputs)

    def score(self, weight: torch.Tensor, state: torch.Tensor | None, grad) -> torch.Tensor:
        """OBS saliency ``w^2 / U_jj^2`` of the dense weights, before any update.

        Args:
            weight: ``[out, in]`` float32 weights.
            state: the layer's Hessian ``X^T X`` (``[in, in]``): from ``init_state``/``update``,
                or ``ctx.hessian`` as the runner collects it.
            grad: unused.

        ``U_jj^2`` is the diagonal of the inverse of ``H`` restricted to columns ``j..end`` (for
        column 0 the full ``[H^-1]_00``), i.e. the score the sweep's first mask selection uses.
        """
        if state is None:
            raise CompressKitError(
                "sparsegpt scores need the layer Hessian: call score(weight, hessian, None) with "
                "hessian = X^T X of the layer inputs (init_state + update accumulate it; the runner passes ctx.hessian)"
            )
        fac = inverse_hessian_factor(state, self.options.percdamp, self.options.max_retries)
        return obs_saliency(weight.float().masked_fill(fac.dead.unsqueeze(0), 0.0), fac.u.diagonal().float())

    def prune(self, weight, state, ctx: LayerContext, pattern: MaskPattern, sparsity: float) -> PruneDecision:
        h = ctx.hessian if ctx.hessian is not None else state
        if h is None:
            raise CompressKitError(f"sparsegpt got no Hessian for layer {ctx.name}; run it through compresskit.prune()")
        o, nm = self.options, pattern.nm
        select = pattern.mask if nm is not None or o.mask_scope == "pattern" else None
        try:
            new, mask = sparsegpt_prune(
                weight, h, sparsity, nm, o.blocksize, o.percdamp, select=select, max_retries=o.max_retries
            )
        except CompressKitError as exc:
            raise CompressKitError(f"block {ctx.block_index} {ctx.name}: {exc}") from exc
        return PruneDecision(mask=mask, weight=new)
