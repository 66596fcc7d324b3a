"""The ``owl`` allocation: outlier-weighed layerwise sparsity (Yin et al. 2023, arXiv 2310.05175)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal, Sequence

from compresskit import hookimpl
from compresskit.errors import CompressKitError, OptionError
from compresskit.interfaces import Allocation
from compresskit.options import option

if TYPE_CHECKING:
    import torch

    from compresskit.run import Run


@hookimpl
def register_allocations(register):
    register(OWLAllocation)


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Share of the pooled ``scores`` strictly above ``m`` times their mean (OWL's "LOD").

    All tensors count as one population: every element weighs the same, so large matrices
    dominate the mean, as in the reference's concatenation of a block's score matrices.
    """
    numel = sum(s.numel() for s in scores)
    total = None
    for s in scores:  # in order, in float64, on the scores' device: two host reads, not two per tensor
        part = s.double().sum()
        total = part if total is None else total + part
    mean = float(total) / numel
    count = None
    for s in scores:
        part = (s.double() > m * mean).sum()
        count = part if count is None else count + part
    return int(count) / numel


def owl_targets(ratios: Sequence[float], sizes: Sequence[int], sparsity: float, lmbda: float,
                weighting: str = "size") -> list[float]:
    """Per-block sparsities: ``s_l = S - (r_l - mean(r))`` with ``r = 2*lmbda*(D - min D)/(max D - min D)``.

    More outliers (larger ``D_l``) means a lower sparsity. ``mean(r)`` is weighted by block size
    (``weighting="size"``: the overall sparsity stays ``S``) or unweighted (``"block"``: the
    reference's arithmetic, identical when every block has the same size). The targets span
    ``2*lmbda``: ``[S - (2*lmbda - mean r), S + mean r]``. Equal ratios give ``S`` everywhere.
    """
    import torch

    d = torch.tensor(ratios, dtype=torch.float64)
    span = float(d.max() - d.min()) if len(d) else 0.0
    if span <= 0.0 or lmbda == 0.0:
        return [float(sparsity)] * len(d)
    r = (d - d.min()) / span * (2.0 * lmbda)
    w = torch.tensor(sizes, dtype=torch.float64) if weighting == "size" else torch.ones_like(r)
    mean = float((w * r).sum() / w.sum())
    return [float(sparsity - (x - mean)) for x in r]


def block_outlier_ratios(run: Run, m: float) -> tuple[list[float], list[int]]:
    """Dense pre-pass over the blocks on the run's calibration batches: each block's outlier
    ratio of Wanda's score ``|W| * ||X_j||_2`` pooled over its prunable layers, and its size."""
    import torch
    from tqdm.auto import tqdm

    from compresskit.distributed import combine
    from compresskit.ops import wanda_score
    from compresskit.stats import ActSq
    from compresskit.blocks import walk_blocks

    if not run.batches:
        raise CompressKitError("the owl allocation measures outliers on calibration data, but the run has no "
                               "calibration batches; give --nsamples >= 1 (compresskit.prune samples them)")
    act, ratios, sizes = ActSq(), [], []
    place = run.placement  # the blocks visit the compute device one at a time, as in the runner
    nblocks = len(run.adapter.blocks(run.model))
    with run.adapter.run_context(run.model):
        steps = walk_blocks(run.adapter, run.model, run.batches, place.compute, place.at_rest, propagate="dense")
        for step in tqdm(steps, total=nblocks, desc="owl outliers", unit="block", leave=False,
                         disable=not run.settings.progress):
            parts = {n: act.init(layer) for n, layer in step.layers.items()}
            step.forward({n: (lambda x, samples, p=parts[n]: act.update(p, x)) for n in parts})
            combine(parts)  # under torchrun: every rank's samples, so every rank sets the same targets
            scores = [wanda_score(layer.weight.detach().float(), act.finish(parts[n])) for n, layer in step.layers.items()]
            ratios.append(outlier_ratio(scores, m))
            sizes.append(sum(s.numel() for s in scores))
    return ratios, sizes


