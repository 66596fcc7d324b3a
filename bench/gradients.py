"""Benchmark of the GBLM gradient engine: seconds per sample and peak memory (RSS).

Runs every (seqlen, checkpointing) configuration in a fresh subprocess so that each peak RSS
(``resource.getrusage().ru_maxrss``, a per-process high-water mark) belongs to that
configuration alone, and writes a markdown table to ``bench/results/gradients.md`` and its record
``gradients.json`` (the page renders from the record).

    .venv/bin/python bench/gradients.py [--model smollm2] [--seqlens 128 256 512] [--samples 4]

The default model is the packaged SmolLM2-135M-Instruct (``compresskit.assets``); if it is
not available, ``random:small`` is used and the table says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import torch

log = logging.getLogger(__name__)
RESULTS = Path(__file__).parent / "results" / "gradients.md"


def _rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e9


def _load(model: str):
    from compresskit.errors import CompressKitError
    from compresskit_plugins.adapters.llama import LlamaAdapter

    adapter = LlamaAdapter()
    try:
        return adapter, adapter.load(model), model
    except (CompressKitError, ImportError, OSError) as exc:
        log.warning("could not load %s (%s); falling back to random:small", model, exc)
        return adapter, adapter.load("random:small"), "random:small"


class _Stamped:
    """Delegates to an adapter and records (wall, CPU) time at each loss call: one sample apart."""

    def __init__(self, adapter, stamps: list):
        self._adapter, self._stamps = adapter, stamps

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def loss(self, model, batch):
        self._stamps.append((time.perf_counter(), time.process_time()))
        return self._adapter.loss(model, batch)


def one(model: str, seqlen: int, samples: int, checkpointing: bool, data: str) -> dict:
    """Measure one configuration in this process (called in a subprocess by :func:`main`)."""
    from compresskit.engine import gradcache, gradients
    from compresskit.stats import GradNorm

    stat = [GradNorm("l1")]
    torch.set_num_threads(2)
    adapter, loaded, used = _load(model)
    try:
        batches = adapter.calibration_batches(loaded, samples + 1, seqlen, 0, data)
    except Exception as exc:  # the corpus may be unavailable offline; timings do not depend on it
        log.warning("calibration data %s unavailable (%s); using random token ids", data, exc)
        data, batches = "random", adapter.calibration_batches(loaded, samples + 1, seqlen, 0, "random")
    rss_loaded = _rss_gb()
    peak_loading = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    cpu = torch.device("cpu")
    gradients.compute(adapter, loaded.model, batches[:1], stat, cpu, checkpointing=checkpointing, progress=False)
    stamps: list[tuple[float, float]] = []
    timed = _Stamped(adapter, stamps)
    load_before = os.getloadavg()[0]
    gradients.compute(timed, loaded.model, batches[1:], stat, cpu, checkpointing=checkpointing, progress=False)
    stamps.append((time.perf_counter(), time.process_time()))
    load = (load_before + os.getloadavg()[0]) / 2
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    cpu_s = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
    t = time.perf_counter()
    gradcache.fingerprint(adapter, loaded, batches, stat[0], cpu)
    fp_seconds = time.perf_counter() - t
    n_params = sum(p.numel() for p in loaded.model.parameters())
    n_pruned = sum(w.numel() for w in gradients.targets(adapter, loaded.model).values())
    return {
        "model": used, "params": n_params, "pruned_weights": n_pruned, "seqlen": seqlen, "samples": samples,
        "checkpointing": checkpointing, "data": data, "wall_s": wall, "cpu_s": cpu_s,
        "load_avg": load, "rss_loaded_gb": rss_loaded, "peak_loading_gb": peak_loading,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "accumulator_gb": n_pruned * 4 / 1e9, "fingerprint_s": fp_seconds,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--samples", type=int, default=4, help="timed samples per configuration (after 1 warm-up)")
    ap.add_argument("--data", default="wiki-train", help="calibration text (timings do not depend on it)")
    ap.add_argument("--one", nargs=2, metavar=("SEQLEN", "CHECKPOINTING"), help=argparse.SUPPRESS)
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.one:
        print(json.dumps(one(args.model, int(args.one[0]), args.samples, args.one[1] == "1", args.data)))
        return
    rows = []
    for seqlen in args.seqlens:
        for ckpt in (False, True):
            cmd = [sys.executable, __file__, "--model", args.model, "--samples", str(args.samples),
                   "--data", args.data, "--one", str(seqlen), "1" if ckpt else "0"]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    record = json.dumps({"env": {"machine": platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
                                 "python": platform.python_version()}, "rows": rows}, indent=2) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(json.loads(record)))
    args.output.with_suffix(".json").write_text(record)
    print(f"wrote {args.output} and its record {args.output.with_suffix('.json').name}")


def render(record: dict) -> str:
    """gradients.md from gradients.json."""
    rows, env = record["rows"], record["env"]
    r0 = rows[0]
    lines = [
        "# GBLM gradient engine: time per sample and peak memory",
        "",
        f"Model: `{r0['model']}` ({r0['params'] / 1e6:.1f} M parameters, {r0['pruned_weights'] / 1e6:.1f} M prunable "
        f"weights; one float32 accumulator = {r0['accumulator_gb']:.2f} GB). Norm l1, batch 1, float32, CPU, "
        f"`torch.set_num_threads(2)`; calibration `{r0['data']}`; {r0['samples']} samples timed one by one "
        "(forward + backward + fold) after one warm-up sample.",
        f"Machine: {env['machine']}, {env['cores']} cores **shared with other developers** (timings are "
        f"noisy upper bounds), torch {env['torch']}, Python {env['python']}.",
        "Peak RSS is the whole process (Python, torch, model, tokenizer, data) in a fresh subprocess per row; "
        "'loading peak' is the high-water mark before the gradient pass (if it exceeds the final peak, the "
        "gradient pass stayed below it).",
        "",
        "Wall time is inflated by the other developers' jobs (see the load average, 2 cores); process CPU "
        "time per sample (2 threads) is steadier, and the minimum over samples is the least disturbed estimate.",
        "",
        "| seqlen | checkpointing | wall s / sample (min / median) | CPU s / sample (min / median) | load avg | "
        "loading peak (GB) | RSS after load (GB) | peak RSS (GB) | peak - RSS after load (GB) |",
        "|---:|:---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ckpt = "yes" if r["checkpointing"] else "no"
        cells = [str(r["seqlen"]), ckpt, f"{min(r['wall_s']):.2f} / {median(r['wall_s']):.2f}",
                 f"{min(r['cpu_s']):.2f} / {median(r['cpu_s']):.2f}", f"{r['load_avg']:.1f}",
                 f"{r['peak_loading_gb']:.2f}", f"{r['rss_loaded_gb']:.2f}", f"{r['peak_rss_gb']:.2f}",
                 f"{r['peak_rss_gb'] - r['rss_loaded_gb']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Cache fingerprint (sha256 of the full state dict + calibration bytes): "
                  f"{sum(r['fingerprint_s'] for r in rows) / len(rows):.2f} s on average.",
              "", "Command: `.venv/bin/python bench/gradients.py`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
