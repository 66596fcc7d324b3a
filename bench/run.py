"""End-to-end pruning benchmark on a packaged real model (default: SmolLM2-135M, 4-bit-derived).

    .venv/bin/python bench/run.py            # full run (well under 30 min on 2 CPU cores)
    .venv/bin/python bench/run.py --quick    # smoke run (a few minutes)

Runs dense plus every registered metric among magnitude, wanda, gblm and sparsegpt at 50 %
unstructured, 4:8 and 2:4 through ``compresskit.api.prune``; records Wikipedia perplexity (one
protocol and window cap for every row), prune wall time, peak RSS and the ratio of prune time to
the *floor* measured in the same run; then sweeps unstructured sparsity per metric. Writes
``results.md``, ``results.json`` and ``sweep.png`` to ``bench/results/`` and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import platform
import threading
import time
from pathlib import Path

import psutil
import torch

from compresskit import api
from compresskit.options import build
from compresskit.engine.registry import Registry
from compresskit.engine.walk import block_output, capture_block_inputs
from compresskit_plugins.adapters.llama import perplexity

log = logging.getLogger("bench")
CANDIDATES = ("magnitude", "wanda", "gblm", "sparsegpt")
GRADIENT_METRICS = ("gblm",)
UPDATED = ("wanda", "gblm")  # also run with SparseGPT's OBS weight update on their masks (update="obs")
PATTERNS = {"50% unstructured": ("unstructured", {}, 0.5), "4:8": ("nm", {"n": 4, "m": 8}, None),
            "2:4": ("nm", {"n": 2, "m": 4}, None)}


@dataclasses.dataclass
class Settings:
    model: str = "smollm2"
    calibration: str = "handbook"
    nsamples: int = 16
    seqlen: int = 256
    eval_data: str = "wiki"
    eval_seqlen: int = 256
    eval_windows: int = 20
    sweep: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    seed: int = 0
    threads: int = 2


class PeakRSS:
    """Samples this process's resident set size in a thread; ``peak`` in bytes."""

    def __init__(self, every: float = 0.05) -> None:
        self.proc, self.every, self.peak = psutil.Process(), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.every)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def measure_floor(adapter, s: Settings) -> dict:
    """Time of the forwards the layerwise procedure cannot skip, and of the gradient passes."""
    loaded = adapter.load(s.model)
    model = loaded.model
    batches = adapter.calibration_batches(loaded, s.nsamples, s.seqlen, s.seed, s.calibration)
    cpu = torch.device("cpu")
    with adapter.run_context(model), torch.no_grad():
        t0 = time.perf_counter()
        inputs = capture_block_inputs(adapter, model, batches, cpu)
        for block in adapter.blocks(model):
            for _ in range(2):  # statistics pass + propagation pass, no hooks
                outs = [block_output(block, a, k) for a, k in inputs]
            inputs = [((o, *a[1:]), k) for o, (a, k) in zip(outs, inputs)]
        calib = time.perf_counter() - t0
    with adapter.run_context(model):
        t0 = time.perf_counter()
        for b in batches:
            adapter.loss(model, b).backward()
            model.zero_grad(set_to_none=True)
        grad = time.perf_counter() - t0
    dense = perplexity.evaluate(model, loaded.processor, s.eval_data, s.eval_seqlen, s.eval_windows, progress=False)
    return {"calibration_s": calib, "gradient_s": grad, "dense": dense, "info": loaded.info}


def prune_once(s: Settings, metric: str, pattern: str, popts: dict, sparsity: float | None, recompute: bool,
               update: str = "none") -> dict:
    gc.collect()
    grad_opts = {"recompute": True} if recompute and metric in GRADIENT_METRICS else {}
    with PeakRSS() as rss:
        t0, c0 = time.perf_counter(), time.process_time()
        result = api.prune(model=s.model, metric=metric, pattern=pattern, pattern_options=popts, sparsity=sparsity,
                           nsamples=s.nsamples, seqlen=s.seqlen, seed=s.seed, calibration=s.calibration,
                           device="cpu", report_error=False, progress=False, gradient_options=grad_opts,
                           update=update)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ev = perplexity.evaluate(result.model, result.loaded.processor, s.eval_data, s.eval_seqlen, s.eval_windows,
                             progress=False)
    row = {"metric": metric if update == "none" else f"{metric} + {update} update", "pattern": pattern, "pattern_options": popts, "sparsity": result.report.overall_sparsity,
           "ppl": ev["perplexity"], "prune_s": wall, "prune_cpu_s": cpu, "runner_s": result.report.seconds, "peak_rss_mb": rss.peak / 2**20,
           "gradients": gradient_summary(result.manifest.get("gradients", {}))}
    log.info("%s %s %.2f: ppl %.2f, %.1f s", metric, pattern, row["sparsity"], row["ppl"], wall)
    del result
    return row


