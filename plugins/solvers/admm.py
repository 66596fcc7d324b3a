"""Solver ``admm``: ADMM weight reconstruction, with a fixed or a gradual mask (arXiv 2401.02938)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from compresskit import hookimpl
from compresskit.errors import OptionError
from compresskit.interfaces import Solver
from compresskit.options import option


@hookimpl
def register_solvers(register):
    register(ADMMSolver)


def pattern_reselect(pattern, structure, scope: str, ramp: bool, target: float):
    """``(scores, s_t, final) -> mask`` of the gradual variant under the run's pattern."""
    from compresskit.admm import lowest_count_mask, nm_gradual_mask
    from compresskit.ops import row_prune_count

    def reselect(scores, s_t, final):
        if not structure.free:  # N:M: the pattern's rule protects its kept weights; ramp over the rest
            return nm_gradual_mask(scores, pattern.mask(scores, target), s_t)
        s = s_t if ramp else target
        if scope == "pattern":
            return pattern.mask(scores, s)
        return lowest_count_mask(scores, row_prune_count(scores.numel(), s))

    return reselect


class ADMMSolver(Solver):
    """ADMM weight update (Boža 2024, https://arxiv.org/abs/2401.02938), fixed or gradual mask.

    For the mask given by the metric, ADMM solves the layer's masked least squares
    ``min ||WX - W'X||^2`` (``W' = 0`` where pruned) from the Gram statistic ``X^T X``, in the
    space preconditioned by ``sqrt(diag X^T X)``, with one factorisation of ``Gn + rho I`` per layer
    and ``iters`` matrix products (no per-column loop). ``gradual=true`` is the paper's best
    variant: during the first ``gradual_iters`` iterations the mask is re-selected from
    ``|V + U|`` (a Wanda-like score of the current iterate) on a cubic schedule; the metric's mask
    seeds the first iteration (``seed=reference``: the paper's seed, ``|W| sqrt(diag G)``).
    Unstructured re-selection prunes the target at every step over the whole matrix, as the
    reference code does (``ramp=false``, default; ``ramp=true``: the schedule of the paper's
    text; ``scope=pattern``: the run's comparison group, e.g. per row). N:M keeps exactly N:M.
    ``swaps`` first refines the metric's mask by swaps (the ``swaps`` solver's algorithm).

        compresskit prune --metric wanda --update admm
        compresskit prune --metric wanda --update admm -o update.gradual=true --pattern 2:4
    """

    name = "admm"
    summary = "ADMM weight update from X^T X (Boza 2024); gradual=true re-selects the mask as it goes"

    @dataclasses.dataclass(frozen=True)
    class Options:
        iters: int = option(20, "ADMM iterations (reference 20)")
        rho: float = option(1.0, "ADMM penalty rho, fixed (reference 1)")
        percdamp: float = option(0.1, "dampening added to diag of the normalised Gram, fraction of its mean (reference 0.1)")
        gradual: bool = option(False, "re-select the mask from |V+U| during the iterations (the paper's best variant)")
        gradual_iters: int = option(15, "iterations that re-select the mask (reference 15); must be <= iters")
        ramp: bool = option(False, "unstructured gradual: cubic ramp of the sparsity (paper text) instead of the "
                                   "reference code's full target at every step")
        seed: Literal["metric", "reference"] = option("metric", "gradual: first mask from the metric, or from "
                                                                "|W| sqrt(diag G) re-selected at step 0 (reference)")
        scope: Literal["layer", "pattern"] = option("layer", "unstructured gradual: one threshold over the matrix "
                                                             "(reference), or the run's pattern (e.g. per row)")
        swaps: int = option(0, "refine the metric's mask by at most this many swaps per row before ADMM (0: off)")

        def __post_init__(self) -> None:
            if self.iters < 1 or not self.rho > 0 or self.percdamp < 0 or self.swaps < 0 or \
                    not 1 <= self.gradual_iters <= self.iters:
                raise OptionError(f"the admm solver needs iters >= 1, rho > 0, percdamp >= 0, swaps >= 0 and "
                                  f"1 <= gradual_iters <= iters (got {self.iters}, {self.rho}, {self.percdamp}, "
                                  f"{self.swaps}, {self.gradual_iters}); e.g. -o update.iters=20 -o update.gradual_iters=15")

    def statistics(self):
        return ("gram",)

    def solve(self, weight, mask, stats):
        from compresskit.admm import admm_update

        o = self.options
        return admm_update(weight, stats["gram"], mask, o.iters, o.rho, o.percdamp)[0]

    def refine_and_solve(self, weight, mask, stats, pattern, sparsity):
        from compresskit.admm import admm_update

        o, st = self.options, pattern.structure
        if o.swaps:
            from compresskit.swaps import refine_mask

            mask = refine_mask(weight, stats["gram"], mask, o.swaps, nm_m=st.m if st.group == "nm" else None)[0]
        if not o.gradual:
            return mask, self.solve(weight, mask, stats)
        target = st.implied_sparsity if st.implied_sparsity is not None else sparsity
        reselect = pattern_reselect(pattern, st, o.scope, o.ramp, target)
        new, mask = admm_update(weight, stats["gram"], mask, o.iters, o.rho, o.percdamp, reselect, o.gradual_iters,
                                target, seeded=o.seed == "metric")
        return mask, new
