"""Wanda++ regional gradient score: (alpha * G + ||X_j||_2) * |W| (Yang et al. 2025, arXiv 2503.04992)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from compresskit import hookimpl
from compresskit.errors import OptionError
from compresskit.interfaces import ScoreMetric
from compresskit.ops import wanda_score
from compresskit.options import option
from compresskit.stats import BlockGradNorm

PAPER_ALPHA = 100.0


@hookimpl
def register_metrics(register):
    register(WandaPPMetric)


def rgs_score(weight, act_sq, grad, alpha: float):
    """``(alpha * G + ||X_j||_2) * |W|``; with ``alpha == 0`` exactly Wanda's score."""
    score = wanda_score(weight, act_sq)
    if alpha != 0:
        score = score + alpha * (weight.abs() * grad)
    return score


class WandaPPMetric(ScoreMetric):
    """Wanda++'s regional gradient score (RGS), https://arxiv.org/abs/2503.04992.

    Score ``S[i,j] = (alpha * G[i,j] + ||X_j||_2) * |W[i,j]|``, compared per output row (or in
    N:M groups) like Wanda. ``G`` is a *regional* gradient: for each calibration sample ``n``,
    the gradient of ``||f_l(X_n)||_2`` (the plain L2 norm of block ``l``'s output on that
    sample) with respect to the weight, aggregated over samples as the root mean square
    (``grad=rms``; ``mean_abs`` is the mean of ``|g|``). It is computed one block at a time by a
    backward through that block only, on the block's calibration inputs (the outputs of the
    already pruned blocks) and its unpruned weights: no full-model backward, memory stays one
    block (statistic ``block_grad_rms``). ``||X_j||_2`` is the column norm over every calibration
    token (statistic ``act_sq``), so ``alpha=0`` gives Wanda's mask exactly.

    Wanda++ as published also alternates this pruning with regional optimisation over several
    rounds: ``--update ro -o update.rounds=5 -o update.last=prune`` (the ``ro`` solver; one
    mask-fixed pass by default).

        compresskit prune --metric wandapp --sparsity 0.5 [-o metric.alpha=100] [--update ro]
    """

    name = "wandapp"
    summary = "Wanda++ regional gradient score: (alpha*G + ||X_j||_2)*|W|, G from one block's output norm"

    @dataclasses.dataclass(frozen=True)
    class Options:
        alpha: float = option(PAPER_ALPHA, "weight of the regional gradient term (paper 100)")
        grad: Literal["rms", "mean_abs"] = option(
            "rms", "aggregate of per-sample regional gradients: root mean square (paper) or mean |g|")

        def __post_init__(self) -> None:
            if self.alpha != self.alpha or self.alpha in (float("inf"), float("-inf")) or self.alpha < 0:
                raise OptionError(f"metric.alpha must be a finite number >= 0, got {self.alpha}; e.g. -o metric.alpha=100")

    def statistics(self):
        return ("act_sq", BlockGradNorm(self.options.grad))

    def score(self, weight, stats):
        return rgs_score(weight, stats["act_sq"], stats[f"block_grad_{self.options.grad}"], self.options.alpha)
