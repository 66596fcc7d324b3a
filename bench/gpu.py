"""compresskit on a GPU: CPU vs CUDA agreement, the LLaMA-2-7B shape per method, 2:4 speed.

    python bench/gpu.py                      # on a CUDA machine: at most --budget seconds (default 470)
    python bench/gpu.py --rehearse           # the same code on the CPU with tiny shapes (< 3 min on 2 cores)
    python bench/gpu.py --methods wanda,gblm --skip agreement,sparse24 --json /tmp/gpu.json

Parts, each in its own process (a crash, an exception or a timeout becomes that row's ``error``,
the other parts go on). They run in the order build, the methods, agreement, sparse24: the 7B-shape
runs first, since the time guard cuts what comes last.

* ``agreement``: a random LLaMA (hidden 512, intermediate 1376, 4 layers, float32), 16 x 256
  random tokens; every metric at 50 % unstructured and 2:4 pruned with ``device="cpu"`` and
  ``device="cuda"`` in one process; the fraction of equal mask entries, and both devices'
  per-layer reconstruction errors (the runner's error report).
* ``sparse24``: the 7B shape's linear layers (q/k/v/o 4096x4096, gate/up 11008x4096, down
  4096x11008), bfloat16, a magnitude 2:4 mask, timed dense vs ``torch.sparse.to_sparse_semi_structured``
  (CUDA events, median); the sparse output is checked against the dense product of the masked weight.
* ``build``: a LLaMA-2-7B-shaped random model (hidden 4096, intermediate 11008, 32 layers, 32
  heads, vocab 32000) built on the GPU in bfloat16 and saved once with ``save_pretrained``.
* one process per method (wanda, sparsegpt, gblm, magnitude, in that order): ``compresskit.prune``
  of that directory at 50 % with 128 x 2048 random calibration on ``cuda``; then, in the same
  process and on the same samples, the **floor**: capture block 0's inputs and run every block
  twice over them (the statistics pass and the propagation pass), nothing else. The floor
  depends on the model and the samples, not on the method: on a GPU it is measured in the first
  method's process and shared (``--floor each`` measures it in every one; rehearsals do). A
  rehearsal runs each method and its floor 3 times in its process and keeps the fastest of each:
  single runs of a second or two on a shared 2-core CPU vary by about 20 %.

A row's ``seconds`` is the runner plus the gradient pass (loading excluded; gblm's gradient pass
is also reported on its own, ``gradient_seconds``, which includes hashing the model for the
gradient cache and writing it), ``runner_seconds / floor_seconds`` the ratio. ``cuda_peak_gib`` is ``torch.cuda.max_memory_allocated`` during the
prune, ``rss_peak_gib`` the process's peak resident set (the kernel's ``VmHWM``), load included.

``prefetch`` says whether the walk copied the next block to the device while the current one
computed (``--prefetch 0`` turns it off, to measure the inline moves; the floor moves its blocks
inline and reports that time apart, ``block_move_seconds``). ``cuda_graphs`` names the block shapes
for which the OBS sweep (sparsegpt) replayed a captured CUDA graph (true) or fell back to its column
loop (false); ``COMPRESSKIT_CUDA_GRAPHS=0`` in the environment turns graphs off.

``--budget`` is the time guard: each part gets at most its cap and what the budget has left; a part
that runs past it is killed and recorded as an error, a part with no time left is recorded as
skipped. The script needs only torch, transformers, safetensors, pluggy, click, tqdm and
compresskit itself (installed or from this tree).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# the order they run in, most wanted first: the guard cuts the last (magnitude only restates its floor)
METHODS = ("wanda", "sparsegpt", "gblm", "magnitude")
PARTS = ("agreement", "sparse24", "scale")
PATTERNS = (("unstructured", 0.5), ("2:4", None))
LINEARS = {"q/k/v/o": ((4096, 4096), 4), "gate/up": ((11008, 4096), 2), "down": ((4096, 11008), 1)}

FULL = {
    "device": "cuda", "dtype": "bfloat16", "nsamples": 128, "seqlen": 2048, "budget": 470.0,
    "agree": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048),
    "agree_data": (16, 256),
    "scale": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "linears": LINEARS, "tokens": 4096, "floor": "once", "floor_cap": 40, "repeat": 1,
    "caps": {"agreement": 90, "sparse24": 45, "build": 100, "magnitude": 60, "wanda": 80, "gblm": 220,
             "sparsegpt": 150},
}
REHEARSE = {
    "device": "cpu", "dtype": "float32", "nsamples": 64, "seqlen": 256, "budget": 175.0,
    "agree": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=512, max_position_embeddings=512),
    "agree_data": (4, 64),
    "scale": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=1000, max_position_embeddings=512, rms_norm_eps=1e-5),
    "linears": {"q/k/v/o": ((128, 128), 4), "gate/up": ((344, 128), 2), "down": ((128, 344), 1)}, "tokens": 512,
    "floor": "each", "floor_cap": 20, "repeat": 3,
    "caps": {"agreement": 45, "sparse24": 15, "build": 25, "magnitude": 25, "wanda": 30, "gblm": 45,
             "sparsegpt": 30},
}


def gib(n: float) -> float:
    return round(n / 2**30, 3)


def rss_peak_bytes() -> int:
    """The process's peak RSS (``VmHWM``: ``ru_maxrss`` would include a forking parent's peak)."""
    from compresskit.engine.stream.memory import peak_rss

    return peak_rss()


def llama_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**shape, tie_word_embeddings=False)


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------- children


def child_build(cfg: dict, args) -> dict:
    """Build the 7B-shaped random model on the compute device and save it once."""
    import torch
    from transformers import LlamaForCausalLM

    out = Path(args.model_dir)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(cfg["device"]):
        model = LlamaForCausalLM._from_config(llama_config(cfg["scale"]), dtype=getattr(torch, cfg["dtype"]))
    sync(cfg["device"])
    built = time.perf_counter() - t0
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    params = sum(p.numel() for p in model.parameters())
    return {"build_seconds": round(built, 2), "save_seconds": round(time.perf_counter() - t0 - built, 2),
            "parameters": params, "weights_gib": gib(sum(p.numel() * p.element_size() for p in model.parameters()))}


def measure_floor(result, cfg: dict) -> dict:
    """The forwards every layerwise method needs: capture, then each block twice over its inputs."""
    import torch

    from compresskit.engine.walk import block_output, capture_block_inputs

    adapter, loaded = result.adapter, result.loaded
    model, device = loaded.model, torch.device(cfg["device"])
    batches = adapter.calibration_batches(loaded, cfg["nsamples"], cfg["seqlen"], 0, "random")
    moves = 0.0
    with adapter.run_context(model), torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        inputs = capture_block_inputs(adapter, model, batches, device)
        for block in adapter.blocks(model):
            sync(device)
            m0 = time.perf_counter()
            block.to(device)
            sync(device)
            moves += time.perf_counter() - m0
            for _ in range(2):  # statistics pass + propagation pass, no hooks
                outs = [block_output(block, a, k) for a, k in inputs]
            inputs = [((o, *a[1:]), k) for o, (a, k) in zip(outs, inputs)]
            sync(device)
            m0 = time.perf_counter()
            block.to("cpu")
            moves += time.perf_counter() - m0
        sync(device)
        total = time.perf_counter() - t0
    return {"floor_seconds": round(total - moves, 3), "block_move_seconds": round(moves, 3)}


def child_prune(cfg: dict, args) -> dict:
    """One method on the saved model: time, memory, then the floor on the same samples."""
    import torch

    import compresskit

    cuda = torch.device(cfg["device"]).type == "cuda"
    best = None
    for _ in range(cfg.get("repeat", 1)):  # the fastest of the runs (rehearsals: seconds on a shared CPU vary)
        cache = tempfile.mkdtemp(prefix="ck-gpu-grad-")
        try:
            t0 = time.perf_counter()
            got = compresskit.prune(
                adapter="llama", model=str(args.model_dir), metric=args.metric, sparsity=0.5,
                nsamples=cfg["nsamples"], seqlen=cfg["seqlen"], seed=0, calibration="random", device=cfg["device"],
                progress=False, adapter_options={"dtype": cfg["dtype"]},
                gradient_options=_fresh_gradients(args.metric, cache))
            sync(cfg["device"])
            took = time.perf_counter() - t0
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        if best is None or got.report.seconds < best[0].report.seconds:
            best = (got, took)
        del got
    result, total = best
    report = result.report
    grad = float(result.manifest.get("gradients", {}).get("seconds") or 0.0)
    row = {"metric": args.metric, "seconds": round(report.seconds + grad, 3), "runner_seconds": round(report.seconds, 3),
           "gradient_seconds": round(grad, 3) if grad else None, "total_seconds": round(total, 3),
           "capture_seconds": round(report.capture_seconds, 3),
           "cuda_peak_gib": gib(torch.cuda.max_memory_allocated()) if cuda else None,
           "rss_peak_gib": gib(rss_peak_bytes()),
           "weights_gib": gib(sum(p.numel() * p.element_size() for p in result.model.parameters())),
           "sparsity": round(report.overall_sparsity, 6), "floor_seconds": None, "error": None}
    errors = [r.error for r in report.layers if r.error is not None]
    row["mean_layer_error"] = round(sum(errors) / len(errors), 6) if errors else None
    row["error_samples"] = report.error_samples  # None: the errors come from the full Gram
    from compresskit.engine.prefetch import wanted

    row["prefetch"] = wanted(cfg["device"], "cpu")  # the next block copied while this one computes
    from compresskit import obs_graph

    row["cuda_graphs"] = obs_graph.captured()  # OBS sweep block shapes: graph used (True) or column loop
    if args.floor_here:
        floors = [measure_floor(result, cfg) for _ in range(cfg.get("repeat", 1))]
        row.update(min(floors, key=lambda f: f["floor_seconds"]))
        row["floor_measured_in"] = args.metric
    return row


def _fresh_gradients(metric: str, cache: str | None = None) -> dict:
    """Gradient metrics recompute (the time is honest) into a throw-away cache; the others take none."""
    if metric != "gblm":
        return {}
    return {"recompute": True, **({"cache_dir": cache} if cache else {})}


def _masks_and_errors(result) -> tuple[dict, list]:
    masks = {}
    for i, block in enumerate(result.adapter.blocks(result.model)):
        for name, layer in result.adapter.prunable(block).items():
            masks[f"{i}.{name}"] = (layer.weight.detach() == 0).cpu()
    return masks, [r.error for r in result.report.layers]


def child_agree(cfg: dict, args) -> dict:
    """Every metric x pattern on the small model, on the CPU and on the compute device."""
    import torch
    from transformers import LlamaForCausalLM

    import compresskit

    devices = ("cpu", cfg["device"] if torch.device(cfg["device"]).type != "cpu" else "cpu")
    nsamples, seqlen = cfg["agree_data"]
    work = Path(tempfile.mkdtemp(prefix="ck-gpu-agree-"))
    os.environ["COMPRESSKIT_CACHE"] = str(work / "cache")
    rows = []
    try:
        torch.manual_seed(0)
        LlamaForCausalLM(llama_config(cfg["agree"])).save_pretrained(work / "model")
        for metric in args.metrics:
            for pattern, sparsity in PATTERNS:
                row = {"metric": metric, "pattern": pattern, "devices": list(devices), "agreement": None,
                       "errors": None, "max_error_rel_diff": None, "error": None}
                try:
                    got = []
                    for dev in devices:
                        res = compresskit.prune(adapter="llama", model=str(work / "model"), metric=metric,
                                                pattern=pattern, sparsity=sparsity, nsamples=nsamples, seqlen=seqlen,
                                                seed=0, calibration="random", device=dev, progress=False,
                                                gradient_options=_fresh_gradients(metric))
                        got.append(_masks_and_errors(res))
                        del res
                    (ma, ea), (mb, eb) = got
                    same = sum(int((ma[k] == mb[k]).sum()) for k in ma)
                    row["agreement"] = same / sum(m.numel() for m in ma.values())
                    row["errors"] = [ea, eb]  # per layer, in the order of "devices"
                    diffs = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ea, eb) if a is not None and b is not None]
                    row["max_error_rel_diff"] = max(diffs) if diffs else None
                except Exception as exc:  # recorded per row; the other rows go on
                    row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"agreement": rows}


def child_sparse24(cfg: dict, args) -> dict:
    """Dense vs 2:4 semi-structured matrix products at the 7B shape's linear layers."""
    import torch

    device = torch.device(cfg["device"])
    dtype = getattr(torch, cfg["dtype"])
    rows, tokens = [], cfg["tokens"]
    for label, ((out_f, in_f), count) in cfg["linears"].items():
        row = {"layers": label, "shape": [out_f, in_f], "per_block": count, "tokens": tokens, "dense_ms": None,
               "sparse_ms": None, "speedup": None, "rel_diff": None, "error": None}
        try:
            g = torch.Generator(device=device).manual_seed(0)
            w = torch.randn(out_f, in_f, device=device, dtype=dtype, generator=g)
            x = torch.randn(tokens, in_f, device=device, dtype=dtype, generator=g)
            groups = w.abs().reshape(out_f, -1, 4)
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter(-1, groups.topk(2, dim=-1).indices, True)
            w = w * keep.reshape(out_f, in_f)
            row["dense_ms"] = _time_ms(lambda: torch.nn.functional.linear(x, w), device)
            from torch.sparse import to_sparse_semi_structured

            ws = to_sparse_semi_structured(w)
            ref = torch.nn.functional.linear(x, w).float()
            got = torch.nn.functional.linear(x, ws).float()
            row["rel_diff"] = float((got - ref).norm() / ref.norm())
            if not row["rel_diff"] < 2e-2:
                raise RuntimeError(f"the 2:4 product differs from the dense one by {row['rel_diff']:.3g} (relative)")
            row["sparse_ms"] = _time_ms(lambda: torch.nn.functional.linear(x, ws), device)
            row["speedup"] = round(row["dense_ms"] / row["sparse_ms"], 3)
            row["backend"] = type(ws).__name__
        except Exception as exc:  # unsupported device/dtype/shape: recorded, not hidden
            row["error"] = f"{type(exc).__name__}: {exc}"[:1000]
        rows.append(row)
    ok = [r for r in rows if r["speedup"] is not None]
    block = None
    if len(ok) == len(rows):
        dense = sum(r["dense_ms"] * r["per_block"] for r in rows)
        sparse = sum(r["sparse_ms"] * r["per_block"] for r in rows)
        block = {"dense_ms": round(dense, 4), "sparse_ms": round(sparse, 4), "speedup": round(dense / sparse, 3)}
    return {"sparse24": {"rows": rows, "block": block, "dtype": cfg["dtype"], "device": str(device)}}


