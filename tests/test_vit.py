"""The timm ViT adapter on the seeded tiny random ViT: pruning, N:M, save/reload, loss, aliases."""

from __future__ import annotations

import json

import pytest
import torch

import compresskit
from compresskit.interfaces import EvalRequest
from compresskit.api import RunConfig, plan

timm = pytest.importorskip("timm")

BLOCK_LINEARS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
FAST = dict(adapter="vit", model="random:tiny", nsamples=4, device="cpu", progress=False)


@pytest.fixture
def adapter(registry):
    return registry.get("adapter", "vit").cls()


@pytest.fixture
def tiny(adapter):
    return adapter.load("random:tiny")


def untouched(model) -> dict[str, torch.Tensor]:
    """Every tensor that pruning must leave alone: all but the block linears' weights."""
    return {k: v.clone() for k, v in model.state_dict().items()
            if not any(k.endswith(f"{n}.weight") and k.startswith("blocks.") for n in BLOCK_LINEARS)}


def test_conformance():
    from compresskit.testing import check_adapter
    from compresskit_plugins.adapters.vit import TimmViTAdapter

    passed = check_adapter(TimmViTAdapter)
    assert "capture and replay" in passed and "loss" in passed


def test_tiny_structure(adapter, tiny):
    model = tiny.model
    assert tiny.info["timm_kwargs"] == dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2, num_classes=10)
    assert len(adapter.blocks(model)) == 2
    assert list(adapter.prunable(adapter.blocks(model)[0])) == BLOCK_LINEARS
    again = adapter.load("random:tiny").model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))  # seeded


def test_capture_and_replay_equals_plain_forward(adapter, tiny):
    from compresskit.engine.walk import block_output, capture_block_inputs

    model = tiny.model
    batches = adapter.calibration_batches(tiny, 3, 0, 0, "random")
    records = capture_block_inputs(adapter, model, batches, torch.device("cpu"))
    assert [a[0].shape for a, _ in records] == [torch.Size([1, 17, 64])] * 3 and all(k == {} for _, k in records)
    with torch.no_grad():
        for (args, kwargs), batch in zip(records, batches):
            for block in adapter.blocks(model):
                args = (block_output(block, args, kwargs), *args[1:])
            replayed = model.forward_head(model.norm(args[0]))
            torch.testing.assert_close(replayed, model(batch["x"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric,options", [("wanda", {}), ("magnitude", {"scope": "row"})])
def test_unstructured_half_per_row(adapter, metric, options):
    dense = untouched(adapter.load("random:tiny").model)
    result = compresskit.prune(metric=metric, sparsity=0.5, metric_options=options, **FAST)
    model = result.model
    for block in adapter.blocks(model):
        for name, layer in adapter.prunable(block).items():
            zeros_per_row = (layer.weight == 0).sum(dim=1)
            assert torch.all(zeros_per_row == layer.in_features // 2), name
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in dense.items())  # head, patch embed, norms, biases, tokens
    assert len(result.report.layers) == 8


def test_magnitude_default_is_per_layer(adapter):
    model = compresskit.prune(metric="magnitude", sparsity=0.5, **FAST).model
    for block in adapter.blocks(model):
        for layer in adapter.prunable(block).values():
            assert abs(float((layer.weight == 0).float().mean()) - 0.5) < 0.01


def test_two_four(adapter):
    model = compresskit.prune(metric="wanda", pattern="nm", pattern_options={"n": 2, "m": 4}, **FAST).model
    for block in adapter.blocks(model):
        for layer in adapter.prunable(block).values():
            groups = (layer.weight == 0).reshape(layer.out_features, -1, 4).sum(-1)
            assert torch.all(groups == 2)


def test_dense_propagation_matches_runner_setting(adapter):
    pruned = compresskit.prune(metric="wanda", propagate="pruned", **FAST).model
    dense = compresskit.prune(metric="wanda", propagate="dense", **FAST).model
    b0 = [adapter.prunable(adapter.blocks(m)[0])["attn.qkv"].weight for m in (pruned, dense)]
    assert torch.equal(b0[0], b0[1])  # block 0 sees the same inputs either way
    b1 = [adapter.prunable(adapter.blocks(m)[1])["mlp.fc2"].weight for m in (pruned, dense)]
    assert not torch.equal(b1[0], b1[1])  # block 1 statistics differ


def test_saved_directory_reloads_in_timm_and_adapter(adapter, tmp_path):
    result = compresskit.prune(metric="wanda", sparsity=0.5, **FAST)
    out = result.save(tmp_path / "out")
    meta = json.loads((out / "vit.json").read_text())
    from safetensors.torch import load_file

    model = timm.create_model(meta["timm_name"], pretrained=False, **meta["timm_kwargs"]).eval()
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.model(x), rtol=0, atol=0)
        reloaded = adapter.load(str(out))
        torch.testing.assert_close(reloaded.model(x), result.model(x), rtol=0, atol=0)
    ev = adapter.evaluate(reloaded, EvalRequest("random", 16))  # dense reference rebuilt from the recorded source
    assert ev["accuracy"] is None and 0.0 <= ev["agreement"] <= 1.0 and 0.0 < ev["feature_cosine"] < 1.0


def test_checkpoint_sources(registry, tmp_path):
    from safetensors.torch import save_file

    cls = registry.get("adapter", "vit").cls
    adapter = cls(cls.Options(img_size=32))
    with torch.device("meta"):  # skip timm's slow random init: fill seeded values directly
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3)
    model = model.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    for t in model.state_dict().values():
        t.copy_(0.02 * torch.randn(t.shape, generator=g))
    torch.save({"model": model.state_dict()}, tmp_path / "w.pth")
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for f in ("w.pth", "w.safetensors"):
        loaded = adapter.load(f"vit_tiny_patch16_224@{tmp_path / f}")
        assert loaded.info["timm_kwargs"]["num_classes"] == 3
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)
    with pytest.raises(compresskit.CompressKitError, match="do not fit the timm architecture"):
        cls().load(f"vit_tiny_patch16_224@{tmp_path / 'w.pth'}")  # 224 px position embeddings != 32 px


