"""The OBS sweep's cost per column (SparseGPT's mask selection and the ``obs`` update).

    .venv/bin/python bench/obs_sweep.py                    # CPU (and CUDA when present), one thread
    .venv/bin/python bench/obs_sweep.py --against 463a326  # and the sweep of another git revision

The sweep is sequential over columns: on a GPU its time is the number of kernels launched per
column times the launch cost (about 35k columns per LLaMA-7B block), on a CPU it is mostly the
same per-call overhead at small shapes. For each shape and mode (a fixed mask; SparseGPT's
unstructured selection; 2:4) it prints microseconds per column of the sweep alone (the Hessian's
factorisation before it is not timed), the best of ``--repeat`` runs
(process CPU time on the CPU, CUDA-synchronised wall time on a GPU). With ``--against REV``,
``compresskit/obs.py`` of that revision is loaded beside the working tree's, run on the same
inputs, and its results are checked equal to ours. On CUDA each row is timed with the sweep's CUDA
graphs off and on (``$COMPRESSKIT_CUDA_GRAPHS``; 2:4 selects inside each block and never uses
them), and the LLaMA-7B attention shape 4096x4096 is added.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((64, 1024), (512, 2048))
CUDA_SHAPES = SHAPES + ((4096, 4096),)


def load_revision(rev: str):
    """``compresskit/obs.py`` as it is at git revision ``rev``, as a module."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:compresskit/obs.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="obs-rev-")) / "obs_rev.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("obs_rev", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def runs(mod, w, h, mode):
    """The sweep alone (the Hessian's factorisation is done once, outside the timing), in ``mode``."""
    wd, fac = mod._prepare(w, h, 0.01, 4)
    if mode == "fixed mask":
        mask = (torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.5).to(w.device)
        return lambda: mod.obs_sweep(wd, fac.u, 128, mask=mask)[0]
    if mode == "unstructured":
        pick, target, stride = mod.block_threshold_mask, 0.5, 128
    else:
        from compresskit_plugins.patterns.nm import NMPattern  # the pattern's own mask, as the runner passes it

        pick, target, stride = NMPattern().mask, 0.5, 4

    def choose(cols, d):
        return pick(mod.obs_saliency(cols, d), target)

    return lambda: mod.obs_sweep(wd, fac.u, 128, choose=choose, stride=stride)[0]


def clock(fn, device, repeat: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        else:
            t = time.process_time()
            out = fn()
            best = min(best, time.process_time() - t)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", help="a git revision whose compresskit/obs.py to time beside ours")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cuda-only", action="store_true", help="only the CUDA rows (bench/gpu.sh, a few seconds)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    import compresskit.obs as ours

    other = load_revision(a.against) if a.against else None
    devices = ([] if a.cuda_only else [torch.device("cpu")]) + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    if not devices:
        raise SystemExit("--cuda-only: no CUDA device here")
    head = "| device | shape | mode | CUDA graphs | us per column |" + (
        f" {a.against} us | ratio | equal |" if other else "")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    g = torch.Generator().manual_seed(0)
    for device in devices:
        cuda = device.type == "cuda"
        for out, cols in CUDA_SHAPES if cuda else SHAPES:
            w = torch.randn(out, cols, generator=g)
            x = torch.randn(4 * cols, cols, generator=g)
            w, x = w.to(device), x.to(device)
            h = x.t() @ x  # on the device: the 4096-wide Gram takes seconds on one CPU thread
            for mode in ("fixed mask", "unstructured", "2:4"):
                for graphs in ("0", "1") if cuda and mode != "2:4" else ("0",):
                    os.environ["COMPRESSKIT_CUDA_GRAPHS"] = graphs
                    t, got = clock(runs(ours, w, h, mode), device, a.repeat)
                    label = ("on" if graphs == "1" else "off") if cuda else "-"
                    row = f"| {device.type} | {out}x{cols} | {mode} | {label} | {1e6 * t / cols:.1f} |"
                    if other:
                        t2, want = clock(runs(other, w, h, mode), device, a.repeat)
                        row += f" {1e6 * t2 / cols:.1f} | {t / t2:.2f} | {'yes' if torch.equal(got, want) else '**no**'} |"
                    print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
