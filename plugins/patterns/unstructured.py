"""Unstructured sparsity: prune the lowest scores per output row, per layer, or by Wanda's adaptive rule."""

from __future__ import annotations

import dataclasses
from typing import Literal

from compresskit import hookimpl
from compresskit.errors import IncompatiblePatternError
from compresskit.interfaces import MaskPattern, Structure
from compresskit.ops import adaptive_row_mask, lowest_mask, row_prune_count
from compresskit.options import option

GROUPS = ("row", "layer", "adaptive")


@hookimpl
def register_patterns(register):
    register(UnstructuredPattern)


class UnstructuredPattern(MaskPattern):
    """Prune a fraction ``sparsity`` of the weights with the lowest scores.

    ``scope`` is the comparison group: ``row`` (default; Wanda and GBLM) prunes exactly
    ``floor(in_features * sparsity)`` weights in every output row, ties broken by column index
    (stable sort, as the reference); ``layer`` uses one threshold per weight matrix (the
    magnitude baseline's group); ``adaptive`` is Wanda's appendix variant (per-row thresholds
    from a shared fraction of each row's score mass, bisected until the layer hits the target
    within 1e-3). Metrics may ask for a group (magnitude: ``layer``; ``variant=true``:
    ``adaptive``); an explicit ``-o pattern.scope`` wins over a metric's default.

        compresskit prune --metric wanda --pattern unstructured --sparsity 0.5 -o pattern.scope=row
    """

    name = "unstructured"
    summary = "lowest scores pruned per output row (or per layer) to hit the target sparsity"

    @dataclasses.dataclass(frozen=True)
    class Options:
        scope: Literal["row", "layer", "adaptive"] = option(
            "row", "comparison group: each output row, the whole layer, or Wanda's adaptive per-row rule")

    @property
    def structure(self) -> Structure:
        return Structure(self.options.scope)

    def with_group(self, group: str) -> UnstructuredPattern | None:
        return UnstructuredPattern(dataclasses.replace(self.options, scope=group)) if group in GROUPS else None

    def check(self, layer_name: str, weight_shape: tuple[int, int], sparsity: float) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise IncompatiblePatternError(f"layer {layer_name}: sparsity must be in [0, 1), got {sparsity}")

    def mask(self, scores, sparsity: float):
        if self.options.scope == "row":
            return lowest_mask(scores, row_prune_count(scores.shape[-1], sparsity))
        if self.options.scope == "adaptive":
            return adaptive_row_mask(scores, sparsity)
        flat = scores.flatten()
        return lowest_mask(flat, row_prune_count(flat.numel(), sparsity), dim=0).view_as(scores)
