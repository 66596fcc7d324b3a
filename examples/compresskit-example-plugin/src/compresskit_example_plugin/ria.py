"""RIA: Relative Importance and Activations (Zhang et al., ICLR 2024) as a compresskit plugin."""

from __future__ import annotations

# --8<-- [start:math]
import dataclasses
from typing import TYPE_CHECKING, Literal

from compresskit import ScoreMetric, hookimpl, option

if TYPE_CHECKING:  # torch is only needed when a run starts: `compresskit list` stays fast
    import torch


def relative_importance(weight: torch.Tensor) -> torch.Tensor:
    """``|W| / column sums + |W| / row sums`` of ``|W|`` (``[out, in]``); empty sums count as 1."""
    a = weight.abs()
    col = a.sum(dim=0, keepdim=True)  # [1, in]: total of input channel j over all outputs
    row = a.sum(dim=1, keepdim=True)  # [out, 1]: total of output row i over all inputs
    return a / col.where(col > 0, 1.0) + a / row.where(row > 0, 1.0)


def ria_score(weight: torch.Tensor, act_sq: torch.Tensor, power: float) -> torch.Tensor:
    """``RI[i,j] * ||X_j||_2 ** power`` where ``act_sq[j] = sum_t X[t,j]^2``.

    The reference divides ``act_sq`` by the number of calibration sequences first; that factor
    is the same for every weight of the layer, so the ranking is unchanged.
    """
    return relative_importance(weight) * act_sq.sqrt().pow(power).unsqueeze(0)
# --8<-- [end:math]


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
    ``--per_outneuron`` flag switches to Wanda's per-row groups), so ``scope=layer`` asks for
    the unstructured pattern's ``layer`` group (unless you set ``-o pattern.scope``); N:M
    patterns keep their own groups.

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
    def statistics(self):
        return ("act_sq",)  # per input column: sum of squared inputs over every calibration token

    def score(self, weight: torch.Tensor, stats) -> torch.Tensor:
        return ria_score(weight, stats["act_sq"], self.options.power)
    # --8<-- [end:lifecycle]

    # --8<-- [start:prune]
    def comparison_group(self) -> str | None:
        return None if self.options.scope == "pattern" else self.options.scope
    # --8<-- [end:prune]
