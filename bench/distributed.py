"""Scaling of data-parallel calibration: 1 and 2 processes (one thread each) pruning SmolLM2 with GBLM.

    .venv/bin/python bench/distributed.py            # 8 prunes (2 rounds of 4), about 12 min on 2 idle cores
    .venv/bin/python bench/distributed.py --procs 1 2 4 --nsamples 32

Each configuration runs ``--repeats`` times (interleaved rounds; the fastest is kept). For each accumulator dtype (float32, the default, and float64) and each process count it runs the
command a user runs, in a fresh process group: ``python -m compresskit prune`` for one process,
``torchrun --nproc-per-node N -m compresskit prune`` for N, with ``OMP_NUM_THREADS=1`` and
``--recompute-gradients`` (so every run computes its gradients). It reads the phase times from
rank 0's manifest, compares the saved masks with the one-process run of the same dtype, fits
Amdahl's law per phase on the 1- and 2-process times (``T(N) = s + p/N``) and projects 8 ranks.
Writes ``bench/results/distributed.md`` (included by ``docs/howto/distributed.md``) and ``.json``.
The script holds ``/tmp/compresskit-heavy.lock`` while it runs (``--no-lock`` to skip).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
LOCK = "/tmp/compresskit-heavy.lock"
PHASES = ("gradients", "forwards", "pruning", "other")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(args, procs: int, accumulate: str, out: Path) -> dict:
    """One prune as a user runs it; returns its phase times from rank 0's manifest."""
    prune = ["prune", "--model", args.model, "--metric", "gblm", "--sparsity", "0.5", "--nsamples",
             str(args.nsamples), "--seqlen", str(args.seqlen), "--device", "cpu", "--recompute-gradients",
             "--accumulate", accumulate, "--no-progress", "--output", str(out)]
    if procs == 1:
        cmd = [sys.executable, "-m", "compresskit", *prune]
    else:
        torchrun = str(Path(sys.executable).parent / "torchrun")
        cmd = [torchrun, "--nproc-per-node", str(procs), "--master-port", str(_free_port()), "-m", "compresskit", *prune]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COMPRESSKIT_CACHE": str(args.cache)}
    load0, cpu0 = os.getloadavg()[0], resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    m = json.loads((out / "compresskit.json").read_text())
    rep, dist = m["report"], m.get("distributed", {})
    # decisions: one process decides every layer in turn; N ranks split them (wall time on rank 0)
    pruning = dist.get("decide_seconds", sum(r["seconds"] for r in rep["layers"]))
    forwards = rep["capture_seconds"] + sum(rep["block_seconds"]) - pruning
    gradients = m["gradients"]["seconds"]
    return {
        "procs": procs, "accumulate": accumulate, "command_wall_s": wall,
        "cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
        "load_avg": (load0 + os.getloadavg()[0]) / 2, "total_s": m["total_seconds"],
        "phases": {"gradients": gradients, "forwards": forwards, "pruning": pruning,
                   "other": m["total_seconds"] - gradients - forwards - pruning},
        "samples_per_rank": dist.get("samples_per_rank", [args.nsamples]),
        "comm_s": dist.get("communication", {}).get("seconds", 0.0),
        "comm_mb": dist.get("communication", {}).get("bytes", 0) / 1e6,
        "overall_sparsity": rep["overall_sparsity"], "model": m["resolved"]["model"],
    }


def _scratch_cache(path: Path) -> Path:
    """A cache root that reuses the user's prepared models and corpora (links) but keeps the
    gradient files every run writes out of the user's cache."""
    from compresskit.cache import cache_dir

    path.mkdir(parents=True)
    user = cache_dir()
    if user.is_dir():
        for entry in user.iterdir():
            if entry.name != "gradients":
                (path / entry.name).symlink_to(entry.resolve())
    return path


def masks(out: Path) -> dict:
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    return {k: v for k, v in weights.items() if ".layers." in k and k.endswith("_proj.weight")}


def compare(a: Path, b: Path) -> dict:
    wa, wb = masks(a), masks(b)
    total = sum(v.numel() for v in wa.values())
    diff = sum(int(((wa[k] == 0) != (wb[k] == 0)).sum()) for k in wa)
    same = all(bool((wa[k] == wb[k]).all()) for k in wa)
    return {"mask_entries": total, "mask_differences": diff, "weights_identical": same}


def amdahl(t1: float, t2: float, n: int) -> float:
    """``T(n) = s + p/n`` fitted on ``T(1) = t1`` and ``T(2) = t2``: ``p = 2 (t1 - t2)``, ``s = t1 - p``.
    A phase that did not get faster with 2 (``t2 >= t1``) is taken as fixed at ``t2``."""
    if t2 >= t1:
        return t2
    p = min(2 * (t1 - t2), t1)
    return (t1 - p) + p / n


def project(one: dict, two: dict, n: int) -> dict:
    phases = {k: amdahl(one["phases"][k], two["phases"][k], n) for k in PHASES}
    return {"procs": n, "phases": phases, "total_s": sum(phases.values())}


