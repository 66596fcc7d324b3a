"""The gradient engine: exact statistics, grad hygiene, checkpointing, cache and reference import."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import compresskit
from compresskit.engine import gradcache, gradients
from compresskit.api import plan
from compresskit.errors import GradientError, OptionError
from compresskit.interfaces import Loaded
from compresskit_plugins.adapters.llama import LlamaAdapter
from compresskit.stats import GradNorm, resolve
from compresskit_plugins.metrics.gblm import GBLMMetric

RUN = dict(adapter="llama", model="random:tiny", nsamples=3, seqlen=24, calibration="random",
           progress=False, report_error=False, sparsity=0.5, metric="gblm")


@pytest.fixture
def setup(tiny_llama):
    model, tok = tiny_llama
    adapter = LlamaAdapter()
    loaded = Loaded(model=model, processor=tok, source="random:tiny")
    batches = adapter.calibration_batches(loaded, 3, 24, 0, "random")
    return adapter, loaded, batches


def compute(adapter, model, batches, norm, device=None, scale=1.0, checkpointing=False, progress=False, precision="float32"):
    """Finished statistic ``{gradient_key: tensor}`` of one norm, straight from the engine."""
    stat = GradNorm(norm, scale, precision)
    parts = gradients.compute(adapter, model, batches, [stat], device or torch.device("cpu"), checkpointing, progress)
    return {k: stat.finish(p) for k, p in parts[stat.key()].items()}


def obtain(adapter, loaded, batches, metric, device, opts, progress=False):
    """``gradients.obtain`` for a metric's single gradient statistic, flattened."""
    (stat,) = [s for s in resolve(metric.statistics()) if s.source == "gradients"]
    grads, info = gradients.obtain(adapter, loaded, batches, [stat], device, opts, progress)
    return {k: v[stat.name] for k, v in grads.items()}, {**info, **info["statistics"][stat.name]}


def brute_force(adapter, model, batches):
    """Per-sample autograd on a float64 copy; l1 and l2 summed by hand in float64."""
    m64 = copy.deepcopy(model).double()
    weights = gradients.targets(adapter, m64)
    l1 = {k: torch.zeros_like(w) for k, w in weights.items()}
    l2 = {k: torch.zeros_like(w) for k, w in weights.items()}
    for batch in batches:
        gs = torch.autograd.grad(adapter.loss(m64, batch), list(weights.values()))
        for k, g in zip(weights, gs):
            l1[k] += g.abs()
            l2[k] += g * g
    return l1, {k: v.sqrt() for k, v in l2.items()}


def assert_rel_close(got: dict, ref: dict, rel: float) -> None:
    assert got.keys() == ref.keys()
    for k in ref:
        err = (got[k].double() - ref[k]).abs().max() / ref[k].abs().max()
        assert err <= rel, f"{k}: relative error {err:.2e}"


def test_statistics_match_float64_brute_force(setup):
    adapter, loaded, batches = setup
    l1_ref, l2_ref = brute_force(adapter, loaded.model, batches)
    l1 = compute(adapter, loaded.model, batches, "l1", torch.device("cpu"), progress=False)
    l2 = compute(adapter, loaded.model, batches, "l2", torch.device("cpu"), progress=False)
    assert len(l1) == 14 and "self_attn.q_proj_layer_0" in l1 and "mlp.down_proj_layer_1" in l1
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in l1.values())
    assert_rel_close(l1, l1_ref, 1e-5)
    assert_rel_close(l2, l2_ref, 1e-5)
    scaled = compute(adapter, loaded.model, batches, "l1", torch.device("cpu"), scale=100.0, progress=False)
    assert_rel_close(scaled, {k: 100 * v for k, v in l1_ref.items()}, 1e-5)


