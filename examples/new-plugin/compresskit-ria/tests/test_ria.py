"""Tests of compresskit-ria: compresskit's conformance check for metrics, and the score worked out by hand."""

from __future__ import annotations

import torch

from compresskit.testing import check_metric, fresh_registry
from compresskit_ria import plugin


def test_conforms():
    # class attributes, typed options, additive statistics, score rules, and a real prune of random:tiny
    check_metric(plugin.RiaMetric, registry=fresh_registry(plugin))


def test_conforms_with_options():
    check_metric(plugin.RiaMetric, registry=fresh_registry(plugin), options={"power": 0.5}, end_to_end=False)


def test_score_by_hand():
    w = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    act_sq = torch.tensor([4.0, 9.0])  # column norms 2 and 3
    assert torch.equal(plugin.ria_score(w, act_sq, 1.0), torch.tensor([[2.0, 6.0], [0.0, 9.0]]))
    assert torch.equal(plugin.ria_score(w, act_sq, 0.0), w.abs())
