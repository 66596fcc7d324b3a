"""RIA: Relative Importance and Activations (Zhang et al., ICLR 2024) as a compresskit plugin."""

from __future__ import annotations

# --8<-- [start:math]
import dataclasses
from typing import Literal

import torch

from compresskit import LayerContext, MaskPattern, PruneDecision, ScoreMetric, hookimpl, option


def relative_importance(weight: torch.Tensor) -> torch.Tensor:
    """``|W| / column sums + |W| / row sums`` of ``|W|`` (``[out, in]``); empty sums count as 1."""
    a = weight.abs()
    col = a.sum(dim=0, keepdim=True)  # [1, in]: total of input channel j over all outputs
    row = a.sum(dim=1, keepdim=True)  # [out, 1]: total of output row i over all inputs
    return a / torch.where(col > 0, col, 1.0) + a / torch.where(row > 0, row, 1.0)


def ria_score(weight: torch.Tensor, col_sq_norm: torch.Tensor, power: float) -> torch.Tensor:
    """``RI[i,j] * ||X_j||_2 ** power`` where ``col_sq_norm[j] = sum_t X[t,j]^2``.

    The reference divides ``col_sq_norm`` by the number of calibration sequences first; that
    factor is the same for every weight of the layer, so the ranking is unchanged.
    """
    return relative_importance(weight) * col_sq_norm.sqrt().pow(power).unsqueeze(0)
# --8<-- [end:math]


# --8<-- [start:state]
@dataclasses.dataclass
class SquaredNorms:
    """Per-input-column sum of squared activations over every calibration token."""

    sq: torch.Tensor
    tokens: int = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold a ``[tokens, in_features]`` float32 batch in (sums, so batch-size independent)."""
        self.sq += x.pow(2).sum(dim=0)
        self.tokens += x.shape[0]
# --8<-- [end:state]


# --8<-- [start:register]
@hookimpl
def register_metrics(register):
    register(RIAMetric)
# --8<-- [end:register]


# --8<-- [start:metric]
class RIAMetric(ScoreMetric):
    """RIA, Relative Importance and Activations (Zhang et al., "Plug-and-Play: An Efficient
    Post-training Pruning Method for Large Language Models", ICLR 2024,
    https://iclr.cc/virtual/2024/poster/18549; code: biomedical-cybernetics/
    Relative-importance-and-activation-pruning).

    ``S[i,j] = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * ||X_j||_2 ** a`` with
    ``a = 0.5``. The reference compares weights across the whole layer by default (its
    ``--per_outneuron`` flag switches to Wanda's per-row groups), so ``scope=layer`` overrides
    an unstructured pattern's scope; N:M patterns keep their own groups.

        compresskit prune --metric ria --sparsity 0.5 [-o metric.power=0.5 -o metric.scope=row]

    Options:
        power: exponent ``a`` of the activation norm.
        scope: comparison group for unstructured masks (``layer``, ``row`` or ``pattern``).
    """

    name = "ria"
    summary = "relative importance x ||X_j||^a (Zhang et al. ICLR 2024; example plugin)"

    @dataclasses.dataclass(frozen=True)
    class Options:
        power: float = option(0.5, "exponent a of the activation norm ||X_j||_2 (reference --a)")
        scope: Literal["layer", "row", "pattern"] = option(
            "layer", "comparison group for unstructured masks: layer (reference), row, or the pattern's own"
        )
# --8<-- [end:metric]

    # --8<-- [start:lifecycle]
    def init_state(self, layer: torch.nn.Linear) -> SquaredNorms:
        return SquaredNorms(torch.zeros(layer.in_features, dtype=torch.float32, device=layer.weight.device))

    def update(self, state: SquaredNorms, inputs: torch.Tensor) -> None:
        state.add(inputs)

    def score(self, weight: torch.Tensor, state: SquaredNorms, grad) -> torch.Tensor:
        return ria_score(weight, state.sq, self.options.power)
    # --8<-- [end:lifecycle]

    # --8<-- [start:prune]
    def prune(self, weight, state, ctx: LayerContext, pattern: MaskPattern, sparsity: float) -> PruneDecision:
        scope = self.options.scope
        if pattern.nm is None and scope != "pattern" and getattr(pattern.options, "scope", scope) != scope:
            pattern = type(pattern)(dataclasses.replace(pattern.options, scope=scope))
        return PruneDecision(mask=pattern.mask(self.score(weight, state, None), sparsity))
    # --8<-- [end:prune]
