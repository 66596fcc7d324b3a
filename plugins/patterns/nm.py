"""N:M semi-structured sparsity: in every aligned group of m input columns, prune n."""

from __future__ import annotations

import dataclasses

from compresskit import hookimpl
from compresskit.errors import IncompatiblePatternError
from compresskit.interfaces import MaskPattern, Structure
from compresskit.options import option


@hookimpl
def register_patterns(register):
    register(NMPattern)


class NMPattern(MaskPattern):
    """N:M sparsity: in each row, every aligned group of ``m`` consecutive input columns
    (columns 0..m-1, m..2m-1, ...) loses its ``n`` lowest-scored weights.

    **n counts pruned weights**, as in the Wanda/GBLM reference code (``prune_n``). For 2:4 and
    4:8 this equals NVIDIA's "n kept of m" convention because n = m/2; for other ratios it does
    not (``--pattern 1:4`` prunes 1 of every 4, i.e. 25% sparsity). The pattern implies the
    sparsity ``n/m``; an explicit ``--sparsity`` that differs, a sparsity map or a non-uniform
    allocation is an error.

        compresskit prune --metric wanda --pattern 2:4
    """

    name = "nm"
    summary = "N:M semi-structured (n pruned in every aligned group of m inputs; --pattern 2:4)"

    @dataclasses.dataclass(frozen=True)
    class Options:
        n: int = option(2, "weights pruned in each group of m")
        m: int = option(4, "group size along the input dimension")

    def __init__(self, options=None) -> None:
        super().__init__(options)
        n, m = self.options.n, self.options.m
        if not 0 < n < m:
            raise IncompatiblePatternError(f"N:M pattern needs 0 < n < m, got n={n}, m={m} (e.g. --pattern 2:4)")

    @property
    def structure(self) -> Structure:
        return Structure("nm", self.options.n, self.options.m)

    def check(self, layer_name: str, weight_shape: tuple[int, int], sparsity: float) -> None:
        n, m = self.options.n, self.options.m
        if weight_shape[-1] % m:
            raise IncompatiblePatternError(
                f"layer {layer_name} has in_features={weight_shape[-1]}, not divisible by m={m}, so "
                f"{n}:{m} cannot apply; use --pattern unstructured or a model whose widths are multiples of {m}"
            )
        if abs(sparsity - n / m) > 1e-9:
            raise IncompatiblePatternError(
                f"layer {layer_name}: sparsity {sparsity:g} contradicts --pattern {n}:{m}, which implies {n / m:g}; "
                f"drop --sparsity (and per-layer targets) or use --pattern unstructured"
            )

    def mask(self, scores, sparsity: float):
        import torch

        n, m = self.options.n, self.options.m
        groups = scores.float().reshape(*scores.shape[:-1], -1, m)  # [out, in/m, m]
        idx = torch.topk(groups, n, dim=-1, largest=False)[1]
        return torch.zeros_like(groups, dtype=torch.bool).scatter(-1, idx, True).reshape(scores.shape)