def test_only_prunable_weights_require_grad_and_state_is_restored(setup):
    adapter, loaded, batches = setup
    model = loaded.model
    seen = []

    class Spy(LlamaAdapter):
        def loss(self, model, batch):
            seen.append({n for n, p in model.named_parameters() if p.requires_grad})
            return super().loss(model, batch)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.lm_head.weight.requires_grad_(False)  # a user's flag must come back as it was
    compute(Spy(), model, batches, "l2", torch.device("cpu"), progress=False)
    prunable = {f"model.layers.{i}.{n}.weight" for i, b in enumerate(model.model.layers) for n in adapter.prunable(b)}
    assert seen and all(s == prunable for s in seen)
    assert not model.lm_head.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "lm_head.weight")
    assert all(p.grad is None for p in model.parameters())
    assert not model.training and model.config.use_cache
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_checkpointing_gives_identical_statistics(setup):
    adapter, loaded, batches = setup
    plain = compute(adapter, loaded.model, batches, "l1", torch.device("cpu"), progress=False)
    ckpt = compute(adapter, loaded.model, batches, "l1", torch.device("cpu"), checkpointing=True,
                             progress=False)
    assert all(torch.equal(plain[k], ckpt[k]) for k in plain)
    assert all("forward" not in b.__dict__ for b in loaded.model.model.layers)  # patch removed


def test_fingerprint_is_exact(setup):
    adapter, loaded, batches = setup
    cpu = torch.device("cpu")
    fp = gradcache.fingerprint
    base = fp(adapter, loaded, batches, GradNorm("l1"), cpu)
    assert base == fp(adapter, loaded, batches, GradNorm("l1"), cpu)
    assert base != fp(adapter, loaded, batches, GradNorm("l2"), cpu)
    assert base != fp(adapter, loaded, batches, GradNorm("l1", 100.0), cpu)
    assert base != fp(adapter, loaded, batches, GradNorm("l1", precision="reference"), cpu)
    assert base != fp(adapter, loaded, batches[:2], GradNorm("l1"), cpu)
    with torch.no_grad():
        loaded.model.model.norm.weight[0] += 1e-6  # not a prunable weight, still changes gradients
    assert base != fp(adapter, loaded, batches, GradNorm("l1"), cpu)


def test_second_run_reuses_cache_and_is_byte_identical(tmp_path, caplog):
    opts = {"cache_dir": str(tmp_path / "cache")}
    caplog.set_level(logging.INFO, logger="compresskit")
    first = compresskit.prune(**RUN, gradient_options=opts)
    assert first.manifest["gradients"]["statistics"]["grad_l1"]["cache"] == "computed"
    assert "reusing cached gradients" not in caplog.text
    path = first.manifest["gradients"]["statistics"]["grad_l1"]["path"]
    assert path.startswith(str(tmp_path / "cache" / "gradients")) and path.endswith(".safetensors")
    caplog.clear()
    second = compresskit.prune(**RUN, gradient_options=opts)
    assert second.manifest["gradients"]["statistics"]["grad_l1"]["cache"] == "hit"
    assert f"reusing cached gradients from {path}" in caplog.text
    first.save(tmp_path / "a")
    second.save(tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    caplog.clear()
    third = compresskit.prune(**RUN, gradient_options={**opts, "recompute": True})
    assert third.manifest["gradients"]["statistics"]["grad_l1"]["cache"] == "recomputed"
    assert "reusing cached gradients" not in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(first.model.parameters(), third.model.parameters()))


def test_damaged_cache_is_recomputed(setup, tmp_path, caplog):
    adapter, loaded, batches = setup
    metric = GBLMMetric()
    opts = {"cache_dir": str(tmp_path)}
    grads, info = obtain(adapter, loaded, batches, metric, torch.device("cpu"), opts, progress=False)
    with open(info["path"], "r+b") as f:
        f.write(b"garbage!")
    again, info2 = obtain(adapter, loaded, batches, metric, torch.device("cpu"), opts, progress=False)
    assert info2["cache"] == "computed" and "recomputing" in caplog.text
    assert all(torch.equal(grads[k], again[k]) for k in grads)
    assert not list(tmp_path.glob("gradients/*.tmp"))  # atomic writes leave no temp files