class OWLAllocation(Allocation):
    """OWL (Outlier Weighed Layerwise sparsity), https://arxiv.org/abs/2310.05175.

    A dense pre-pass over the calibration data measures, per block, the share ``D_l`` of
    Wanda scores ``|W_ij| * ||X_j||_2`` (pooled over the block's prunable layers) above ``m``
    times their mean. Blocks with more outliers are pruned less: ``r_l = 2*lmbda*(D_l - min
    D)/(max D - min D)`` and every layer of block ``l`` gets ``s_l = S - (r_l - mean r)``, so
    the size-weighted mean of the targets is the run's ``--sparsity`` S. The ratios and
    targets are recorded in the manifest (``notes.owl``) with the achieved overall sparsity.
    Works with every metric and update; N:M patterns fix every layer's sparsity, so they
    refuse it.

        compresskit prune --metric wanda --sparsity 0.7 --allocation owl -o allocation.m=5 -o allocation.lmbda=0.08
    """

    name = "owl"
    summary = "OWL: per-block targets inversely to the share of outlier Wanda scores (dense pre-pass)"

    @dataclasses.dataclass(frozen=True)
    class Options:
        m: float = option(5.0, "outlier threshold: scores above m x the block's mean score are outliers (paper 5)")
        lmbda: float = option(0.08, "half-width of the target range: targets span 2*lmbda around S (paper 0.08)")
        weighting: Literal["size", "block"] = option(
            "size", "mean kept at S: size-weighted (overall sparsity = S) or per block (the reference's)")

        def __post_init__(self) -> None:
            if not self.m > 0 or not 0 <= self.lmbda < 0.5:
                raise OptionError(f"owl needs m > 0 and 0 <= lmbda < 0.5 (got m={self.m}, lmbda={self.lmbda}); "
                                  "e.g. -o allocation.m=5 -o allocation.lmbda=0.08")

    def prepare(self, run: Run) -> None:
        o, s = self.options, run.settings.sparsity
        ratios, sizes = block_outlier_ratios(run, o.m)
        targets = owl_targets(ratios, sizes, s, o.lmbda, o.weighting)
        bad = next(((i, t) for i, t in enumerate(targets) if not 0.0 <= t < 1.0), None)
        if bad is not None:
            i, t = bad
            raise OptionError(f"owl gives block {i} the target {t:.4f}, outside [0, 1), at --sparsity {s:g} with "
                              f"lmbda={o.lmbda:g}; use a smaller -o allocation.lmbda (at most {min(s, 1 - s) / 2:.4g} "
                              "always fits)")
        run.notes["owl"] = {"m": o.m, "lmbda": o.lmbda, "weighting": o.weighting, "sparsity": s,
                            "outlier_ratios": ratios, "block_sizes": sizes, "targets": targets,
                            "target_mean": sum(t * n for t, n in zip(targets, sizes)) / sum(sizes)}

    def sparsity(self, run: Run, block_index: int, layer_name: str) -> float | None:
        notes = run.notes.get("owl")
        if notes is None:
            raise CompressKitError("the owl allocation was asked for a target before prepare(run) ran")
        return notes["targets"][block_index]


@hookimpl
def run_finished(run: Run) -> None:
    """Record the achieved sparsity, overall and per block, next to OWL's targets."""
    if not isinstance(run.allocation, OWLAllocation) or "owl" not in run.notes:
        return
    per_block: dict[int, list[float]] = {}
    for r in run.report.layers:
        n = r.shape[0] * r.shape[1]
        acc = per_block.setdefault(r.block, [0.0, 0.0])
        acc[0], acc[1] = acc[0] + r.sparsity * n, acc[1] + n
    run.notes["owl"]["achieved_block_sparsity"] = [per_block[b][0] / per_block[b][1] for b in sorted(per_block)]
    run.notes["owl"]["achieved_sparsity"] = run.report.overall_sparsity
