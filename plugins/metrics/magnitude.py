"""Magnitude pruning: score = |W|. No calibration data."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from compresskit import hookimpl
from compresskit.interfaces import LayerContext, MaskPattern, PruneDecision, ScoreMetric
from compresskit.options import option


@hookimpl
def register_metrics(register):
    register(MagnitudeMetric)


class MagnitudeMetric(ScoreMetric):
    """Magnitude baseline (Han et al. 2015; the ``magnitude`` method of Wanda/GBLM/SparseGPT).

    Score = ``|W|``. The reference code compares weights across the whole layer, so
    ``scope=layer`` (default) overrides an unstructured pattern's row scope; ``scope=pattern``
    leaves the pattern's own group (per row). With N:M patterns the N:M groups always apply.

        compresskit prune --metric magnitude --sparsity 0.5
    """

    name = "magnitude"
    summary = "|W| (no calibration); per-layer threshold by default, as the reference"
    needs_calibration = False

    @dataclasses.dataclass(frozen=True)
    class Options:
        scope: Literal["layer", "row", "pattern"] = option(
            "layer", "comparison group for unstructured masks: layer (reference), row, or the pattern's own"
        )

    def score(self, weight: torch.Tensor, state, grad) -> torch.Tensor:
        return weight.abs()

    def prune(self, weight, state, ctx: LayerContext, pattern: MaskPattern, sparsity: float) -> PruneDecision:
        scores = self.score(weight, state, None)
        scope = self.options.scope
        if pattern.nm is None and scope != "pattern" and getattr(pattern.options, "scope", scope) != scope:
            pattern = type(pattern)(dataclasses.replace(pattern.options, scope=scope))
        return PruneDecision(mask=pattern.mask(scores, sparsity))