def gradient_summary(grad: dict) -> dict:
    """``{"cache": computed|recomputed|hit|..., "seconds": s}`` of a manifest's gradient section (the
    cache state is per statistic there; several statistics with different states are joined by /)."""
    states = sorted({v.get("cache") for v in grad.get("statistics", {}).values()} - {None})
    out = {"cache": "/".join(states) or grad.get("cache"), "seconds": grad.get("seconds")}
    return {k: v for k, v in out.items() if v is not None}


def ratio(row: dict, floor: dict) -> float | None:
    if row["metric"] == "magnitude":
        return None  # needs no forward pass: its floor is zero
    computed = row["gradients"].get("cache") in ("computed", "recomputed")
    f = floor["calibration_s"] + (floor["gradient_s"] if computed else 0.0)
    return row["prune_s"] / f


def environment() -> dict:
    """What the page says of the machine, recorded with the numbers (a page renders from its record)."""
    return {"torch": torch.__version__, "machine": platform.machine(), "cores": os.cpu_count(),
            "load": round(os.getloadavg()[0], 2)}


def markdown(s: Settings, floor: dict, rows: list[dict], sweep: dict, skipped: list[str], minutes: float,
             env: dict) -> str:
    p = floor["dense"]["protocol"]
    lines = [
        f"**Settings.** Model: `{s.model}` ({floor['info'].get('model', s.model)}; {floor['info'].get('weights', 'n/a')}). "
        f"Calibration: `{s.calibration}`, {s.nsamples} x {s.seqlen} tokens, seed {s.seed}. "
        f"Evaluation: {p['metric']} on `{s.eval_data}` (sha256 {p['data']['sha256'][:12]}), first "
        f"{p['windows_used']} of {p['windows_available']} non-overlapping {s.eval_seqlen}-token windows. "
        f"CPU, torch threads {s.threads}, torch {env['torch']}, {env['machine']}; "
        f"load average at the end {env['load']:.1f} on {env['cores']} cores (shared machine: timings are noisy). "
        f"Total {minutes:.1f} min.",
        "",
        f"**Floor** (same run): calibration forwards {floor['calibration_s']:.1f} s (capture + every block twice over the "
        f"calibration inputs, no hooks); gradient passes {floor['gradient_s']:.1f} s ({s.nsamples} forward+backward). "
        "Ratio = prune wall time / floor (magnitude: no floor). "
        "Prune CPU s = process CPU time of the same call (less sensitive to other load). Prune time is the whole `compresskit.prune()` call (load, calibration sampling, gradients, runner); "
        "`report_error=False`. Gradients column: `recomputed` = computed in that row (time and floor include "
        "them), `hit` = reused from the cache (floor without gradients).",
        "",
        f"| metric | pattern | sparsity | {s.eval_data} PPL | prune s | prune CPU s | x floor | peak RSS MB | gradients |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| dense | - | 0.000 | {floor['dense']['perplexity']:.2f} | - | - | - | - | - |",
    ]
    for r in rows:
        x = ratio(r, floor)
        lines.append(f"| {r['metric']} | {r['label']} | {r['sparsity']:.3f} | {r['ppl']:.2f} | {r['prune_s']:.1f} | "
                     f"{r.get('prune_cpu_s', float('nan')):.1f} | "
                     f"{'-' if x is None else f'{x:.2f}'} | {r['peak_rss_mb']:.0f} | {r['gradients'].get('cache', '-')} |")
    lines += ["", f"Unstructured sparsity sweep ({s.eval_data} PPL; `sweep.png`):", "",
              "| metric | " + " | ".join(f"{x:.0%}" for x in s.sweep) + " |", "|---" * (len(s.sweep) + 1) + "|"]
    for m, pts in sweep.items():
        lines.append(f"| {m} | " + " | ".join(f"{pts[x]:.2f}" if x in pts else "-" for x in s.sweep) + " |")
    if skipped:
        lines += ["", f"Not registered, skipped: {', '.join(skipped)}."]
    return "\n".join(lines) + "\n"


