"""SparseGPT: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh 2023)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from compresskit import hookimpl
from compresskit.interfaces import ScoreMetric
from compresskit.options import option


@hookimpl
def register_metrics(register):
    register(SparseGPTMetric)


class SparseGPTMetric(ScoreMetric):
    """SparseGPT, https://arxiv.org/abs/2301.00774 (IST-DASLab/sparsegpt).

    The mask is chosen *inside* the OBS reconstruction (the ``obs`` solver, whose options
    ``-o update.percdamp``, ``-o update.blocksize`` and ``-o update.max_retries`` apply): columns
    are swept left to right in blocks, every pruned weight's error is spread over the columns not
    yet processed, and the mask is picked from the saliency ``w^2 / U_jj^2`` (``U``: upper
    Cholesky factor of the dampened inverse Hessian ``(X^T X)^-1``) on the already-updated
    weights:

    - unstructured, ``mask_scope=block`` (reference): at the start of each block, one threshold
      over the whole block across all rows, pruning ``floor(s * rows * blocksize) + 1`` weights
      (plus ties); rows may differ. ``mask_scope=pattern`` instead applies the pattern's own mask
      to each block's saliencies (``unstructured`` with ``scope=row``: exactly
      ``floor(s * blocksize)`` per row and block, Wanda's comparison group).
    - N:M (and any pattern with a fixed structure): at every m-th column the pattern's mask picks
      the weights among the next ``m`` columns (``blocksize`` must be a multiple of ``m``).

    The update fits the kept weights to the calibration inputs, so with few calibration tokens
    per input feature it overfits them: the in-sample error reported per layer drops far more
    than the error on held-out text. Use many samples (the reference: 128 x 2048 tokens) or a
    larger ``percdamp``.

        compresskit prune --metric sparsegpt --sparsity 0.5
        compresskit prune --metric sparsegpt --pattern 2:4 -o update.blocksize=64
    """

    name = "sparsegpt"
    summary = "OBS reconstruction (SparseGPT): adaptive mask + weight update from the layer Hessian"
    mask_solver = "obs"

    @dataclasses.dataclass(frozen=True)
    class Options:
        mask_scope: Literal["block", "pattern"] = option(
            "block", "unstructured comparison group: whole block across rows (reference) or the pattern's own"
        )

    def statistics(self):
        return ("gram",)

    def select(self, saliency, pattern, sparsity):
        """Mask of one window of OBS saliencies: the block-wide threshold, or the pattern's mask."""
        from compresskit.obs import block_threshold_mask

        if self.options.mask_scope == "block" and pattern.structure.free:
            return block_threshold_mask(saliency, sparsity)
        return pattern.mask(saliency, sparsity)
