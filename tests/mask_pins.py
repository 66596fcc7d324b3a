"""Mask pins: sha256 digests of the masks every built-in recipe produces, frozen at release 0.1.0.

A refactor changes no result. Each case prunes a model through the public
``compresskit.prune`` with a fixed seed and digests, per layer in block order, the boolean
"weight is zero" mask (and, for methods that update kept weights, a float64 sum of the
weights to a tolerance). ``tests/data/mask_pins.json`` holds the digests computed at 0.1.0;
``tests/test_mask_pins.py`` recomputes them. Regenerate only when a change of result is
intended and explained in the commit::

    .venv/bin/python tests/mask_pins.py --write            # the fast random:tiny cases
    .venv/bin/python tests/mask_pins.py --write --slow     # plus the packaged SmolLM2 cases
    .venv/bin/python tests/mask_pins.py --write --new      # only cases that have no pin yet

Since 0.2 the configurations are spelled in the 0.2 API (SparseGPT's block size is an option of
the ``obs`` solver: ``update_options``); the digests are still those computed with 0.1.0.
The recipes of ``_cases_0_2`` (OWL, Wanda++, RO, streamed and 2-rank runs) came later and are
pinned as computed at 0.2, and the ``admm`` and ``swaps`` solvers' cases from when they were
added (``--write --new`` writes only digests not yet in the file, never touching an existing pin).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

PINS = Path(__file__).parent / "data" / "mask_pins.json"

TINY = dict(model="random:tiny", nsamples=8, seqlen=32, seed=0, device="cpu", progress=False)
PATTERNS = {"unstructured": dict(pattern="unstructured"),
            "2:4": dict(pattern="nm", pattern_options={"n": 2, "m": 4}),
            "4:8": dict(pattern="nm", pattern_options={"n": 4, "m": 8})}
METRICS = ("magnitude", "wanda", "gblm", "gradient", "sparsegpt")


def _cases() -> dict[str, dict[str, Any]]:
    cases: dict[str, dict[str, Any]] = {}
    for adapter in ("llama", "vit"):
        for metric in METRICS:
            for pname, pat in PATTERNS.items():
                cases[f"{adapter}/{metric}/{pname}"] = dict(TINY, adapter=adapter, metric=metric, **pat)
    extra = {
        "llama/wanda/unstructured-0.3": dict(metric="wanda", sparsity=0.3),
        "llama/wanda/variant": dict(metric="wanda", metric_options={"variant": True}),
        "llama/wanda/update-obs": dict(metric="wanda", update="obs"),
        "llama/wanda/update-obs-2:4": dict(metric="wanda", update="obs", **PATTERNS["2:4"]),
        "llama/wanda/propagate-dense": dict(metric="wanda", propagate="dense"),
        "llama/wanda/true-sequential": dict(metric="wanda", adapter_options={"true_sequential": True}),
        "llama/gblm/reference": dict(metric="gblm", metric_options={"semantics": "reference"}),
        "llama/gblm/l2-alpha1000": dict(metric="gblm", metric_options={"grad_norm": "l2", "alpha": 1000.0}),
        "llama/gblm/variant": dict(metric="gblm", metric_options={"variant": True}),
        "llama/gblm/update-obs": dict(metric="gblm", update="obs"),
        "llama/gradient/inverse-l2": dict(metric="gradient", metric_options={"inverse": True, "grad_norm": "l2"}),
        "llama/magnitude/scope-row": dict(metric="magnitude", metric_options={"scope": "row"}),
        "llama/magnitude/pattern-layer": dict(metric="magnitude", metric_options={"scope": "pattern"},
                                              pattern_options={"scope": "layer"}),
        "llama/sparsegpt/mask-scope-pattern": dict(metric="sparsegpt", metric_options={"mask_scope": "pattern"}),
        "llama/sparsegpt/blocksize-16-0.6": dict(metric="sparsegpt", sparsity=0.6, update_options={"blocksize": 16}),
        "vit/wanda/propagate-dense": dict(metric="wanda", propagate="dense", adapter="vit"),
        # added with the admm and swaps solvers (issue 26), pinned when they were written
        "llama/wanda/update-admm": dict(metric="wanda", update="admm"),
        "llama/wanda/update-admm-gradual": dict(metric="wanda", update="admm", update_options={"gradual": True}),
        "llama/wanda/update-admm-gradual-2:4": dict(metric="wanda", update="admm", update_options={"gradual": True},
                                                    **PATTERNS["2:4"]),
        "llama/wanda/update-admm-gradual-paper-ramp": dict(metric="wanda", update="admm", update_options={
            "gradual": True, "seed": "reference", "ramp": True}),
        "llama/wanda/update-swaps": dict(metric="wanda", update="swaps"),
        "llama/wanda/update-swaps-admm-4:8": dict(metric="wanda", update="swaps", update_options={"then": "admm"},
                                                  **PATTERNS["4:8"]),
        # ro's rounds (Wanda++'s prune-and-tune loop) and its admm-gradual layer update, pinned when written
        "llama/wandapp/update-ro-rounds-3": dict(metric="wandapp", update="ro", update_options={
            "lr": 3e-3, "steps": 8, "rounds": 3}),
        "llama/wandapp/update-ro-published": dict(metric="wandapp", update="ro", update_options={
            "lr": 3e-3, "steps": 8, "rounds": 2, "last": "prune"}),
        "llama/wanda/update-ro-admm-gradual-2:4": dict(metric="wanda", update="ro", update_options={
            "layer": "admm-gradual", "lr": 1e-4}, **PATTERNS["2:4"]),
    }
    for name, over in extra.items():
        cases[name] = {**TINY, "adapter": "llama", "pattern": "unstructured", **over}
    return cases


def _cases_0_2() -> dict[str, dict[str, Any]]:
    """Recipes added after 0.1.0, pinned at 0.2 (issue 24): OWL, Wanda++, RO, streamed and 2-rank runs.

    ``streamed`` prunes a saved copy of random:tiny through the streamed engine; ``ranks`` runs on
    that many forked gloo ranks (tests/distributed_harness.py) and digests rank 0's model.
    """
    base = {**TINY, "adapter": "llama", "pattern": "unstructured"}
    cases = {
        "llama/wanda/owl-0.6": dict(metric="wanda", allocation="owl", sparsity=0.6),
        "llama/gblm/owl-0.6": dict(metric="gblm", allocation="owl", sparsity=0.6),
        "llama/wandapp/unstructured": dict(metric="wandapp"),
        "llama/wandapp/2:4": dict(metric="wandapp", **PATTERNS["2:4"]),
        "llama/wanda/update-ro": dict(metric="wanda", update="ro", update_options={"lr": 1e-3}),
        "llama/sparsegpt/update-ro-2:4": dict(metric="sparsegpt", update="ro", update_options={"lr": 1e-4},
                                              **PATTERNS["2:4"]),
        "llama/wanda/streamed": dict(metric="wanda", streamed=True, calibration="random"),
        "llama/gblm/streamed": dict(metric="gblm", streamed=True, calibration="random"),
        "llama/wanda/2-ranks": dict(metric="wanda", ranks=2),
        "llama/gblm/2-ranks": dict(metric="gblm", ranks=2),
    }
    return {name: {**base, **over} for name, over in cases.items()}


def _slow_cases() -> dict[str, dict[str, Any]]:
    base = dict(adapter="llama", model="smollm2", nsamples=32, seqlen=256, seed=0, device="cpu", progress=False)
    return {f"smollm2/{m}/{p}": dict(base, metric=m, **PATTERNS[p]) for m in ("wanda", "gblm") for p in ("unstructured", "2:4")}


def digest(result) -> dict[str, Any]:
    """Mask digest (exact) and weight sums (float64) of every prunable layer, in block order."""
    import torch

    adapter, model = result.adapter, result.loaded.model
    h = hashlib.sha256()
    sums = []
    for i, block in enumerate(adapter.blocks(model)):
        for name, layer in adapter.prunable(block).items():
            w = layer.weight.detach().cpu()
            mask = (w == 0).contiguous()
            h.update(f"{i}.{name}{tuple(w.shape)}".encode())
            h.update(mask.numpy().tobytes())
            sums.append(float(w.double().sum()))
    return {"masks": h.hexdigest(), "weight_sum": float(torch.tensor(sums, dtype=torch.float64).abs().sum()),
            "layers": len(sums)}


def compute(config: dict[str, Any]) -> dict[str, Any]:
    import compresskit

    config = dict(config)
    if config.pop("streamed", False):
        return _streamed(config)
    ranks = config.pop("ranks", 1)
    if ranks > 1:
        return _ranks(config, ranks)
    return digest(compresskit.prune(**config))


def _streamed(config: dict[str, Any]) -> dict[str, Any]:
    """Save the model, prune it through the streamed engine, digest the written checkpoint."""
    import tempfile

    import compresskit
    from compresskit.engine.registry import Registry
    from compresskit_plugins.adapters.llama.sources import random_model

    with tempfile.TemporaryDirectory() as tmp:
        model, tok = random_model(config["model"].split(":", 1)[1])
        ckpt = Path(tmp) / "ckpt"
        model.save_pretrained(ckpt, max_shard_size="100KB")
        tok.save_pretrained(ckpt)
        result = compresskit.prune(**{**config, "model": str(ckpt), "max_memory": "8GB"})
        assert "streaming" in result.manifest, "the run was not streamed"
        result.save(Path(tmp) / "out")
        adapter = Registry.from_entrypoints().get("adapter", config["adapter"]).cls()
        return digest(SimpleNamespace(adapter=adapter, loaded=adapter.load(str(Path(tmp) / "out"))))


def _rank_digest(rank: int, config: dict[str, Any]) -> dict[str, Any]:
    import compresskit

    return digest(compresskit.prune(**config))


def _ranks(config: dict[str, Any], world: int) -> dict[str, Any]:
    import tempfile

    from distributed_harness import launch

    with tempfile.TemporaryDirectory() as tmp:
        env = {"COMPRESSKIT_CACHE": str(Path(tmp) / "cache-{rank}")}
        results = launch(_rank_digest, world, Path(tmp) / "ranks", config, env=env)
    for r, res in enumerate(results):
        assert res["ok"], f"rank {r}: {res['error']}"
    digests = [res["result"] for res in results]
    assert all(d == digests[0] for d in digests), "the ranks' models differ"
    return digests[0]


def main(argv: list[str]) -> None:
    old = json.loads(PINS.read_text()) if PINS.exists() else {}
    cases = {**_cases(), **_cases_0_2()}
    if "--slow" in argv:
        cases.update(_slow_cases())
    if "--new" in argv:  # only cases without a pin yet: the existing pins stay as they are
        cases = {name: cfg for name, cfg in cases.items() if name not in old}
    out = {name: compute(cfg) for name, cfg in cases.items()}
    if "--write" in argv:
        PINS.parent.mkdir(parents=True, exist_ok=True)
        PINS.write_text(json.dumps({**old, **out}, indent=1, sort_keys=True) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