def test_unknown_gradient_option(setup):
    adapter, loaded, batches = setup
    with pytest.raises(OptionError, match="recompute"):
        obtain(adapter, loaded, batches, GBLMMetric(), torch.device("cpu"), {"recompte": True})
    # plan() checks the options before any model is loaded
    with pytest.raises(OptionError, match=r"gradient\.recompte.*valid options: recompute"):
        plan(compresskit.RunConfig(metric="gblm", gradient_options={"recompte": True}))


def reference_file(tmp_path, adapter, model, name="gradients_aggregrate_norm_l1_model_tiny.pth", mutate=None):
    """A small file in the reference format: fp16 tensors keyed '<sublayer>_layer_<i>'."""
    gen = torch.Generator().manual_seed(1)
    data = {k: (torch.rand(p.shape, generator=gen) * 3).half() for k, p in gradients.targets(adapter, model).items()}
    if mutate:
        mutate(data)
    path = tmp_path / name
    torch.save(data, path)
    return path, data


def test_reference_import_is_used_as_is(setup, tmp_path):
    adapter, loaded, batches = setup
    path, data = reference_file(tmp_path, adapter, loaded.model)
    ref = GBLMMetric(GBLMMetric.Options(semantics="reference"))
    grads, info = obtain(adapter, loaded, batches, ref, torch.device("cpu"), {"import_path": str(path)})
    assert info["cache"] == "imported" and info["file_scale"] == 100.0 and info["rescaled_by"] == 1.0
    assert all(grads[k].dtype == torch.float32 and torch.equal(grads[k], data[k].float()) for k in data)
    paper, info = obtain(adapter, loaded, batches, GBLMMetric(), torch.device("cpu"),
                                   {"import_path": str(path)})
    assert info["rescaled_by"] == pytest.approx(0.01)  # paper semantics wants the un-scaled norm
    assert all(torch.allclose(paper[k], data[k].float() / 100) for k in data)


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.pop("mlp.up_proj_layer_1"), r"no entry for 'mlp\.up_proj_layer_1'.*drop --gradients"),
    (lambda d: d.__setitem__("mlp.up_proj_layer_7", d["mlp.up_proj_layer_1"]),
     r"unexpected key 'mlp\.up_proj_layer_7'"),
    (lambda d: d.__setitem__("self_attn.k_proj_layer_0", torch.zeros(64, 64)),
     r"'self_attn\.k_proj_layer_0' has shape \(64, 64\)"),
])
def test_reference_import_errors_name_the_key(setup, tmp_path, mutate, match):
    adapter, loaded, batches = setup
    path, _ = reference_file(tmp_path, adapter, loaded.model, mutate=mutate)
    with pytest.raises(GradientError, match=match):
        obtain(adapter, loaded, batches, GBLMMetric(), torch.device("cpu"), {"import_path": str(path)})


def test_reference_import_missing_or_not_a_dict(setup, tmp_path):
    adapter, loaded, batches = setup
    cpu = torch.device("cpu")
    with pytest.raises(GradientError, match="not found"):
        obtain(adapter, loaded, batches, GBLMMetric(), cpu, {"import_path": str(tmp_path / "x.pth")})
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(GradientError, match="not a dict of tensors"):
        obtain(adapter, loaded, batches, GBLMMetric(), cpu, {"import_path": str(tmp_path / "list.pth")})


def test_vit_blocks_get_identical_gradients_with_checkpointing(registry):
    pytest.importorskip("timm")
    adapter = registry.get("adapter", "vit").cls()
    loaded = adapter.load("random:tiny")
    batches = adapter.calibration_batches(loaded, 2, 0, 0, "random")
    cpu = torch.device("cpu")
    plain = compute(adapter, loaded.model, batches, "l2", cpu, progress=False)
    ckpt = compute(adapter, loaded.model, batches, "l2", cpu, checkpointing=True, progress=False)
    assert plain.keys() == gradients.targets(adapter, loaded.model).keys()
    assert all(torch.equal(plain[k], ckpt[k]) and plain[k].abs().sum() > 0 for k in plain)


