"""Unstructured sparsity: prune the lowest scores per output row or per layer."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from compresskit import hookimpl
from compresskit.interfaces import MaskPattern
from compresskit.options import option
from compresskit.ops import row_prune_count


@hookimpl
def register_patterns(register):
    register(UnstructuredPattern)


class UnstructuredPattern(MaskPattern):
    """Prune a fraction ``sparsity`` of the weights with the lowest scores.

    ``scope=row`` (default; Wanda and GBLM) prunes exactly ``floor(in_features * sparsity)``
    weights in every output row, ties broken by column index (stable sort, as the reference).
    ``scope=layer`` uses one threshold per weight matrix (the magnitude baseline's group).

        compresskit prune --metric wanda --pattern unstructured --sparsity 0.5 -o pattern.scope=row
    """

    name = "unstructured"
    summary = "lowest scores pruned per output row (or per layer) to hit --sparsity"

    @dataclasses.dataclass(frozen=True)
    class Options:
        scope: Literal["row", "layer"] = option("row", "comparison group: each output row, or the whole layer")

    def check(self, layer_name: str, weight_shape: tuple[int, int], sparsity: float) -> None:
        from compresskit.errors import IncompatiblePatternError

        if not 0.0 <= sparsity < 1.0:
            raise IncompatiblePatternError(f"--sparsity must be in [0, 1), got {sparsity}")

    def mask(self, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        if self.options.scope == "row":
            k = row_prune_count(scores.shape[-1], sparsity)
            idx = torch.sort(scores, dim=-1, stable=True)[1][..., :k]
            return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)
        flat = scores.flatten()
        k = row_prune_count(flat.numel(), sparsity)
        idx = torch.sort(flat, stable=True)[1][:k]
        return torch.zeros_like(flat, dtype=torch.bool).scatter(0, idx, True).view_as(scores)
