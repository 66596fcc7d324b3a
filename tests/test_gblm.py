"""GBLM and gradient-only metrics: formulas, both semantics, both norms, N:M, variant, oracles."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import compresskit
from compresskit.errors import IncompatiblePatternError, OptionError
from compresskit.options import build
from compresskit.stats import ActSq, LayerStats
from compresskit_plugins.adapters.llama import LlamaAdapter
from compresskit_plugins.metrics.gblm import GBLMMetric, gblm_score_paper
from compresskit_plugins.metrics.gradient import GradientMetric

RUN = dict(adapter="llama", model="random:tiny", nsamples=4, seqlen=32, calibration="random",
           progress=False, report_error=False, sparsity=0.5)


def prune(metric="gblm", **kw):
    return compresskit.prune(**{**RUN, "metric": metric, **kw})


def weights(result):
    return {n: p.detach().clone() for n, p in result.model.named_parameters()}


def row_mask(scores, sparsity=0.5):
    """Restatement of the reference per-row rule: stable ascending sort, prune floor(in*s)."""
    k = int(scores.shape[1] * sparsity)
    order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter(1, order, True)


def test_paper_formula_on_a_hand_example():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.5, 0.0, -1.0, 2.0]])
    col_sq = torch.tensor([4.0, 1.0, 9.0, 0.25])  # column norms 2, 1, 3, 0.5
    g = torch.tensor([[0.1, 0.2, 0.0, 0.3], [1.0, 1.0, 1.0, 0.0]])
    expected = torch.tensor([[1 * 2 + 10 * 1 * 0.1, 2 * 1 + 10 * 2 * 0.2, 3 * 3 + 0.0, 4 * 0.5 + 10 * 4 * 0.3],
                             [0.5 * 2 + 10 * 0.5, 0.0, 1 * 3 + 10 * 1, 2 * 0.5 + 0.0]])
    assert torch.allclose(gblm_score_paper(w, col_sq, g, alpha=10.0), expected)
    metric = GBLMMetric(GBLMMetric.Options(alpha=10.0))
    stats = LayerStats({"act_sq": torch.tensor([2.0, 1.0, 3.0, 0.5]) ** 2, "grad_l1": g}, 0, "probe", 1, 1)
    assert torch.allclose(metric.score(w, stats), expected)


def test_reference_score_restates_spec_s_code():
    """S_code = |W| sqrt(A) + fp16(|W|) * fp16(G_file), A the running mean over sequences (SPEC 3.2)."""
    gen = torch.Generator().manual_seed(0)
    w, g_file = torch.randn(16, 24, generator=gen), torch.rand(16, 24, generator=gen) * 50
    metric = GBLMMetric(GBLMMetric.Options(semantics="reference"))
    act, parts = ActSq(), ActSq().init(torch.nn.Linear(24, 16))
    a, n = torch.zeros(24), 0
    for _ in range(5):
        x = torch.randn(32, 24, generator=gen) * 3  # one sequence of 32 tokens
        act.update(parts, x)
        a = a * n / (n + 1)
        n += 1
        a += x.pow(2).sum(0) / n
    s_code = w.abs() * a.sqrt() + (w.abs().half() * g_file.half()).float()
    got = metric.score(w, LayerStats({"act_sq": act.finish(parts), "grad_l1": g_file}, 0, "probe", 160, 5))
    assert torch.allclose(got, s_code, rtol=1e-6)
    assert torch.equal(row_mask(got), row_mask(s_code))
    assert metric.statistics()[1].scale == 100.0 and GBLMMetric().statistics()[1].scale == 1.0


def test_reference_semantics_rejects_alpha():
    with pytest.raises(OptionError, match="metric.alpha=10.*drop metric.alpha or use metric.semantics=paper"):
        build(GBLMMetric.Options, {"semantics": "reference", "alpha": "10"})
    assert build(GBLMMetric.Options, {"semantics": "reference"}).alpha == 100.0


def test_alpha_zero_is_wanda_and_default_alpha_differs():
    wanda = weights(prune("wanda"))
    zero = weights(prune(metric_options={"alpha": 0}))
    default = weights(prune())
    assert all(torch.equal(wanda[n], zero[n]) for n in wanda)
    layers = [n for n in wanda if ".layers." in n and n.endswith("proj.weight")]
    assert any(not torch.equal(wanda[n] == 0, default[n] == 0) for n in layers)
    assert all(float((default[n] == 0).float().mean()) == 0.5 for n in layers)


def test_norms_are_passed_and_change_the_mask():
    l1, l2 = prune(), prune(metric_options={"grad_norm": "l2"})
    assert list(l1.manifest["gradients"]["statistics"]) == ["grad_l1"]
    assert l2.manifest["gradients"]["statistics"]["grad_l2"]["norm"] == "l2"
    w1, w2 = weights(l1), weights(l2)
    assert any(not torch.equal(w1[n] == 0, w2[n] == 0) for n in w1 if n.endswith("proj.weight"))


def test_reference_semantics_end_to_end_on_block_0(tmp_path):
    """Import a reference-format file; block 0's masks equal S_code computed by hand on the dense model."""
    adapter = LlamaAdapter()
    dense = adapter.load("random:tiny")
    batches = adapter.calibration_batches(dense, RUN["nsamples"], RUN["seqlen"], 0, "random")
    block0 = adapter.prunable(adapter.blocks(dense.model)[0])
    gen = torch.Generator().manual_seed(3)
    files = {f"{n}_layer_{i}": (torch.rand(l.weight.shape, generator=gen) * 20).half()
             for i, b in enumerate(adapter.blocks(dense.model)) for n, l in adapter.prunable(b).items()}
    torch.save(files, tmp_path / "grads.pth")
    sums, calls = {n: torch.zeros(l.in_features) for n, l in block0.items()}, dict.fromkeys(block0, 0)

    def hook(name):
        def fn(module, args):
            sums[name] += args[0].detach().reshape(-1, args[0].shape[-1]).float().pow(2).sum(0)
            calls[name] += 1
        return fn

    handles = [l.register_forward_pre_hook(hook(n)) for n, l in block0.items()]
    with torch.no_grad():
        for b in batches:
            adapter.forward(dense.model, b)
    for h in handles:
        h.remove()
    result = prune(metric_options={"semantics": "reference"},
                   gradient_options={"import_path": str(tmp_path / "grads.pth")})
    pruned = adapter.prunable(adapter.blocks(result.model)[0])
    for name, layer in block0.items():
        w = layer.weight.detach()
        a = sums[name] / calls[name]
        s_code = w.abs() * a.sqrt() + (w.abs().half() * files[f"{name}_layer_0"]).float()
        assert torch.equal(pruned[name].weight == 0, row_mask(s_code)), name
    assert result.manifest["gradients"]["statistics"]["grad_l1"]["cache"] == "imported"


