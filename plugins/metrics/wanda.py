"""Wanda: score = |W| * ||X_j||_2 (Sun et al. 2023, arXiv 2306.11695)."""

from __future__ import annotations

import dataclasses

from compresskit import hookimpl
from compresskit.interfaces import ScoreMetric
from compresskit.ops import wanda_score
from compresskit.options import option


@hookimpl
def register_metrics(register):
    register(WandaMetric)


class WandaMetric(ScoreMetric):
    """Wanda (Pruning by Weights and activations), https://arxiv.org/abs/2306.11695.

    Score ``S[i,j] = |W[i,j]| * ||X_j||_2`` where ``X_j`` is input column j over every
    calibration token (the ``act_sq`` statistic), compared per output row. ``variant=true`` asks
    for the paper's adaptive per-row threshold (appendix; ``--use_variant`` in the reference),
    i.e. the unstructured pattern's ``adaptive`` comparison group; it needs an unstructured pattern.

        compresskit prune --metric wanda --sparsity 0.5 [-o metric.variant=true]
    """

    name = "wanda"
    summary = "|W| * ||X_j||_2 (weights and activations), per output row"

    @dataclasses.dataclass(frozen=True)
    class Options:
        variant: bool = option(False, "adaptive per-row threshold (Wanda appendix, unstructured only)")

    def statistics(self):
        return ("act_sq",)

    def comparison_group(self) -> str | None:
        return "adaptive" if self.options.variant else None

    def score(self, weight, stats):
        return wanda_score(weight, stats["act_sq"])
