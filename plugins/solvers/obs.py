"""Solvers ``none`` and ``obs``: keep the kept weights, or reconstruct them with SparseGPT's OBS sweep."""

from __future__ import annotations

import dataclasses

from compresskit import hookimpl
from compresskit.errors import OptionError
from compresskit.interfaces import Solver
from compresskit.options import option


@hookimpl
def register_solvers(register):
    register(NoUpdate)
    register(OBSSolver)


class NoUpdate(Solver):
    """No weight update: the pruned weights are set to zero and every kept weight stays as it was.

        compresskit prune --metric wanda --update none
    """

    name = "none"
    summary = "zero the pruned weights, keep the rest unchanged (default)"


class OBSSolver(Solver):
    """Optimal Brain Surgeon reconstruction (SparseGPT, https://arxiv.org/abs/2301.00774).

    With the mask fixed, the kept weights are updated column by column so that the layer's
    output on the calibration inputs stays as close as possible to the dense layer's: blocked
    sweeps with lazy updates over the upper Cholesky factor ``U`` of the dampened inverse of
    ``H = X^T X`` (statistic ``gram``). Inputs never seen (``H_jj = 0``) are zeroed;
    ``percdamp * mean(diag H)`` is added to the diagonal and a failed Cholesky factorisation is
    retried with ten times the dampening (``max_retries`` times, with a warning). With any
    metric this is "metric + OBS update"; the ``sparsegpt`` metric lets this solver also choose
    the mask inside the sweep (``select_and_solve``).

        compresskit prune --metric wanda --update obs -o update.percdamp=0.01
    """

    name = "obs"
    summary = "OBS weight reconstruction from the layer Hessian (SparseGPT's update)"

    @dataclasses.dataclass(frozen=True)
    class Options:
        percdamp: float = option(0.01, "dampening added to diag(H), as a fraction of its mean (reference 0.01)")
        blocksize: int = option(128, "columns per lazy-update block; a multiple of m for N:M (reference 128)")
        max_retries: int = option(4, "times a failed Cholesky is retried with 10x the dampening")

        def __post_init__(self) -> None:
            if not self.percdamp > 0 or self.blocksize < 1 or self.max_retries < 0:
                raise OptionError(
                    f"the obs solver needs percdamp > 0, blocksize >= 1 and max_retries >= 0 (got {self.percdamp}, "
                    f"{self.blocksize}, {self.max_retries}); e.g. -o update.percdamp=0.01 -o update.blocksize=128")

    def statistics(self):
        return ("gram",)

    def solve(self, weight, mask, stats):
        from compresskit.obs import obs_update

        o = self.options
        return obs_update(weight, mask, stats["gram"], o.blocksize, o.percdamp, o.max_retries)

    def select_and_solve(self, weight, stats, metric, pattern, sparsity):
        from compresskit.obs import sparsegpt_prune

        o, st = self.options, pattern.structure
        nm = (st.n, st.m) if st.group == "nm" else None
        new, mask = sparsegpt_prune(weight, stats["gram"], sparsity, nm, o.blocksize, o.percdamp,
                                    select=lambda sal, s: metric.select(sal, pattern, s), max_retries=o.max_retries)
        return mask, new
