"""The smallest working compresskit metric plugin: Relative Importance (RI), data-free."""

# --8<-- [start:minimal]
from __future__ import annotations

from compresskit import ScoreMetric, hookimpl


@hookimpl
def register_metrics(register):
    register(RelativeImportanceMetric)


class RelativeImportanceMetric(ScoreMetric):
    """Relative Importance (RI) of Zhang et al., ICLR 2024 (https://iclr.cc/virtual/2024/poster/18549).

    ``RI[i,j] = |W[i,j]| / sum_k |W[k,j]| + |W[i,j]| / sum_k |W[i,k]|``: a weight's share of
    its input channel plus its share of its output row. Needs no calibration data.

        compresskit prune --metric ri --sparsity 0.5
    """

    name = "ri"
    summary = "relative importance |W|/colsum + |W|/rowsum (data-free; example plugin)"

    def score(self, weight, stats):
        a = weight.abs()
        return a / a.sum(dim=0, keepdim=True) + a / a.sum(dim=1, keepdim=True)
# --8<-- [end:minimal]