def test_layer_off_the_loss_path_is_an_error(setup):
    adapter, loaded, batches = setup
    loaded.model.model.layers[1].unused = torch.nn.Linear(8, 8)  # found by find_linears, never called
    with pytest.raises(GradientError, match=r"no gradient reached 'unused_layer_1'.*adapter\.prunable"):
        compute(adapter, loaded.model, batches, "l1", torch.device("cpu"), progress=False)
    assert all(p.grad is None for p in loaded.model.parameters())


def test_reference_precision_accumulators():
    """precision=reference: the l1 running sum is rounded to fp16 after every sample (SPEC 2.2)."""
    gen = torch.Generator().manual_seed(0)
    gs = [torch.randn(8, 16, generator=gen) * 10 ** torch.randint(-4, 1, (8, 16), generator=gen) for _ in range(20)]
    acc16 = torch.zeros(8, 16, dtype=torch.float16)
    layer = torch.nn.Linear(16, 8, bias=False)
    s1, s2 = GradNorm("l1", 100.0, "reference"), GradNorm("l2", 100.0, "reference")
    acc1, acc2 = s1.init(layer), s2.init(layer)
    assert acc1["sum"].dtype == torch.float16 and acc2["sum"].dtype == torch.float32
    for g in gs:
        acc16 += (g.float() * 100).abs()  # the reference: fp32 scale/abs, fp16 running sum
        s1.fold(acc1, g)
        s2.fold(acc2, g)
    assert torch.equal(s1.finish(acc1), acc16.float())
    l2 = torch.stack([(g.float() * 100) ** 2 for g in gs]).sum(0).sqrt()
    assert torch.allclose(s2.finish(acc2), l2.half().float(), rtol=0, atol=0)
    exact = torch.stack([(g.double() * 100).abs() for g in gs]).sum(0)
    assert not torch.equal(acc16.double(), exact)  # the fp16 rounding is real


def test_reference_precision_through_obtain(setup, tmp_path):
    adapter, loaded, batches = setup
    ref = GBLMMetric(GBLMMetric.Options(semantics="reference"))
    cpu = torch.device("cpu")
    f32, i32 = obtain(adapter, loaded, batches, ref, cpu, {"cache_dir": str(tmp_path)}, progress=False)
    opts = {"cache_dir": str(tmp_path), "precision": "reference"}
    f16, i16 = obtain(adapter, loaded, batches, ref, cpu, opts, progress=False)
    assert i16["precision"] == "reference" and i16["fingerprint"] != i32["fingerprint"] and i16["cache"] == "computed"
    for k in f32:
        assert f16[k].dtype == torch.float32 and torch.equal(f16[k].half().float(), f16[k])
        assert torch.allclose(f16[k], f32[k], rtol=5e-3, atol=1e-3)


def test_cache_whose_bytes_changed_is_recomputed(setup, tmp_path, caplog):
    """Same keys and shapes, other numbers: the content checksum catches it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    adapter, loaded, batches = setup
    opts = {"cache_dir": str(tmp_path)}
    grads, info = obtain(adapter, loaded, batches, GBLMMetric(), torch.device("cpu"), opts)
    with safe_open(info["path"], framework="pt") as f:
        meta, data = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    data["mlp.up_proj_layer_0"] = data["mlp.up_proj_layer_0"] * 2
    save_file(data, info["path"], metadata=meta)
    caplog.set_level(logging.WARNING, logger="compresskit")
    again, info2 = obtain(adapter, loaded, batches, GBLMMetric(), torch.device("cpu"), opts)
    assert info2["cache"] == "computed" and "checksum mismatch" in caplog.text
    assert all(torch.equal(grads[k], again[k]) for k in grads)


@pytest.mark.parametrize("bad, match", [(float("nan"), "NaN/inf"), (-1.0, "negative values")])
def test_reference_import_refuses_impossible_values(setup, tmp_path, bad, match):
    adapter, loaded, batches = setup
    path, _ = reference_file(tmp_path, adapter, loaded.model,
                             mutate=lambda d: d["mlp.up_proj_layer_1"].view(-1).__setitem__(0, bad))
    with pytest.raises(GradientError, match=match):
        obtain(adapter, loaded, batches, GBLMMetric(), torch.device("cpu"), {"import_path": str(path)})