def test_alias_selects_preset(registry):
    for alias, name in [("vit_b", "vit_base_patch16_224"), ("vit-s", "vit_small_patch16_224"),
                        ("deit_b", "deit_base_patch16_224"), ("dinov2_s", "dinov2_s"), ("vit", "dinov2_s")]:
        p = plan(RunConfig(adapter=alias, metric="wanda"), registry)
        assert p.adapter.name == "vit" and p.adapter.resolve_source(None) == name
        assert p.adapter.resolve_source("random:tiny") == "random:tiny"


def test_unknown_sources_say_what_to_do(adapter):
    with pytest.raises(compresskit.CompressKitError, match="random:tiny"):
        adapter.load("vit_tiny_patch16_224")  # no hub here: the message names the offline choices
    with pytest.raises(compresskit.CompressKitError, match="choose one of"):
        adapter.load("random:huge")


def test_loss_targets(registry, tiny):
    cls = registry.get("adapter", "vit").cls
    model, x = tiny.model, torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
    predicted = torch.nn.functional.cross_entropy(logits, logits.argmax(-1))
    other = (logits.argmax(-1) + 1) % 10
    auto = cls()
    torch.testing.assert_close(auto.loss(model, {"x": x}).detach(), predicted)  # no labels: dense top-1
    torch.testing.assert_close(auto.loss(model, {"x": x, "labels": other}).detach(),
                               torch.nn.functional.cross_entropy(logits, other))
    forced = cls(cls.Options(loss_target="predicted"))
    torch.testing.assert_close(forced.loss(model, {"x": x, "labels": other}).detach(), predicted)


def test_gblm_with_vit_b_alias_on_tiny_model(registry):
    if "gblm" not in {e.name for e in registry.entries("metric")}:
        pytest.skip("gblm metric not registered")
    result = compresskit.prune(adapter="vit_b", model="random:tiny", metric="gblm", sparsity=0.5,
                               nsamples=4, device="cpu", progress=False)
    assert result.manifest["resolved"]["model"] == "random:tiny"
    assert abs(result.report.overall_sparsity - 0.5) < 1e-6
    assert result.manifest["gradients"]["nsamples"] == 4


def test_cli_prune_vit_b_alias_then_eval_directory(registry, tmp_path):
    from click.testing import CliRunner

    from compresskit.cli import cli

    metric = "gblm" if "gblm" in {e.name for e in registry.entries("metric")} else "wanda"
    out = tmp_path / "vit-out"
    runner = CliRunner()
    res = runner.invoke(cli, ["prune", "--adapter", "vit_b", "--model", "random:tiny", "--metric", metric,
                              "--sparsity", "0.5", "--nsamples", "4", "--device", "cpu", "--no-progress",
                              "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "compresskit.json").read_text())["resolved"]["model"] == "random:tiny"
    res = runner.invoke(cli, ["eval", str(out), "--windows", "16", "--json"])
    assert res.exit_code == 0, res.output
    ev = json.loads(res.output.strip().splitlines()[-1])
    assert ev["adapter"] == "vit" and ev["n"] == 16 and 0.0 < ev["feature_cosine"] < 1.0