def _time_ms(fn, device, warmup: int = 3, repeat: int = 20) -> float:
    import statistics

    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 4)


CHILDREN = {"build": child_build, "prune": child_prune, "agreement": child_agree, "sparse24": child_sparse24}


# ------------------------------------------------------------------------------------- parent


class Guard:
    """The overall time budget: each part gets ``min(cap, time left)``.

    On a GPU each part is a fresh interpreter (``subprocess``: nothing shared, CUDA initialised
    in the child only); rehearsing on the CPU, a part is a ``fork`` of this process (the same
    functions, without paying the imports of torch and transformers once more per part, which
    take half a minute on a loaded 2-core machine).
    """

    def __init__(self, budget: float, log: Path, fork: bool) -> None:
        self.deadline, self.budget, self.log, self.fork = time.monotonic() + budget, budget, log, fork

    def run(self, name: str, cap: float, argv: list[str]) -> dict:
        left = self.deadline - time.monotonic()
        if left < 5:
            return {"error": f"skipped: the {self.budget:.0f} s time guard had {max(left, 0):.0f} s left"}
        timeout = min(cap, left)
        fd, out = tempfile.mkstemp(prefix=f"ck-gpu-{name}-", suffix=".json")
        os.close(fd)
        t0 = time.monotonic()
        argv = ["--child", name, "--child-out", out, *argv]
        with open(self.log, "a") as log:
            log.write(f"\n===== {name}: {' '.join(argv)} (timeout {timeout:.0f} s)\n")
        try:
            rc = self._forked(argv, timeout) if self.fork else self._subprocess(argv, timeout)
            wall = round(time.monotonic() - t0, 1)
            if rc is None:
                return {"error": f"timeout: ran past {timeout:.0f} s (cap {cap:.0f} s, time guard {self.budget:.0f} s)",
                        "wall_seconds": wall}
            if rc != 0:
                return {"error": f"exit code {rc}: {_tail(self.log)}", "wall_seconds": wall}
            data = json.loads(Path(out).read_text())
            data["wall_seconds"] = wall
            return data
        finally:
            Path(out).unlink(missing_ok=True)

    def _subprocess(self, argv: list[str], timeout: float) -> int | None:
        with open(self.log, "a") as log:
            try:
                return subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], stdout=log,
                                      stderr=subprocess.STDOUT, timeout=timeout,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
            except subprocess.TimeoutExpired:
                return None

    def _forked(self, argv: list[str], timeout: float) -> int | None:
        import signal
        import traceback

        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: run the part, never return into the parent's code
            code = 1
            try:
                fd = os.open(self.log, os.O_WRONLY | os.O_APPEND)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                code = main(argv)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return None