def test_two_four_pattern():
    result = prune(pattern="nm", pattern_options={"n": 2, "m": 4}, sparsity=None)
    for name, p in result.model.named_parameters():
        if ".layers." in name and name.endswith("proj.weight"):
            zeros = (p.detach() == 0).reshape(p.shape[0], -1, 4).sum(-1)
            assert torch.all(zeros == 2), name


def test_adaptive_variant():
    result = prune(metric_options={"variant": True})
    for name, p in result.model.named_parameters():
        if ".layers." in name and name.endswith("proj.weight"):
            rows = (p.detach() == 0).float().mean(1)
            assert abs(float(rows.mean()) - 0.5) <= 2e-3, name
            assert rows.std() > 0, name  # per-row thresholds: rows differ
    with pytest.raises(IncompatiblePatternError, match="comparison group 'adaptive'.*--pattern unstructured"):
        prune(metric_options={"variant": True}, pattern="nm", pattern_options={"n": 2, "m": 4}, sparsity=None)


@pytest.mark.parametrize("inverse", [False, True])
def test_gradient_metric_is_per_row_w_times_g(inverse):
    stats = GradientMetric(GradientMetric.Options(grad_norm="l2")).statistics()
    assert [(s.name, s.scale, s.source) for s in stats] == [("grad_l2", 100.0, "gradients")]
    result = prune("gradient", metric_options={"grad_norm": "l2", "inverse": inverse})
    info = result.manifest["gradients"]["statistics"]["grad_l2"]
    assert info["norm"] == "l2" and info["scale"] == 100.0
    grads = {k: v.sqrt() for k, v in load_file(info["path"]).items()}  # the cache holds the sum of squares
    adapter = LlamaAdapter()
    dense = adapter.load("random:tiny").model
    for i, (bd, bp) in enumerate(zip(adapter.blocks(dense), adapter.blocks(result.model))):
        pruned = adapter.prunable(bp)
        for name, layer in adapter.prunable(bd).items():
            w, g = layer.weight.detach(), grads[f"{name}_layer_{i}"]
            scores = w.abs() / (g + 1e-8) if inverse else w.abs() * g
            assert torch.equal(pruned[name].weight == 0, row_mask(scores)), name


def test_cli_imports_a_reference_file_and_reports_it(tmp_path):
    from click.testing import CliRunner

    from compresskit.cli import cli
    from compresskit.output import read_manifest

    adapter = LlamaAdapter()
    model = adapter.load("random:tiny").model
    files = {f"{n}_layer_{i}": torch.rand(l.weight.shape).half()
             for i, b in enumerate(adapter.blocks(model)) for n, l in adapter.prunable(b).items()}
    torch.save(files, tmp_path / "g.pth")
    args = ["prune", "--adapter", "llama", "--model", "random:tiny", "--metric", "gblm", "--sparsity", "0.5",
            "--nsamples", "2", "--seqlen", "16", "--calibration", "random", "--no-error-report", "--no-progress",
            "-o", "metric.semantics=reference", "--gradients", str(tmp_path / "g.pth"),
            "--output", str(tmp_path / "out")]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    info = read_manifest(tmp_path / "out")["gradients"]["statistics"]["grad_l1"]
    assert info["cache"] == "imported" and info["file_scale"] == 100.0 and info["path"] == str(tmp_path / "g.pth")
    bad = CliRunner().invoke(cli, [*args[:-1], str(tmp_path / "out2"), "-o", "metric.alpha=5"])
    assert bad.exit_code != 0 and "drop metric.alpha or use metric.semantics=paper" in bad.output


@pytest.mark.slow
def test_gblm_on_packaged_smollm2(tmp_path):
    """Real model: finite non-zero statistics with l2 <= l1, 50% per row, and a cache hit on rerun."""
    pytest.importorskip("gguf")
    run = dict(model="smollm2", nsamples=2, seqlen=64, gradient_options={"cache_dir": str(tmp_path)})
    l1 = prune(**run)
    l2 = prune(**run, metric_options={"grad_norm": "l2"})
    g1 = load_file(l1.manifest["gradients"]["statistics"]["grad_l1"]["path"])
    g2 = {k: v.sqrt() for k, v in load_file(l2.manifest["gradients"]["statistics"]["grad_l2"]["path"]).items()}
    assert len(g1) == 30 * 7
    assert all(torch.isfinite(g1[k]).all() and g1[k].sum() > 0 and (g2[k] <= g1[k] * (1 + 1e-6)).all() for k in g1)
    assert abs(l1.report.overall_sparsity - 0.5) < 1e-6
    assert prune(**run).manifest["gradients"]["statistics"]["grad_l1"]["cache"] == "hit"
