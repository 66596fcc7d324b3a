"""Tests of the example plugin, using compresskit's public testing helpers."""

# --8<-- [start:conformance]
from __future__ import annotations

import torch

from compresskit.testing import check_metric, fresh_registry
from compresskit_example_plugin import minimal, ria


def test_ria_conforms():
    # Class attributes, typed options, score/update rules, and a real prune on random:tiny.
    check_metric(ria.RIAMetric, registry=fresh_registry(ria))


def test_ri_conforms():
    check_metric(minimal.RelativeImportanceMetric, registry=fresh_registry(minimal))
# --8<-- [end:conformance]


# --8<-- [start:math]
def test_ria_score_by_hand():
    w = torch.tensor([[1.0, -2.0, 0.0, 4.0], [3.0, 0.0, -1.0, 1.0]])
    sq = torch.tensor([4.0, 1.0, 9.0, 16.0])  # column norms 2, 1, 3, 4
    # |W| column sums: 4, 2, 1, 5; row sums: 7, 5.
    expected_ri = torch.tensor([[1 / 4 + 1 / 7, 2 / 2 + 2 / 7, 0.0, 4 / 5 + 4 / 7],
                                [3 / 4 + 3 / 5, 0.0, 1 / 1 + 1 / 5, 1 / 5 + 1 / 5]])
    assert torch.allclose(ria.relative_importance(w), expected_ri)
    assert torch.allclose(ria.ria_score(w, sq, 1.0), expected_ri * torch.tensor([2.0, 1.0, 3.0, 4.0]))
    assert torch.allclose(ria.ria_score(w, sq, 0.5), expected_ri * torch.tensor([2.0, 1.0, 3.0, 4.0]).sqrt())
    assert torch.equal(ria.ria_score(w, sq, 0.0), ria.relative_importance(w))


def test_dead_column_gives_zero_not_nan():
    w = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    assert torch.isfinite(ria.relative_importance(w)).all()
# --8<-- [end:math]


def test_layer_scope_is_the_default_and_row_scope_is_available():
    from compresskit.api import prune

    reg = fresh_registry(ria)
    common = dict(adapter="llama", model="random:tiny", metric="ria", sparsity=0.5, nsamples=2, seqlen=16,
                  device="cpu", progress=False, registry=reg)
    layer = prune(**common)
    rows = prune(metric_options={"scope": "row"}, **common)
    per_row = [(m.weight == 0).sum(dim=1) for m in rows.model.model.layers[0].mlp.modules() if isinstance(m, torch.nn.Linear)]
    assert all((r == r[0]).all() for r in per_row)  # row scope: identical count per row
    assert abs(layer.report.overall_sparsity - 0.5) < 1e-3
    assert layer.manifest["resolved"]["metric_options"] == {"power": 0.5, "scope": "layer"}
