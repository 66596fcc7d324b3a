"""The layerwise runner, the API and the output directory on the tiny random LLaMA."""

from __future__ import annotations

import copy

import pytest
import torch

import compresskit
from compresskit.interfaces import Loaded
from compresskit.engine.registry import Registry
from compresskit.run import Run, RunnerSettings
from compresskit.engine.runner import prune_model
from compresskit.engine.walk import block_output, capture_block_inputs
from compresskit_plugins.adapters.llama import LlamaAdapter
from compresskit_plugins.metrics.wanda import WandaMetric
from compresskit_plugins.patterns.nm import NMPattern
from compresskit_plugins.patterns.unstructured import UnstructuredPattern

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _batches(n=4, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (1, L), generator=g)} for _ in range(n)]


def test_capture_and_replay_reproduces_plain_forward(tiny_llama):
    model, tok = tiny_llama
    adapter, batches = LlamaAdapter(), _batches()
    seen = []
    h = model.model.norm.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        for b in batches:
            adapter.forward(model, b)
    h.remove()
    records = capture_block_inputs(adapter, model, batches, torch.device("cpu"))
    assert "position_embeddings" in records[0][1]  # every kwarg the model passes is kept
    with torch.no_grad():
        for (args, kwargs), ref in zip(records, seen):
            x = args[0]
            for block in model.model.layers:
                x = block_output(block, (x, *args[1:]), kwargs)
            torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)


def _reference_wanda(model, batches, sparsity):
    """Independent sequential Wanda: full-model forwards with plain hooks, scores by formula."""
    for block in model.model.layers:
        sq = {}
        lin = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}

        def mk(name):
            def hook(mod, args):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sq[name] = sq.get(name, 0) + (x**2).sum(0)

            return hook

        hs = [m.register_forward_pre_hook(mk(n)) for n, m in lin.items()]
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], use_cache=False)
        for h in hs:
            h.remove()
        for n, m in lin.items():
            s = m.weight.double().abs() * sq[n].sqrt()
            k = int(s.shape[1] * sparsity)
            idx = torch.sort(s, dim=1, stable=True)[1][:, :k]
            m.weight.data.scatter_(1, idx, 0.0)
    return model


def test_wanda_through_runner_equals_independent_computation(tiny_llama):
    model, tok = tiny_llama
    ref = _reference_wanda(copy.deepcopy(model), _batches(), 0.5)
    loaded = Loaded(model, tok, "random:tiny")
    run = Run(LlamaAdapter(), WandaMetric(), UnstructuredPattern(), loaded, RunnerSettings(progress=False),
              batches=_batches())
    prune_model(run)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p == 0, q == 0), n


