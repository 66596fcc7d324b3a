"""Solver ``ro``: Wanda++'s regional optimisation, with the mask fixed (arXiv 2503.04992)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal

from compresskit import hookimpl
from compresskit.errors import CompressKitError, OptionError
from compresskit.interfaces import Solver
from compresskit.options import option

if TYPE_CHECKING:
    from compresskit.run import Run


@hookimpl
def register_solvers(register):
    register(ROSolver)


class ROSolver(Solver):
    """Regional optimisation (RO) from Wanda++, https://arxiv.org/abs/2503.04992.

    After every layer of a block is pruned, the block's weights (its prunable linear weights;
    norms and biases stay) are tuned for ``steps`` optimiser steps to bring the block's output
    back to the dense block's: each step takes one calibration sample (a seeded shuffle of the
    block's calibration inputs, the outputs of the already pruned blocks above) and minimises
    ``||f_dense(X) - f_pruned(X)||^2`` (sum of squares). Weights of a block in float16/bfloat16
    are tuned in float32 and cast back. ``keep_best`` restores the block's weights when tuning
    raised its output error on the calibration inputs; per-block errors before and after each
    round are recorded in the manifest (``notes.ro``).

    ``rounds`` (default 1) is the number of RO passes per block. With 1, RO runs once with the
    mask fixed (gradients of pruned weights zeroed, the mask re-applied after every step). The
    paper alternates pruning and RO for 5 rounds, RO updating whole weight matrices so pruned
    weights can come back, and prunes a last time after the last RO: that is ``rounds=5
    last=prune`` (``--metric wandapp`` recomputes its regional gradients for every prune). With
    ``last=ro`` (default) the last of the ``rounds`` passes keeps the mask instead, so the block
    ends tuned for its final mask (compresskit's variant). Each re-prune uses the run's metric on
    the tuned weights with statistics collected again from the tuned block.

    Defaults are the paper's (RMSprop, lr 3e-7, 32 samples per round), tuned on 7B+ models;
    small models want a larger ``lr`` (``--select update.lr=...`` picks it on held-out
    calibration). ``layer`` first reconstructs each layer: ``obs`` with SparseGPT's OBS update
    (options ``percdamp``, ``blocksize``; with ``--metric sparsegpt`` the mask and OBS update
    come from SparseGPT's sweep), ``admm-gradual`` with the ``admm`` solver's gradual mask and
    its defaults (the paper's seed ``|W| sqrt(diag G)``, so the metric's mask is not used).

        compresskit prune --metric wandapp --update ro -o update.rounds=5 -o update.last=prune
        compresskit prune --metric sparsegpt --pattern 2:4 --update ro
        compresskit prune --metric wanda --pattern 2:4 --update ro -o update.layer=admm-gradual -o update.lr=3e-5
    """

    name = "ro"
    summary = "regional optimisation (Wanda++): tune each block's kept weights to its dense outputs"

    @dataclasses.dataclass(frozen=True)
    class Options:
        steps: int = option(32, "optimiser steps per block, one calibration sample each (paper: 32 per round)")
        lr: float = option(3e-7, "learning rate (paper 3e-7, tuned on 7B+ models; small models may want more)")
        optimizer: Literal["rmsprop", "adam", "sgd"] = option("rmsprop", "optimiser (paper: RMSprop)")
        seed: int = option(0, "seed of the order in which calibration samples are visited")
        keep_best: bool = option(True, "undo RO on a block whose calibration output error it raised")
        layer: Literal["none", "obs", "admm-gradual"] = option(
            "none", "per-layer update before RO: none, SparseGPT's OBS, or the admm solver's gradual mask")
        rounds: int = option(1, "RO passes per block (paper 5); with more than 1 the block is pruned again "
                                "after each pass but the last, so the mask can change")
        last: Literal["ro", "prune"] = option("ro", "rounds > 1: the last pass keeps the mask (ro), or tunes whole "
                                                    "matrices and a last prune follows (prune: the paper's loop)")
        percdamp: float = option(0.01, "OBS dampening (layer=obs, or a sparsegpt metric)")
        blocksize: int = option(128, "OBS lazy-update block width (layer=obs, or a sparsegpt metric)")

        def __post_init__(self) -> None:
            if self.steps < 0 or not self.lr > 0 or not self.percdamp > 0 or self.blocksize < 1 or self.rounds < 1:
                raise OptionError(f"the ro solver needs steps >= 0, lr > 0, percdamp > 0, blocksize >= 1 and "
                                  f"rounds >= 1 (got {self.steps}, {self.lr}, {self.percdamp}, {self.blocksize}, "
                                  f"{self.rounds}); e.g. -o update.lr=3e-7 -o update.rounds=5")

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.history: list[dict] = []
        self._round = 0  # rounds of the current block done
        self._layer = None
        if self.options.layer == "admm-gradual":
            from compresskit_plugins.solvers.admm import ADMMSolver

            self._layer = ADMMSolver(ADMMSolver.Options(gradual=True, seed="reference"))

    def statistics(self):
        return ("gram",) if self.options.layer != "none" else ()

    def block_rounds(self) -> int:
        o = self.options
        return o.rounds + 1 if o.rounds > 1 and o.last == "prune" else o.rounds

    def solve(self, weight, mask, stats):
        if self.options.layer == "none":
            return weight.masked_fill(mask, 0.0)
        if self._layer is not None:
            return self._layer.solve(weight, mask, stats)
        from compresskit.obs import obs_update

        return obs_update(weight, mask, stats["gram"], self.options.blocksize, self.options.percdamp)

    def refine_and_solve(self, weight, mask, stats, pattern, sparsity):
        if self._layer is not None:
            return self._layer.refine_and_solve(weight, mask, stats, pattern, sparsity)
        return super().refine_and_solve(weight, mask, stats, pattern, sparsity)

    def select_and_solve(self, weight, stats, metric, pattern, sparsity):
        if metric.mask_solver != "obs":
            raise CompressKitError(f"solver 'ro' chooses masks only through the OBS sweep; metric {metric.name!r} asks "
                                   f"for {metric.mask_solver!r}: use --update {metric.mask_solver}")
        from compresskit.obs import sparsegpt_prune

        o, st = self.options, pattern.structure
        nm = (st.n, st.m) if st.group == "nm" else None
        new, mask = sparsegpt_prune(weight, stats["gram"], sparsity, nm, o.blocksize, o.percdamp,
                                    select=lambda sal, s: metric.select(sal, pattern, s))
        return mask, new

    def solve_block(self, block, layers, masks, inputs, dense_outputs, final=True):
        from compresskit_plugins.solvers.regional import tune_block

        o = self.options
        if final and o.rounds > 1 and o.last == "prune":  # the paper's last prune: no RO after it, its error kept
            from compresskit_plugins.solvers.regional import block_error

            err = block_error(block, inputs, dense_outputs)
            self.history.append({"error_before": err, "error_after": err, "steps": 0, "kept": True,
                                 "round": self._round + 1})
            self._round = 0
            return
        if not final:  # an intermediate round: every weight may move; the runner prunes again after it
            masks = {n: m.new_zeros(()).expand_as(m) for n, m in masks.items()}
        entry = tune_block(block, {n: layers[n] for n in masks}, masks, inputs, dense_outputs, o.steps, o.lr,
                           o.optimizer, o.seed + len(self.history), o.keep_best)
        self._round += 1
        self.history.append({**entry, "round": self._round} if o.rounds > 1 else entry)
        if final:
            self._round = 0


@hookimpl
def run_finished(run: Run) -> None:
    """Put RO's per-block output errors (before/after, relative) into the manifest."""
    if isinstance(run.solver, ROSolver):
        run.notes["ro"] = {"blocks": run.solver.history}