def plot(s: Settings, sweep: dict, dense: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, pts in sweep.items():
        xs = [x for x in s.sweep if x in pts]
        ax.plot([100 * x for x in xs], [pts[x] for x in xs], marker="o", label=m)
    ax.axhline(dense, color="gray", ls="--", label="dense")
    ax.set(xlabel="unstructured sparsity (%)", ylabel=f"{s.eval_data} perplexity (L={s.eval_seqlen})", yscale="log",
           title=f"{s.model}: calibration {s.calibration} {s.nsamples}x{s.seqlen}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    ap.add_argument("--model", default=None, help="model source (default smollm2; random:tiny for a smoke test)")
    ap.add_argument("--sweep", default=None, help="comma-separated unstructured sparsities, e.g. 0.1,0.2,0.5")
    ap.add_argument("--eval-data", default=None, help="evaluation text (default wiki; a small .txt for smoke tests)")
    ap.add_argument("--nsamples", type=int, default=None, help="calibration samples (default 16)")
    ap.add_argument("--seqlen", type=int, default=None, help="calibration tokens per sample (default 256)")
    ap.add_argument("--eval-windows", type=int, default=None, help="evaluation windows cap (default 20)")
    ap.add_argument("--grad-once", action="store_true",
                    help="compute gblm gradients for the first row only and reuse them (marked per row)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output directory")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    s = Settings(nsamples=4, seqlen=128, eval_seqlen=128, eval_windows=8, sweep=(0.3, 0.5, 0.7)) if args.quick else Settings()
    if args.model:
        s = dataclasses.replace(s, model=args.model)
    for key in ("nsamples", "seqlen", "eval_windows"):
        if getattr(args, key) is not None:
            s = dataclasses.replace(s, **{key: getattr(args, key)})
    if args.eval_data:
        s = dataclasses.replace(s, eval_data=args.eval_data)
    if args.sweep:
        s = dataclasses.replace(s, sweep=tuple(sorted({float(x) for x in args.sweep.split(",")} | {0.5})))
    torch.set_num_threads(s.threads)
    start = time.perf_counter()
    reg = Registry.from_entrypoints()
    names = {e.name for e in reg.entries("metric")}
    metrics = [m for m in CANDIDATES if m in names]
    skipped = [m for m in CANDIDATES if m not in names]
    if skipped:
        log.warning("metrics not registered, skipped: %s", ", ".join(skipped))
    adapter_entry = reg.get("adapter", "llama")
    adapter = adapter_entry.cls(build(adapter_entry.cls.Options, {}, "adapter."))
    floor = measure_floor(adapter, s)
    log.info("floor: calibration %.1f s, gradients %.1f s; dense ppl %.2f",
             floor["calibration_s"], floor["gradient_s"], floor["dense"]["perplexity"])
    out = Path(args.out)
    rows: list[dict] = []
    sweep: dict[str, dict[float, float]] = {m: {} for m in metrics}
    for m in metrics:
        for k, (label, (pattern, popts, sp)) in enumerate(PATTERNS.items()):
            recompute = k == 0 or not args.grad_once
            rows.append({**prune_once(s, m, pattern, popts, sp, recompute=recompute), "label": label})
            save(out, s, floor, rows, sweep, skipped, start, complete=False)
    for m in [m for m in UPDATED if m in metrics]:
        for label, (pattern, popts, sp) in PATTERNS.items():
            rows.append({**prune_once(s, m, pattern, popts, sp, recompute=False, update="obs"), "label": label})
            save(out, s, floor, rows, sweep, skipped, start, complete=False)
    for x in sorted(s.sweep, key=lambda v: -abs(v - 0.5)):  # extremes first: a partial run still shows the spread
        for m in metrics:
            done = [r["ppl"] for r in rows if r["metric"] == m and r["label"] == "50% unstructured" and x == 0.5]  # reuse
            sweep[m][x] = done[0] if done else prune_once(s, m, "unstructured", {}, x, recompute=False)["ppl"]
            save(out, s, floor, rows, sweep, skipped, start, complete=False)
    print(save(out, s, floor, rows, sweep, skipped, start, complete=True))


def save(out: Path, s: Settings, floor: dict, rows: list, sweep: dict, skipped: list, start: float, complete: bool) -> str:
    """Write results.md/.json/sweep.png (after every row, so an interrupted run keeps its numbers)."""
    out.mkdir(parents=True, exist_ok=True)
    minutes = (time.perf_counter() - start) / 60
    record = json.dumps({
        "settings": dataclasses.asdict(s), "complete": complete, "floor": floor, "rows": rows, "skipped": skipped,
        "minutes": minutes, "sweep": {m: {str(k): v for k, v in pts.items()} for m, pts in sweep.items()},
        "env": environment()}, indent=2, default=str)
    table = render(json.loads(record))
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(record)
    plot(s, sweep, floor["dense"]["perplexity"], out / "sweep.png")
    return table


def render(record: dict) -> str:
    """results.md from results.json."""
    s = Settings(**record["settings"])
    sweep = {m: {float(k): v for k, v in pts.items()} for m, pts in record["sweep"].items()}
    table = markdown(s, record["floor"], record["rows"], sweep, record["skipped"], record["minutes"], record["env"])
    if not record["complete"]:
        table += "\n**Partial:** the run had not finished when this was written.\n"
    return table


if __name__ == "__main__":
    main()
