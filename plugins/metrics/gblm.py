"""GBLM-Pruner: score = |W| * ||X_j||_2 + alpha * |W| * ||G||_p (Das et al. 2023, arXiv 2311.04902)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from compresskit import hookimpl
from compresskit.errors import OptionError
from compresskit.interfaces import ScoreMetric
from compresskit.ops import wanda_score
from compresskit.options import option
from compresskit.stats import REFERENCE_SCALE, GradNorm

PAPER_ALPHA = 100.0


@hookimpl
def register_metrics(register):
    register(GBLMMetric)


def gblm_score_paper(weight, act_sq, grad, alpha: float):
    """``|W|*||X_j||_2 + alpha*|W|*G``: true column norm over all tokens, un-scaled gradient norm.

    With ``alpha == 0`` the result is exactly Wanda's score.
    """
    score = wanda_score(weight, act_sq)
    if alpha != 0:
        score = score + alpha * (weight.abs() * grad)
    return score


def gblm_score_reference(weight, act_sq, samples: int, grad_file):
    """The reference code's ``S = |W|*sqrt(A) + (|W|*G_file)``.

    ``A = act_sq / samples`` (mean over sequences of per-sequence squared column norms), so the
    activation term is ``||X_j||_2 / sqrt(N)``; ``grad_file`` already contains scale 100; the
    gradient product is computed in float16 and cast to float32, as in the reference.
    """
    act = wanda_score(weight, act_sq / max(samples, 1))
    return act + (weight.abs().half() * grad_file.half()).float()


class GBLMMetric(ScoreMetric):
    """GBLM-Pruner (Gradient-Based Language Model Pruner), https://arxiv.org/abs/2311.04902.

    Score ``S[i,j] = |W[i,j]| * ||X_j||_2 + alpha * |W[i,j]| * ||G[:,i,j]||_p``, compared per
    output row (or in N:M groups): Wanda's weight-times-activation term plus a first-order term
    from per-sample gradients of the dense model's loss, aggregated over the calibration samples
    with the l1 or l2 norm (``grad_norm``; the paper's best is l1). Statistics: ``act_sq`` and
    ``grad_l1``/``grad_l2`` (computed once on the dense model, cached; ``--gradients FILE``
    imports the reference repo's file).

    Two ``semantics``:

    * ``paper`` (default): ``||X_j||_2`` is the true column norm over all N*L calibration tokens
      and ``G`` the un-scaled aggregate (``sum_n |g_n|`` or ``sqrt(sum_n g_n^2)``), so ``alpha``
      (default 100, the paper's best) means what the paper's formula says.
    * ``reference``: reproduces VILA-Lab/GBLM-Pruner's ranking: ``G`` has scale 100 baked into
      every per-sample gradient, the activation term is ``sqrt(A)`` with ``A`` the mean over
      sequences of per-sequence squared column norms (effective alpha = 100*sqrt(N)), and
      ``|W|*G`` is computed in float16 then cast to float32. ``alpha`` must stay at its default
      there (an error otherwise). Gradients are accumulated in float32 unless the gradient option
      ``precision=reference`` asks for the reference's float16 l1 running sum.

    ``variant=true`` applies Wanda's adaptive per-row threshold to S (unstructured only).
    With ``alpha=0`` (paper semantics) the mask equals Wanda's exactly.

        compresskit prune --adapter llama --metric gblm --sparsity 0.5 -o metric.grad_norm=l1
        compresskit prune --adapter llama --metric gblm -o metric.semantics=reference \\
            --gradients gradients_aggregrate_norm_l1_model_llama-2-7b.pth
    """

    name = "gblm"
    summary = "GBLM-Pruner: |W|*||X_j||_2 + alpha*|W|*||G||_p (gradients + activations), per output row"

    @dataclasses.dataclass(frozen=True)
    class Options:
        grad_norm: Literal["l1", "l2"] = option("l1", "aggregate of per-sample gradients: l1 (paper's best) or l2")
        alpha: float = option(
            PAPER_ALPHA,
            "weight of the gradient term (paper semantics: true activation norm, un-scaled gradient norm); "
            "must stay 100 with semantics=reference",
        )
        semantics: Literal["paper", "reference"] = option(
            "paper",
            "paper: the formula with true norms; reference: the reference code's ranking "
            "(scale 100 in G, activation norm / sqrt(N), fp16 gradient product)",
        )
        variant: bool = option(False, "Wanda's adaptive per-row threshold on the GBLM score (unstructured only)")

        def __post_init__(self) -> None:
            if self.alpha != self.alpha or self.alpha in (float("inf"), float("-inf")):
                raise OptionError(f"metric.alpha must be a finite number, got {self.alpha}")
            if self.semantics == "reference" and self.alpha != PAPER_ALPHA:
                raise OptionError(
                    f"metric.alpha={self.alpha:g} has no effect with metric.semantics=reference (the reference "
                    f"bakes scale {REFERENCE_SCALE:g} into G); drop metric.alpha or use metric.semantics=paper"
                )

    def statistics(self):
        scale = REFERENCE_SCALE if self.options.semantics == "reference" else 1.0
        return ("act_sq", GradNorm(self.options.grad_norm, scale))

    def comparison_group(self) -> str | None:
        return "adaptive" if self.options.variant else None

    def score(self, weight, stats):
        grad = stats[f"grad_{self.options.grad_norm}"]
        if self.options.semantics == "reference":
            return gblm_score_reference(weight, stats["act_sq"], stats.samples, grad)
        return gblm_score_paper(weight, stats["act_sq"], grad, self.options.alpha)