def table(rows: list[dict], comparisons: dict, projections: list[dict], args) -> str:
    head = ["processes", "accumulate", "samples/rank", "gradients s", "forwards s", "pruning s", "other s",
            "prune total s", "speedup", "command wall s", "CPU s", "exchange s (MB)", "masks vs 1 process"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    base = {r["accumulate"]: r for r in rows if r["procs"] == 1}
    for r in rows:
        p = r["phases"]
        cmp = comparisons.get(f"{r['accumulate']}/{r['procs']}")
        agree = "—" if cmp is None else (
            f"{cmp['mask_entries'] - cmp['mask_differences']}/{cmp['mask_entries']} agree"
            + ("; weights identical" if cmp["weights_identical"] else ""))
        cells = [str(r["procs"]), r["accumulate"], "+".join(map(str, r["samples_per_rank"])),
                 f"{p['gradients']:.1f}", f"{p['forwards']:.1f}", f"{p['pruning']:.1f}", f"{p['other']:.1f}",
                 f"{r['total_s']:.1f}", f"{base[r['accumulate']]['total_s'] / r['total_s']:.2f}x",
                 f"{r['command_wall_s']:.1f}", f"{r['cpu_s']:.0f}", f"{r['comm_s']:.2f} ({r['comm_mb']:.0f})", agree]
        lines.append("| " + " | ".join(cells) + " |")
    one = base["float32"]
    proj = ["", "**Projection, not a measurement** (Amdahl's law `T(N) = s + p/N` fitted per phase on the float32 "
            "1- and 2-process rows above, a phase that did not speed up kept at its 2-process time; assumes every "
            "rank has its own device, the phase split stays as measured here, and the exchanges stay as small a "
            "share as here):", "",
            "| processes | gradients s | forwards s | pruning s | other s | prune total s | speedup |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    for pr in projections:
        ph = pr["phases"]
        proj.append(f"| {pr['procs']} | {ph['gradients']:.1f} | {ph['forwards']:.1f} | {ph['pruning']:.1f} | "
                    f"{ph['other']:.1f} | {pr['total_s']:.1f} | {one['total_s'] / pr['total_s']:.2f}x |")
    intro = [f"Model `{one['model']}`, GBLM (l1, alpha 100) at 50 % unstructured, {args.nsamples} calibration samples "
             f"x {args.seqlen} tokens, CPU, one thread per process (`OMP_NUM_THREADS=1`), gloo; gradients recomputed "
             f"in every run. Machine: {platform.machine()}, {os.cpu_count()} cores shared with other sessions "
             f"(load average during the kept runs: {', '.join(format(r['load_avg'], '.1f') for r in rows)}). Each "
             f"configuration ran {args.repeats} times, interleaved; the table keeps the fastest run of each (all "
             "totals are in the .json).",
             "Phases from rank 0's manifest: *gradients* (fingerprint, per-sample forward+backward, all-reduce), "
             "*forwards* (capture + every block's calibration and propagation forwards + statistic all-reduces), "
             "*pruning* (every layer's score, mask and error; the ranks split the layers of each group and exchange the "
             "pruned weights), *other* (model load, calibration sampling, consistency digests). *Command wall* "
             "includes interpreter start-up and imports; *CPU s* is the processes' total CPU time; *exchange* is rank 0's "
             "time in all-reduces and broadcasts and the megabytes it put into them.",
             ""]
    return "\n".join(intro + lines + proj + ["", "Command: `.venv/bin/python bench/distributed.py`", ""])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--accumulate", nargs="+", default=["float32", "float64"])
    ap.add_argument("--project", type=int, default=8, help="ranks to project to")
    ap.add_argument("--repeats", type=int, default=2, help="rounds over every configuration; the fastest run is kept")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-lock", action="store_true")
    args = ap.parse_args(argv)
    lock = contextlib.nullcontext() if args.no_lock else open(LOCK, "w")
    with lock as fh:
        if fh is not None:
            print(f"waiting for {LOCK} ...", flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        work = Path(tempfile.mkdtemp(prefix="ck-dist-bench-"))
        args.cache = _scratch_cache(work / "cache")
        try:
            rows, comparisons = [], {}
            best: dict[tuple[str, int], dict] = {}
            for rep in range(args.repeats):  # rounds over every configuration; the fastest run of each is kept
                for acc in args.accumulate:
                    for n in sorted(args.procs):
                        out = work / f"{acc}-{n}-{rep}"
                        row = run_one(args, n, acc, out)
                        print(json.dumps(row), flush=True)
                        key = (acc, n)
                        totals = best.get(key, {}).get("all_total_s", []) + [row["total_s"]]
                        if key not in best or row["total_s"] < best[key]["total_s"]:
                            best[key] = row
                        best[key]["all_total_s"] = totals
                        if n != 1 and 1 in args.procs:
                            comparisons[f"{acc}/{n}"] = compare(work / f"{acc}-1-{rep}", out)
                            print(comparisons[f"{acc}/{n}"], flush=True)
            rows = [best[acc, n] for acc in args.accumulate for n in sorted(args.procs)]
        finally:
            shutil.rmtree(work, ignore_errors=True)
    by = {(r["accumulate"], r["procs"]): r for r in rows}
    projections = []
    if ("float32", 1) in by and ("float32", 2) in by:
        projections = [project(by["float32", 1], by["float32", 2], n) for n in (2, 4, args.project)]
    record = json.dumps(
        {"settings": vars(args) | {"out": str(args.out)}, "rows": rows, "comparisons": comparisons,
         "projections": projections, "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()}},
        indent=2, default=str) + "\n"
    text = render(json.loads(record))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distributed.md").write_text(text)
    (args.out / "distributed.json").write_text(record)
    print(text)


def render(record: dict) -> str:
    """distributed.md from distributed.json."""
    return table(record["rows"], record["comparisons"], record["projections"], argparse.Namespace(**record["settings"]))


if __name__ == "__main__":
    main()
