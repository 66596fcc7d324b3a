"""RiaMetric: a compresskit metric plugin (``--metric ria``)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from compresskit import ScoreMetric, hookimpl, option

if TYPE_CHECKING:  # torch is imported when a run starts, so `compresskit list` stays fast
    import torch


@hookimpl
def register_metrics(register):
    register(RiaMetric)


def ria_score(weight: torch.Tensor, act_sq: torch.Tensor, power: float) -> torch.Tensor:
    """``|W[i,j]| * ||X_j||_2 ** power``, where ``act_sq[j]`` is the sum of squared inputs of column ``j``."""
    return weight.abs() * act_sq.sqrt().pow(power).unsqueeze(0)


class RiaMetric(ScoreMetric):
    """Weight magnitude times input-activation norm to a power (template: describe your metric here).

    ``S[i,j] = |W[i,j]| * ||X_j||_2 ** power``, where ``X_j`` is input column ``j`` over every
    calibration token; ``power = 1`` is Wanda's score. Higher scores are kept; the pattern
    (``--pattern``) decides how many go in each row or group.

        compresskit prune --metric ria --sparsity 0.5 -o metric.power=0.5
    """

    name = "ria"
    summary = "|W| * ||X_j||^power (template metric: replace with yours)"

    @dataclasses.dataclass(frozen=True)
    class Options:
        power: float = option(1.0, "exponent of the input-activation norm ||X_j||_2")

    def statistics(self):
        return ("act_sq",)  # per input column: the sum of squared inputs over every calibration token

    def score(self, weight, stats):
        return ria_score(weight, stats["act_sq"], self.options.power)