def _tail(log: Path, lines: int = 6) -> str:
    text = log.read_text(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:])[-1500:]


def environment(cfg: dict) -> dict:
    import torch

    import compresskit

    env = {"python": platform.python_version(), "torch": torch.__version__, "compresskit": compresskit.__version__,
           "compresskit_file": compresskit.__file__, "cpus": os.cpu_count(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_average": os.getloadavg()}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    try:  # nvidia-smi, not torch.cuda: the parent leaves CUDA to the parts
        env["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["gpu"] = None
    return env


def page(data: dict) -> str:
    """The results page written beside the JSON record (its rendering; tests/test_numbers.py checks it)."""
    return markdown(data) + "\n"


def markdown(data: dict) -> str:
    s = data["settings"]
    head = ("**CPU rehearsal — not a GPU measurement**: tiny shapes on the CPU, to check that the script runs "
            "and to watch the runner/floor ratio." if data["rehearsal"] else
            f"**GPU measurement** on {data['environment'].get('gpu', '?')}.")
    lines = [f"# bench/gpu.py ({'rehearsal' if data['rehearsal'] else 'GPU'})", "", head, "",
             f"Model: LLaMA with {s['scale']}; {s['dtype']}; {s['nsamples']} x {s['seqlen']} random calibration "
             f"tokens; 50 %; device {s['device']}. compresskit {data['environment']['compresskit']} from "
             f"`{data['environment']['compresskit_file']}`, torch {data['environment']['torch']}. "
             f"Wall {data['wall_seconds']:.0f} s (time guard {s['budget']:.0f} s).", "",
             "| method | seconds | floor s | runner / floor | gradient s | CUDA peak GiB | RSS peak GiB | weights GiB | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["runs"]:
        lines.append(f"| {r['metric']} | {_f(r.get('seconds'))} | {_f(r.get('floor_seconds'))} | {_f(r.get('ratio'), 2)} | "
                     f"{_f(r.get('gradient_seconds'))} | {_f(r.get('cuda_peak_gib'), 2)} | {_f(r.get('rss_peak_gib'), 2)} | "
                     f"{_f(r.get('weights_gib'), 2)} | {_err(r.get('error'))} |")
    lines += ["", "`seconds` = runner + gradient pass (loading excluded); floor = capture + every block twice over the "
              "calibration inputs (statistics and propagation passes), block moves excluded; ratio = runner / floor.", ""]
    if data.get("build"):
        lines += [f"Model build: {json.dumps(data['build'])}", ""]
    if data.get("agreement") is not None:
        lines += ["| agreement | pattern | devices | equal mask entries | max rel. diff of layer errors | error |",
                  "|---|---|---|---|---|---|"]
        for r in data["agreement"]:
            agree = f"{100 * r['agreement']:.5f} %" if r.get("agreement") is not None else "-"
            lines.append(f"| {r['metric']} | {r['pattern']} | {' vs '.join(r.get('devices', []))} | {agree} | "
                         f"{_f(r.get('max_error_rel_diff'), 4)} | {_err(r.get('error'))} |")
        lines.append("")
    sp = data.get("sparse24")
    if sp is not None:
        lines += [f"2:4 semi-structured vs dense ({sp.get('dtype')}, {sp.get('device')}, median of 20):", "",
                  "| layers | shape | tokens | dense ms | 2:4 ms | speedup | error |", "|---|---|---|---|---|---|---|"]
        for r in sp.get("rows", []):
            lines.append(f"| {r['layers']} | {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | {_f(r['dense_ms'], 4)} | "
                         f"{_f(r['sparse_ms'], 4)} | {_f(r['speedup'], 2)} | {_err(r['error'])} |")
        if sp.get("block"):
            b = sp["block"]
            lines.append(f"| one block (7 layers) | | | {b['dense_ms']} | {b['sparse_ms']} | {b['speedup']} | |")
        if sp.get("error"):
            lines.append(f"\nsparse24: {_err(sp['error'])}")
        lines.append("")
    return "\n".join(lines)


def _f(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _err(e) -> str:
    return "" if not e else str(e).replace("|", "/").replace("\n", " ")[:300]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rehearse", action="store_true", help="the same code on the CPU with tiny shapes")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    ap.add_argument("--skip", default="", help="comma-separated parts to skip, of " + ", ".join(PARTS))
    ap.add_argument("--json", type=Path, help="where to write the results (default bench/results/gpu.json, "
                    "gpu-rehearsal.json with --rehearse); the markdown goes beside it (.md)")
    ap.add_argument("--budget", type=float, help="overall time guard in seconds (default 470; 175 rehearsing)")
    ap.add_argument("--model-dir", type=Path, help="where the 7B-shaped model is saved (reused if it holds one; "
                    "default: a temporary directory, removed at the end)")
    ap.add_argument("--nsamples", type=int, help="calibration samples of the scale runs (default 128; 64 rehearsing)")
    ap.add_argument("--seqlen", type=int, help="tokens per sample of the scale runs (default 2048; 256 rehearsing)")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="dtype of the scale runs (bfloat16; float32 rehearsing)")
    ap.add_argument("--floor", choices=("once", "each"), help="measure the floor in the first method's process "
                    "only (default on a GPU: it depends on the model and the samples, not on the method) or in each "
                    "method's process (default rehearsing, where the machine's load moves between processes)")
    ap.add_argument("--prefetch", choices=("auto", "0", "1"), help="$COMPRESSKIT_PREFETCH for every part (default: "
                    "as set, else auto: the next block is copied to the GPU while the current one computes); 0 "
                    "measures the inline block moves")
    ap.add_argument("--floor-here", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--metric", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.prefetch is not None:
        os.environ["COMPRESSKIT_PREFETCH"] = args.prefetch  # inherited by every part
    cfg = dict(REHEARSE if args.rehearse else FULL)
    for key in ("nsamples", "seqlen", "dtype", "budget"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    args.metrics = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.metrics) - set(METHODS)) + sorted(set(filter(None, args.skip.split(","))) - set(PARTS))
    if unknown:
        ap.error(f"unknown method or part: {', '.join(unknown)} (methods: {', '.join(METHODS)}; parts: {', '.join(PARTS)})")
    if args.child:
        data = CHILDREN[args.child](cfg, args)
        Path(args.child_out).write_text(json.dumps(data))
        return 0
    return parent(cfg, args)


def parent(cfg: dict, args) -> int:
    import torch

    if not args.rehearse and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device; use --rehearse to run the same code on the CPU", file=sys.stderr)
        return 2
    out = args.json or RESULTS / ("gpu-rehearsal.json" if args.rehearse else "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    log.write_text("")
    skip = set(filter(None, args.skip.split(",")))
    if args.rehearse:  # imported once here, inherited by every forked part
        import transformers.models.llama.modeling_llama  # noqa: F401

        import compresskit.api  # noqa: F401
        import compresskit.engine.walk  # noqa: F401
    flags = ["--rehearse"] if args.rehearse else []
    flags += [f"--{k}={cfg[k]}" for k in ("nsamples", "seqlen", "dtype")]
    guard = Guard(cfg["budget"], log, fork=args.rehearse)
    t0 = time.monotonic()
    data = {"rehearsal": args.rehearse, "settings": {k: cfg[k] for k in ("device", "dtype", "nsamples", "seqlen", "budget",
                                                                         "scale", "agree", "agree_data")},
            "environment": environment(cfg), "runs": [], "agreement": None, "sparse24": None, "build": None}

    def save() -> None:
        data["wall_seconds"] = time.monotonic() - t0
        out.write_text(json.dumps(data, indent=1))
        out.with_suffix(".md").write_text(page(data))

    caps = cfg["caps"]  # the 7B-shape runs first: the guard cuts what comes last
    if "scale" not in skip and args.metrics:
        tmp = None if args.model_dir else Path(tempfile.mkdtemp(prefix="ck-gpu-model-"))
        model_dir = args.model_dir or tmp / "llama-7b-shape"
        try:
            if not (model_dir / "config.json").is_file():
                data["build"] = guard.run("build", caps["build"], flags + ["--model-dir", str(model_dir)])
                save()
            floor = None
            for metric in args.metrics:
                if (data["build"] or {}).get("error"):
                    row = {"error": f"no model: the build failed ({data['build']['error']})"}
                else:
                    here = ["--floor-here"] if floor is None or (args.floor or cfg["floor"]) == "each" else []
                    row = guard.run("prune", caps[metric] + (cfg["floor_cap"] if here else 0),
                                    flags + ["--model-dir", str(model_dir), "--metric", metric, *here])
                row = {"metric": metric, "seconds": None, "floor_seconds": None, "cuda_peak_gib": None,
                       "rss_peak_gib": None, "error": None, **row}
                if row.get("floor_measured_in"):
                    floor = {k: row[k] for k in ("floor_seconds", "block_move_seconds", "floor_measured_in")}
                elif floor is not None and not row["error"]:
                    row.update(floor)
                if row["floor_seconds"] and row.get("runner_seconds") is not None:
                    row["ratio"] = round(row["runner_seconds"] / row["floor_seconds"], 3)
                data["runs"].append(row)
                save()
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    if "agreement" not in skip:
        got = guard.run("agreement", caps["agreement"], flags + ["--methods", ",".join(args.metrics)])
        data["agreement"] = got.get("agreement") or [{"metric": "*", "pattern": "*", "error": got.get("error")}]
        save()
    if "sparse24" not in skip:
        got = guard.run("sparse24", caps["sparse24"], flags)
        data["sparse24"] = got.get("sparse24") or {"rows": [], "error": got.get("error")}
        save()
    save()
    print(markdown(data))
    print(f"\nwrote {out} and {out.with_suffix('.md')} (child logs: {log})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
