"""Wanda: score = |W| * ||X_j||_2 (Sun et al. 2023, arXiv 2306.11695)."""

from __future__ import annotations

import dataclasses

import torch

from compresskit import hookimpl
from compresskit.errors import IncompatiblePatternError
from compresskit.interfaces import LayerContext, MaskPattern, PruneDecision, ScoreMetric
from compresskit.ops import adaptive_row_mask
from compresskit.options import option


@hookimpl
def register_metrics(register):
    register(WandaMetric)


@dataclasses.dataclass
class ActNorm:
    """Running sum of squared inputs per input column and the number of tokens seen."""

    sq: torch.Tensor
    tokens: int = 0


def act_norm_state(in_features: int, device: torch.device) -> ActNorm:
    """Fresh accumulator for :func:`act_norm_update`."""
    return ActNorm(torch.zeros(in_features, dtype=torch.float32, device=device))


def act_norm_update(state: ActNorm, x: torch.Tensor) -> None:
    """Add the squared column norms of ``x`` (``[tokens, in]``) to the accumulator."""
    state.sq += x.pow(2).sum(dim=0)
    state.tokens += x.shape[0]


def wanda_score(weight: torch.Tensor, col_sq_norm: torch.Tensor) -> torch.Tensor:
    """``|W[i,j]| * sqrt(sum_t X[t,j]^2)``: the true column norm over all calibration tokens.

    The reference divides the sum by the number of sequences first; that factor is uniform in
    a layer, so the ranking (and the mask) is the same.
    """
    return weight.abs() * col_sq_norm.sqrt().unsqueeze(0)


def select(scores: torch.Tensor, pattern: MaskPattern, sparsity: float, variant: bool) -> torch.Tensor:
    """Pattern mask, or Wanda's adaptive per-row variant (unstructured only)."""
    if not variant:
        return pattern.mask(scores, sparsity)
    if pattern.nm is not None:
        raise IncompatiblePatternError("the adaptive variant applies to unstructured sparsity only; drop -o metric.variant")
    return adaptive_row_mask(scores, sparsity)


class WandaMetric(ScoreMetric):
    """Wanda (Pruning by Weights and activations), https://arxiv.org/abs/2306.11695.

    Score ``S[i,j] = |W[i,j]| * ||X_j||_2`` where ``X_j`` is input column j over every
    calibration token, compared per output row. ``variant=true`` uses the paper's adaptive
    per-row threshold (appendix; ``--use_variant`` in the reference) instead of a fixed count.

        compresskit prune --metric wanda --sparsity 0.5 [-o metric.variant=true]
    """

    name = "wanda"
    summary = "|W| * ||X_j||_2 (weights and activations), per output row"

    @dataclasses.dataclass(frozen=True)
    class Options:
        variant: bool = option(False, "adaptive per-row threshold (Wanda appendix, unstructured only)")

    def init_state(self, layer) -> ActNorm:
        return act_norm_state(layer.in_features, layer.weight.device)

    def update(self, state: ActNorm, inputs: torch.Tensor) -> None:
        act_norm_update(state, inputs)

    def score(self, weight, state: ActNorm, grad) -> torch.Tensor:
        return wanda_score(weight, state.sq)

    def prune(self, weight, state, ctx: LayerContext, pattern: MaskPattern, sparsity: float) -> PruneDecision:
        return PruneDecision(mask=select(self.score(weight, state, None), pattern, sparsity, self.options.variant))