def test_prune_api_exact_row_sparsity_and_untouched_params():
    dense = compresskit.prune(adapter="llama", model="random:tiny", metric="magnitude", sparsity=0.0, progress=False).model
    res = compresskit.prune(adapter="llama", model="random:tiny", metric="wanda", sparsity=0.5, nsamples=4, seqlen=16, progress=False)
    for (name, p), (_, d) in zip(res.model.named_parameters(), dense.named_parameters()):
        if name.endswith(tuple(f"{t}.weight" for t in TARGETS)):
            assert ((p == 0).sum(dim=1) == p.shape[1] // 2).all(), name
        else:
            assert torch.equal(p, d), name  # embeddings, norms, lm_head untouched
    assert len(res.report.layers) == 14 and res.report.overall_sparsity == 0.5
    assert all(r.error is not None and 0 < r.error < 1 for r in res.report.layers)


def test_prune_api_nm_structure():
    res = compresskit.prune(adapter="llama", model="random:tiny", metric="wanda", pattern="nm",
                            pattern_options={"n": 2, "m": 4}, nsamples=2, seqlen=16, progress=False)
    for name, m in res.model.named_modules():
        if name.endswith(TARGETS):
            zeros = (m.weight == 0).view(m.weight.shape[0], -1, 4).sum(-1)
            assert (zeros == 2).all(), f"{name}: groups of 4 with {sorted(set(zeros.flatten().tolist()))} zeros"


def test_sparsity_contradicting_pattern_fails_before_loading(monkeypatch):
    monkeypatch.setattr(LlamaAdapter, "load", lambda *a: pytest.fail("loaded a model"))
    with pytest.raises(compresskit.IncompatiblePatternError, match="implies 0.5"):
        compresskit.prune(adapter="llama", model="random:tiny", pattern="nm", sparsity=0.6)


def test_true_sequential_groups_cover_every_layer_once(tiny_llama):
    ad = LlamaAdapter(LlamaAdapter.Options(true_sequential=True))
    groups = ad.groups(tiny_llama[0].model.layers[0])
    flat = [n for g in groups for n in g]
    assert sorted(flat) == sorted(ad.prunable(tiny_llama[0].model.layers[0])) and len(groups) == 4
    res = compresskit.prune(adapter="llama", model="random:tiny", metric="wanda", nsamples=2, seqlen=16,
                            adapter_options={"true_sequential": True}, progress=False)
    assert res.report.overall_sparsity == 0.5


def test_manifest_and_atomic_save(tmp_path):
    res = compresskit.prune(adapter="llama", model="random:tiny", metric="wanda", nsamples=2, seqlen=16, seed=3, progress=False)
    out = res.save(tmp_path / "out")
    from compresskit.output import read_manifest

    man = read_manifest(out)
    assert man["seed"] == 3 and man["calibration"]["fingerprint"] and man["plugins"]["metric"].startswith("wanda")
    assert len(man["report"]["layers"]) == 14
    with pytest.raises(compresskit.OutputExistsError, match="--overwrite"):
        res.save(out)

    class Boom(Exception):
        pass

    def broken_save(loaded, directory):
        (directory / "model.safetensors").write_text("partial")
        raise Boom

    res.adapter.save = broken_save
    with pytest.raises(Boom):
        res.save(tmp_path / "half")
    assert not (tmp_path / "half").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp leftovers


def test_nm_pattern_on_indivisible_layer_fails_fast(tiny_llama):
    model, tok = tiny_llama
    model.model.layers[0].mlp.down_proj = torch.nn.Linear(126, 64, bias=False)
    from compresskit.errors import IncompatiblePatternError
    from compresskit.engine.runner import check_layers

    run = Run(LlamaAdapter(), WandaMetric(), NMPattern(), Loaded(model, tok, "random:tiny"), RunnerSettings(0.5))
    with pytest.raises(IncompatiblePatternError, match="block 0 mlp.down_proj has in_features=126"):
        check_layers(run)


def test_registry_suggests_and_rejects_duplicates(registry):
    with pytest.raises(compresskit.UnknownPluginError, match="Did you mean 'wanda'"):
        registry.get("metric", "wnda")
    assert registry.get("metric", "WANDA").name == "wanda"
    from compresskit.engine.registry import Origin

    with pytest.raises(compresskit.DuplicatePluginError, match="both wanda .* and thirdparty"):
        registry.add("metric", WandaMetric, Origin("thirdparty"))


def test_third_party_plugin_on_fresh_manager():
    import types

    from compresskit import ScoreMetric, hookimpl
    from compresskit.engine.registry import get_plugin_manager

    class Neg(ScoreMetric):
        name = "neg_magnitude"

        def score(self, weight, stats):
            return -weight.abs()

    mod = types.ModuleType("thirdparty")

    @hookimpl
    def register_metrics(register):
        register(Neg)

    mod.register_metrics = register_metrics
    pm, load = get_plugin_manager()
    pm.register(mod, name="thirdparty")
    reg = Registry(pm, load)
    assert reg.get("metric", "neg-magnitude").origin.plugin == "thirdparty"
    res = compresskit.prune(adapter="llama", model="random:tiny", metric="neg_magnitude", registry=reg,
                            report_error=False, progress=False)
    w = res.model.model.layers[0].self_attn.q_proj.weight
    assert (w == 0).float().mean() == 0.5


def test_broken_and_disabled_plugins(monkeypatch):
    import importlib.metadata as md

    from compresskit.engine.registry import get_plugin_manager

    real = md.entry_points
    bad = md.EntryPoint("broken", "compresskit_no_such_module", "compresskit")
    monkeypatch.setattr(md, "entry_points", lambda group: [*real(group=group), bad])
    monkeypatch.setenv("COMPRESSKIT_DISABLE_PLUGINS", "magnitude")
    reg = Registry(*get_plugin_manager())
    assert [f.plugin for f in reg.failures] == ["broken"]
    assert "magnitude" not in [e.name for e in reg.entries("metric")]
    with pytest.raises(compresskit.UnknownPluginError, match="plugin broken.*failed to import"):
        reg.get("metric", "magnitude")
