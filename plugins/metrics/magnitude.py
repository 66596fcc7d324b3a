"""Magnitude pruning: score = |W|. No calibration data."""

from __future__ import annotations

import dataclasses
from typing import Literal

from compresskit import hookimpl
from compresskit.interfaces import ScoreMetric
from compresskit.options import option


@hookimpl
def register_metrics(register):
    register(MagnitudeMetric)


class MagnitudeMetric(ScoreMetric):
    """Magnitude baseline (Han et al. 2015; the ``magnitude`` method of Wanda/GBLM/SparseGPT).

    Score = ``|W|``. The reference code compares weights across the whole layer, so by default
    (``scope=layer``) planning gives an unstructured pattern the ``layer`` comparison group,
    unless you set ``-o pattern.scope`` yourself; ``scope=row`` asks for per-row groups;
    ``scope=pattern`` leaves the pattern's own. N:M patterns keep their groups (an explicit
    ``scope`` other than the default is then an error).

        compresskit prune --metric magnitude --sparsity 0.5
    """

    name = "magnitude"
    summary = "|W| (no calibration); per-layer threshold by default, as the reference"

    @dataclasses.dataclass(frozen=True)
    class Options:
        scope: Literal["layer", "row", "pattern"] = option(
            "layer", "comparison group for unstructured masks: layer (reference), row, or the pattern's own"
        )

    def comparison_group(self) -> str | None:
        return None if self.options.scope == "pattern" else self.options.scope

    def score(self, weight, stats):
        return weight.abs()
