"""Solver ``swaps``: refine any metric's mask by exact-error swaps, then update (arXiv 2512.10922)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from compresskit import hookimpl
from compresskit.errors import OptionError
from compresskit.interfaces import Solver
from compresskit.options import option


@hookimpl
def register_solvers(register):
    register(SwapsSolver)


class SwapsSolver(Solver):
    """Mask refinement by swaps (SparseSwaps, https://arxiv.org/abs/2512.10922), then an update.

    Starting from the metric's mask, each row repeatedly exchanges one kept and one pruned
    weight (inside the same group of ``m`` for N:M) when that lowers the row's reconstruction
    error ``||(W - W*keep) X||^2``, computed exactly from the Gram statistic ``X^T X`` and kept
    up to date after every swap; prune counts per row and per group never change, and no row's
    error ever rises. Unstructured swaps score all pairs of the ``candidates`` most promising
    kept and pruned weights of each row; N:M swaps score every pair in every group. Then the
    kept weights are updated by ``then``: ``none`` (keep them), ``obs`` (SparseGPT's OBS sweep,
    ``percdamp`` 0.01 as its default) or ``admm`` (the fixed-mask ADMM update, 20 iterations,
    ``percdamp`` 0.1). For the gradual ADMM after swaps use ``--update admm -o update.swaps=N``.

        compresskit prune --metric wanda --update swaps -o update.then=admm
    """

    name = "swaps"
    summary = "refine the metric's mask by exact-error swaps in rows / N:M groups (SparseSwaps), then update"

    @dataclasses.dataclass(frozen=True)
    class Options:
        max_swaps: int = option(100, "at most this many swaps per row")
        candidates: int = option(8, "kept and pruned candidates per row scored pairwise at each step (unstructured)")
        then: Literal["none", "obs", "admm"] = option("none", "weight update after the swaps")
        percdamp: float | None = option(None, "dampening of the update (default: obs 0.01, admm 0.1)")

        def __post_init__(self) -> None:
            if self.max_swaps < 0 or self.candidates < 1 or (self.percdamp is not None and not self.percdamp > 0):
                raise OptionError(f"the swaps solver needs max_swaps >= 0, candidates >= 1 and percdamp > 0 (got "
                                  f"{self.max_swaps}, {self.candidates}, {self.percdamp}); e.g. -o update.max_swaps=100")

    def statistics(self):
        return ("gram",)

    def solve(self, weight, mask, stats):
        o = self.options
        if o.then == "obs":
            from compresskit.obs import obs_update

            return obs_update(weight, mask, stats["gram"], percdamp=o.percdamp or 0.01)
        if o.then == "admm":
            from compresskit.admm import admm_update

            return admm_update(weight, stats["gram"], mask, percdamp=o.percdamp or 0.1)[0]
        return weight.masked_fill(mask, 0.0)

    def refine_and_solve(self, weight, mask, stats, pattern, sparsity):
        from compresskit.swaps import refine_mask

        st = pattern.structure
        mask = refine_mask(weight, stats["gram"], mask, self.options.max_swaps, self.options.candidates,
                           nm_m=st.m if st.group == "nm" else None)[0]
        return mask, self.solve(weight, mask, stats)
