"""What the finiteness and settings checks of ``compresskit.engine.checks`` cost inside real runs.

Every check function is wrapped with a process-CPU-time accumulator, then whole
``compresskit.prune`` calls run as usual; the table gives the CPU seconds of the run, of the
checks inside it, and their share. The first row is the load-time check of the checkpoint
against the load itself.

    .venv/bin/python bench/checks.py                       # SmolLM2-135M, 16 x 256 tokens (a few minutes)
    .venv/bin/python bench/checks.py --model random:small --nsamples 4 --seqlen 64 --out /tmp/checks.md

Writes the table and its record beside it (``checks.md``, ``checks.json``); the page renders from the record.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "checks.md"
WRAPPED = ("check_model", "check_layer_stats", "check_scores", "check_new_weights", "check_tensor",
           "check_seqlen", "rounding_report")


def instrument() -> dict[str, float]:
    """Wrap every check (where it is called from) with a CPU-time accumulator; returns the totals."""
    from compresskit import api
    from compresskit.engine import checks, gradients, runner

    spent = {"checks": 0.0}
    depth = [0]

    def timed(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            depth[0] += 1
            t = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:  # nested checks (check_scores -> check_tensor) count once
                    spent["checks"] += time.process_time() - t
        return wrapper

    for name in WRAPPED:
        wrapped = timed(getattr(checks, name))
        setattr(checks, name, wrapped)
    gradients.check_tensor = checks.check_tensor
    for mod in (api, runner):
        mod.checks = checks
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import compresskit
    from compresskit.interfaces import Loaded
    from compresskit_plugins.adapters.llama import LlamaAdapter

    spent = instrument()
    from compresskit.engine import checks

    rows = []
    t = time.process_time()
    loaded = LlamaAdapter().load(args.model)
    load_s = time.process_time() - t
    spent["checks"] = 0.0
    checks.check_model(Loaded(loaded.model, None, args.model))
    rows.append(("load the checkpoint / check every tensor once", load_s, spent["checks"]))
    del loaded

    base = dict(adapter="llama", model=args.model, nsamples=args.nsamples, seqlen=args.seqlen, device="cpu",
                calibration="random", progress=False)
    runs = [("wanda 50%", dict(metric="wanda", sparsity=0.5)),
            ("wanda 2:4 + obs update", dict(metric="wanda", pattern="2:4", update="obs")),
            ("sparsegpt 50%", dict(metric="sparsegpt", sparsity=0.5)),
            ("gblm 50% (gradients computed)", dict(metric="gblm", sparsity=0.5, gradient_options={"recompute": True}))]
    for label, cfg in runs:
        spent["checks"] = 0.0
        t = time.process_time()
        compresskit.prune(**base, **cfg)
        rows.append((label, time.process_time() - t, spent["checks"]))
        print(f"{label}: {rows[-1][1]:.2f} s, checks {rows[-1][2]:.3f} s", flush=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    record = json.dumps({
        "settings": {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "threads": args.threads},
        "env": {"torch": torch.__version__, "machine": platform.machine(), "load": load},
        "rows": [{"run": label, "cpu_seconds": total, "check_cpu_seconds": check} for label, total, check in rows]},
        indent=2) + "\n"
    text = render(json.loads(record))
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(record)


def render(record: dict) -> str:
    """checks.md from checks.json."""
    s, env = record["settings"], record["env"]
    load = "n/a" if env["load"] is None else f"{env['load']:.1f}"
    lines = [f"Model `{s['model']}`, calibration `random` {s['nsamples']} x {s['seqlen']} tokens, CPU, "
             f"{s['threads']} threads, torch {env['torch']}, {env['machine']}, load average {load} at "
             "the end. Process CPU seconds (all threads).", "",
             "| run | CPU s | checks CPU s | checks share |", "|---|---:|---:|---:|"]
    for r in record["rows"]:
        total, check = r["cpu_seconds"], r["check_cpu_seconds"]
        lines.append(f"| {r['run']} | {total:.2f} | {check:.3f} | {check / total:.2%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
