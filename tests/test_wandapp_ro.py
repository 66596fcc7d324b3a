"""Wanda++: the regional gradient statistic and metric, and the mask-fixed regional optimisation solver."""

from __future__ import annotations

import copy

import pytest
import torch

from compresskit.engine import blockgrad
from compresskit.api import prune
from compresskit.ops import lowest_mask, wanda_score
from compresskit.stats import BlockGradNorm
from compresskit.testing import check_metric, check_solver
from compresskit.engine.walk import block_output, capture_block_inputs
from compresskit_plugins.metrics.wandapp import WandaPPMetric, rgs_score
from compresskit_plugins.solvers.regional import output_error, tune_block
from compresskit_plugins.solvers.ro import ROSolver

BASE = dict(model="random:tiny", nsamples=4, seqlen=32, device="cpu", progress=False, report_error=False)


def _block0(tiny_llama, n=4, seqlen=32):
    from compresskit_plugins.adapters.llama import LlamaAdapter

    model, _ = tiny_llama
    adapter = LlamaAdapter()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 256, (1, seqlen), generator=g)} for _ in range(n)]
    with adapter.run_context(model):
        inputs = capture_block_inputs(adapter, model, batches, torch.device("cpu"))
    block = adapter.blocks(model)[0]
    return block, adapter.prunable(block), inputs


@pytest.mark.parametrize("aggregate", ["rms", "mean_abs"])
def test_block_gradient_statistic_equals_per_sample_autograd(tiny_llama, aggregate):
    block, layers, inputs = _block0(tiny_llama)
    stat = BlockGradNorm(aggregate)
    parts = blockgrad.collect(block, layers, inputs, [stat])
    before = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    for name, layer in layers.items():
        per_sample = []
        for args, kwargs in inputs:
            w = layer.weight
            block.zero_grad(set_to_none=True)
            block_output(block, args, kwargs).norm().backward()  # ||f(X_n)||_2, not squared
            per_sample.append(w.grad.detach().clone())
        g = torch.stack(per_sample)
        want = g.pow(2).mean(0).sqrt() if aggregate == "rms" else g.abs().mean(0)
        torch.testing.assert_close(stat.finish(parts[name][stat.key()]), want, rtol=1e-4, atol=1e-7)
        assert torch.equal(layer.weight.detach(), before[name])
    block.zero_grad(set_to_none=True)


def test_wandapp_score_formula_and_alpha0_is_wanda():
    w, act, grad = torch.randn(4, 6), torch.rand(6), torch.rand(4, 6)
    torch.testing.assert_close(rgs_score(w, act, grad, 100.0), (100.0 * grad + act.sqrt()) * w.abs())
    assert torch.equal(rgs_score(w, act, grad, 0.0), wanda_score(w, act))
    a = prune(metric="wandapp", metric_options={"alpha": 0}, sparsity=0.5, **BASE)
    b = prune(metric="wanda", sparsity=0.5, **BASE)
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)


def test_wandapp_gradient_term_changes_the_mask():
    a = prune(metric="wandapp", metric_options={"alpha": 1e4}, sparsity=0.5, **BASE)
    b = prune(metric="wanda", sparsity=0.5, **BASE)
    wa, wb = a.model.model.layers[0].mlp.down_proj.weight, b.model.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(wa == 0, wb == 0)


@pytest.mark.parametrize("pattern,options", [("unstructured", None), ("2:4", {"alpha": 10.0, "grad": "mean_abs"})])
def test_wandapp_conformance(pattern, options):
    check_metric(WandaPPMetric, pattern=pattern, options=options)


def _float64(obj):
    """``obj`` with every floating tensor (in tuples, lists, dicts) cast to float64."""
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_float64(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _float64(v) for k, v in obj.items()}
    return obj


