"""Gradient-only pruning (GBLM-Pruner's ablation): score = |W| * ||G||_p, no activations."""

from __future__ import annotations

import dataclasses
from typing import Literal

from compresskit import hookimpl
from compresskit.interfaces import ScoreMetric
from compresskit.options import option
from compresskit.stats import REFERENCE_SCALE, GradNorm

INVERSE_EPS = 1e-8


@hookimpl
def register_metrics(register):
    register(GradientMetric)


def gradient_score(weight, grad, inverse: bool = False):
    """``|W| * G``, or ``|W| / (G + 1e-8)`` for the reference's ``--gradient_inv`` ablation."""
    if inverse:
        return weight.abs() / (grad + INVERSE_EPS)
    return weight.abs() * grad


class GradientMetric(ScoreMetric):
    """Gradient-only ablation of GBLM-Pruner, https://arxiv.org/abs/2311.04902 (``--prune_method gradient``).

    Score ``S[i,j] = |W[i,j]| * ||G[:,i,j]||_p`` with ``G`` the per-sample gradients of the dense
    model's loss aggregated with the l1 or l2 norm; no activation statistics (the runner's
    layerwise forwards then serve only the reconstruction-error report: ``--no-error-report``
    skips them). ``inverse=true`` scores ``|W| / (G + 1e-8)`` (the reference's
    ``--gradient_inv``). As in the reference, ``G`` carries scale 100 (irrelevant to the ranking
    of ``|W|*G``; it sets where the 1e-8 floor of the inverse matters), so the reference repo's
    gradient files plug in unchanged via ``--gradients FILE``.

        compresskit prune --adapter llama --metric gradient --sparsity 0.5 -o metric.grad_norm=l2
    """

    name = "gradient"
    summary = "GBLM ablation: |W| * ||G||_p from per-sample gradients, no activations"

    @dataclasses.dataclass(frozen=True)
    class Options:
        grad_norm: Literal["l1", "l2"] = option("l1", "aggregate of per-sample gradients: l1 or l2")
        inverse: bool = option(False, "score |W| / (G + 1e-8) instead of |W| * G (reference --gradient_inv)")

    def statistics(self):
        return (GradNorm(self.options.grad_norm, REFERENCE_SCALE),)

    def score(self, weight, stats):
        return gradient_score(weight, stats[f"grad_{self.options.grad_norm}"], self.options.inverse)
