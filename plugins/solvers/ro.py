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
    """Regional optimisation (RO) from Wanda++, https://arxiv.org/abs/2503.04992, mask fixed.

    After every layer of a block is pruned, the block's kept weights (its prunable linear
    weights; norms and biases stay) are tuned for ``steps`` optimiser steps to bring the
    block's output back to the dense block's: each step takes one calibration sample (a seeded
    shuffle of the block's calibration inputs, the outputs of the already pruned blocks above)
    and minimises ``||f_dense(X) - f_pruned(X)||^2`` (sum of squares). Gradients of pruned
    weights are zeroed and the mask is re-applied after every step, so the mask never changes.
    Memory is one block. Weights of a block in float16/bfloat16 are tuned in float32 and cast
    back. ``keep_best`` restores the block's weights when tuning raised its output error on the
    calibration inputs (RO then does nothing for that block); per-block errors before and after
    are recorded in the manifest (``notes.ro``).

    Defaults are the paper's (RMSprop, lr 3e-7, 32 samples per round). The paper alternates
    pruning and RO over 5 rounds, so the mask can change between rounds; this solver runs one
    mask-fixed RO after any metric's mask (``--metric wandapp --update ro`` is the nearest
    recipe). ``layer=obs`` first reconstructs each layer with SparseGPT's OBS update (options
    ``percdamp``, ``blocksize``); with ``--metric sparsegpt`` the mask and OBS update come from
    SparseGPT's sweep and RO runs after it.

        compresskit prune --metric gblm --update ro -o update.steps=32 -o update.lr=3e-7
        compresskit prune --metric sparsegpt --pattern 2:4 --update ro
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
        layer: Literal["none", "obs"] = option("none", "per-layer update before RO: none, or SparseGPT's OBS")
        percdamp: float = option(0.01, "OBS dampening (layer=obs, or a sparsegpt metric)")
        blocksize: int = option(128, "OBS lazy-update block width (layer=obs, or a sparsegpt metric)")

        def __post_init__(self) -> None:
            if self.steps < 0 or not self.lr > 0 or not self.percdamp > 0 or self.blocksize < 1:
                raise OptionError(f"the ro solver needs steps >= 0, lr > 0, percdamp > 0 and blocksize >= 1 (got "
                                  f"{self.steps}, {self.lr}, {self.percdamp}, {self.blocksize}); e.g. -o update.lr=3e-7")

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.history: list[dict] = []

    def statistics(self):
        return ("gram",) if self.options.layer == "obs" else ()

    def solve(self, weight, mask, stats):
        if self.options.layer != "obs":
            return weight.masked_fill(mask, 0.0)
        from compresskit.obs import obs_update

        return obs_update(weight, mask, stats["gram"], self.options.blocksize, self.options.percdamp)

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

    def solve_block(self, block, layers, masks, inputs, dense_outputs):
        from compresskit_plugins.solvers.regional import tune_block

        o = self.options
        self.history.append(tune_block(block, {n: layers[n] for n in masks}, masks, inputs, dense_outputs, o.steps,
                                       o.lr, o.optimizer, o.seed + len(self.history), o.keep_best))


@hookimpl
def run_finished(run: Run) -> None:
    """Put RO's per-block output errors (before/after, relative) into the manifest."""
    if isinstance(run.solver, ROSolver):
        run.notes["ro"] = {"blocks": run.solver.history}
