"""Prune a timm Vision Transformer with Wanda, then compare its logits with the dense model.

Runs in seconds on a CPU with the seeded random tiny ViT (no download; needs the ``vit``
extra: ``pip install 'compresskit[vit]'``)::

    python examples/prune_vit.py
    python examples/prune_vit.py --metric magnitude --sparsity 0.3
"""

from __future__ import annotations

import argparse
import copy

import torch

import compresskit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metric", default="wanda", help="metric name (see `compresskit list metrics`)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of block weights pruned")
    args = parser.parse_args(argv)

    result = compresskit.prune(
        adapter="vit", model="random:tiny", metric=args.metric, sparsity=args.sparsity,
        nsamples=8, device="cpu", progress=False,
    )
    dense = result.adapter.load("random:tiny").model  # the same seeded model, unpruned
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, after = dense(images), copy.deepcopy(result.model)(images)
    cos = torch.nn.functional.cosine_similarity(before, after, dim=-1).mean().item()
    print(f"{len(result.report.layers)} layers pruned, overall sparsity {result.report.overall_sparsity:.4f}")
    print(f"mean cosine similarity of logits, pruned vs dense: {cos:.4f}")


if __name__ == "__main__":
    main()