def _float64_error(dense_block, pruned_block, inputs) -> float:
    """``sum ||f_pruned(X) - f_dense(X)||^2 / sum ||f_dense(X)||^2``: both blocks run afresh in float64."""
    dense64, pruned64 = copy.deepcopy(dense_block).double(), copy.deepcopy(pruned_block).double()
    num = den = 0.0
    with torch.no_grad():
        for args, kwargs in inputs:
            args, kwargs = _float64(args), _float64(kwargs)
            y, z = dense64(*args, **kwargs), pruned64(*args, **kwargs)
            y, z = (y[0], z[0]) if isinstance(y, (tuple, list)) else (y, z)
            num += float((z - y).pow(2).sum())
            den += float(y.pow(2).sum())
    return num / den


def test_ro_lowers_the_block_error_and_keeps_the_mask(tiny_llama):
    block, layers, inputs = _block0(tiny_llama)
    dense_block = copy.deepcopy(block)
    with torch.no_grad():
        dense = [block_output(block, a, k) for a, k in inputs]
        masks = {}
        for n, layer in layers.items():
            masks[n] = lowest_mask(layer.weight.abs(), layer.in_features // 2)
            layer.weight.masked_fill_(masks[n], 0.0)
    pruned = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    before = output_error(block, inputs, dense)
    # an independent reference: the dense and the pruned block run again in float64 (not through the
    # solver's own error function); float32 outputs agree with it to ~1e-6 relative
    assert before == pytest.approx(_float64_error(dense_block, block, inputs), rel=1e-4)
    info = tune_block(block, layers, masks, inputs, dense, steps=16, lr=1e-3, keep_best=False)
    assert info["error_before"] == pytest.approx(before) and info["error_after"] < 0.8 * before and info["kept"]
    assert output_error(block, inputs, dense) == pytest.approx(info["error_after"])
    assert info["error_after"] == pytest.approx(_float64_error(dense_block, block, inputs), rel=1e-4)
    for n, layer in layers.items():
        w = layer.weight.detach()
        assert torch.equal(w == 0, masks[n] | (pruned[n] == 0)), n  # pruned stay zero, kept are not zeroed
        assert not torch.equal(w, pruned[n]), n  # the kept weights moved


def test_ro_end_to_end_lowers_every_block_error():
    result = prune(metric="wanda", update="ro", update_options={"lr": 1e-3, "keep_best": False}, sparsity=0.5, **BASE)
    blocks = result.manifest["notes"]["ro"]["blocks"]
    assert len(blocks) == 2
    assert all(b["error_after"] < b["error_before"] for b in blocks)
    assert all(r.sparsity == pytest.approx(0.5) for r in result.report.layers)  # masks held (the runner checks too)


def test_ro_keep_best_undoes_a_harmful_step():
    result = prune(metric="wanda", update="ro", update_options={"lr": 10.0, "optimizer": "sgd", "steps": 2},
                   sparsity=0.5, **BASE)
    plain = prune(metric="wanda", sparsity=0.5, **BASE)
    blocks = result.manifest["notes"]["ro"]["blocks"]
    assert all(not b["kept"] for b in blocks)
    for x, y in zip(result.model.state_dict().values(), plain.model.state_dict().values()):
        assert torch.equal(x, y)


def test_ro_after_sparsegpt_keeps_sparsegpt_mask():
    a = prune(metric="sparsegpt", update="ro", pattern="2:4", update_options={"lr": 1e-4}, **BASE)
    b = prune(metric="sparsegpt", pattern="2:4", **BASE)
    assert a.manifest["resolved"]["solver"] == "ro"
    for name in ("self_attn.q_proj", "mlp.down_proj"):  # block 0 sees the same inputs in both runs
        wa = a.model.model.layers[0].get_submodule(name).weight
        wb = b.model.model.layers[0].get_submodule(name).weight
        assert torch.equal(wa == 0, wb == 0) and not torch.equal(wa, wb)


def test_ro_tunes_a_bfloat16_block_in_float32():
    result = prune(metric="wanda", update="ro", update_options={"lr": 1e-3}, adapter_options={"dtype": "bfloat16"},
                   sparsity=0.5, **BASE)
    assert result.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert all(b["error_after"] <= b["error_before"] for b in result.manifest["notes"]["ro"]["blocks"])


def _masks(result):
    return {n: p == 0 for n, p in result.model.state_dict().items() if n.endswith("proj.weight")}


def test_ro_rounds_without_steps_reprune_to_the_same_block_and_report_against_the_dense_weights():
    # no tuning: round 2 re-prunes an already pruned block at the same target, which must give the
    # same masks and weights; its report rows measure the error against the dense weights, not
    # against round 1's pruned ones (which would read 0)
    one = prune(metric="wanda", update="ro", update_options={"steps": 0}, sparsity=0.5, **{**BASE, "report_error": True})
    two = prune(metric="wanda", update="ro", update_options={"steps": 0, "rounds": 2}, sparsity=0.5,
                **{**BASE, "report_error": True})
    for (n, x), y in zip(one.model.state_dict().items(), two.model.state_dict().values()):
        assert torch.equal(x, y), n
    assert len(two.report.layers) == len(one.report.layers)  # one row per layer, not one per round
    for a, b in zip(one.report.layers, two.report.layers):
        assert (a.block, a.name) == (b.block, b.name) and b.error > 0
        assert b.error == pytest.approx(a.error, rel=1e-6)
    rounds = [b["round"] for b in two.manifest["notes"]["ro"]["blocks"]]
    assert rounds == [1, 2, 1, 2]


def test_ro_rounds_let_the_mask_change_and_keep_the_target():
    opts = {"lr": 3e-3, "keep_best": False, "steps": 8}
    fixed = prune(metric="wanda", update="ro", update_options=opts, sparsity=0.5, **BASE)
    rounds = prune(metric="wanda", update="ro", update_options={**opts, "rounds": 3}, sparsity=0.5, **BASE)
    a, b = _masks(fixed), _masks(rounds)
    assert any(not torch.equal(a[n], b[n]) for n in a)  # the intermediate rounds moved pruned weights
    assert all(r.sparsity == pytest.approx(0.5) for r in rounds.report.layers)  # the last round's mask holds it
    last = [e for e in rounds.manifest["notes"]["ro"]["blocks"] if e["round"] == 3]
    assert len(last) == 2 and all(e["error_after"] < e["error_before"] for e in last)


def test_ro_rounds_as_published_end_with_a_prune_of_tuned_whole_matrices():
    opts = {"lr": 3e-3, "keep_best": False, "steps": 8, "rounds": 2}
    paper = prune(metric="wandapp", update="ro", update_options={**opts, "last": "prune"}, sparsity=0.5, **BASE)
    ours = prune(metric="wandapp", update="ro", update_options=opts, sparsity=0.5, **BASE)
    assert all(r.sparsity == pytest.approx(0.5) for r in paper.report.layers)
    entries = paper.manifest["notes"]["ro"]["blocks"]
    assert [e["round"] for e in entries] == [1, 2, 3, 1, 2, 3]
    # the last entry of a block is its error after the final prune, with no tuning after it
    assert all(e["steps"] == 0 and e["error_after"] == e["error_before"] > 0 for e in entries[2::3])
    # rounds 2 of both runs start from the same re-pruned block: ours keeps that mask, the paper's
    # tunes whole matrices and prunes again, so the final weights differ
    assert any(not torch.equal(x, y) for x, y in zip(paper.model.state_dict().values(), ours.model.state_dict().values()))


def test_ro_after_admm_gradual_without_steps_is_admm_gradual():
    a = prune(metric="wanda", update="ro", update_options={"layer": "admm-gradual", "steps": 0}, pattern="2:4", **BASE)
    b = prune(metric="wanda", update="admm", update_options={"gradual": True, "seed": "reference"}, pattern="2:4", **BASE)
    for (n, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), n


def test_ro_rejects_zero_rounds():
    from compresskit.errors import OptionError

    with pytest.raises(OptionError, match="rounds >= 1"):
        ROSolver.Options(rounds=0)


@pytest.mark.parametrize("options", [None, {"lr": 1e-3, "optimizer": "adam"}, {"layer": "obs", "lr": 1e-4},
                                     {"layer": "admm-gradual", "lr": 1e-4}, {"rounds": 2, "lr": 1e-4},
                                     {"rounds": 2, "last": "prune", "lr": 1e-4}])
def test_ro_conformance(options):
    check_solver(ROSolver, options=options)
