"""Streamed pruning: peak memory, time and bytes read on a model larger than the budget, and
streamed vs in-memory on SmolLM2 (same masks).

    .venv/bin/python bench/streaming.py                 # everything (tens of minutes on 2 cores)
    .venv/bin/python bench/streaming.py --only smollm2  # or: big, memory-model

1. ``big``: a random LLaMA-architecture checkpoint (``--preset``; default ``1b``: 40 blocks,
   hidden 1536, MLP 4096, 1.1 B parameters, 4.4 GB in float32) is generated once into
   ``$COMPRESSKIT_CACHE/models/random-llama-<preset>`` (normal(0, 0.02) weights seeded per
   tensor name, norms 1; one block at a time, so generating needs no more memory than
   pruning), then pruned with GBLM under ``--max-memory`` (default 1.45 GB: 1/3 of the
   checkpoint) in a fresh process.
2. ``smollm2``: GBLM on the packaged SmolLM2-135M, in memory and streamed (each in a fresh
   process), and the number of mask entries that differ.
3. ``memory-model``: the memory model of docs/howto/large-models.md for LLaMA-2 7B/13B/70B.

Peak RSS is the whole process (its kernel high-water mark ``VmHWM``, the save included; it
includes the ~1 GB of torch/transformers libraries this machine's CUDA build of torch maps); "runtime" is the RSS right before the
prune call. Writes ``bench/results/streaming.md`` and ``.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
THREADS = int(os.environ.get("OMP_NUM_THREADS") or 2)
"""torch threads of each run: ``$OMP_NUM_THREADS`` (on a shared machine: 1), else 2."""
PRESETS = {
    "1b": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=40, num_attention_heads=12,
               num_key_value_heads=4, vocab_size=32000),
    "1b-4": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=32000),  # 1b's shapes, 4 blocks: a quick check of its peak
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096),
}
LLAMA2 = {  # config.json values of the LLaMA-2 checkpoints (meta-llama/Llama-2-*-hf)
    "LLaMA-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "LLaMA-2-13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000),
    "LLaMA-2-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000),
}


def random_checkpoint(preset: str) -> Path:
    """The random checkpoint of ``preset`` in the cache, written block by block on first use."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    from compresskit.cache import atomic_directory, cache_dir
    from compresskit.engine.stream import tensorfile
    from compresskit_plugins.adapters.llama.sources import byte_tokenizer

    target = cache_dir() / "models" / f"random-llama-{preset}"
    if (target / "config.json").is_file():
        return target
    cfg = LlamaConfig(max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                      **PRESETS[preset])
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        key = name.split(".")[2] if ".layers." in name else "rest"
        groups.setdefault(key, {})[name] = tuple(p.shape)
    n = len(groups)
    files = {key: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, key in enumerate(groups)}
    with atomic_directory(target, keep_existing=True) as tmp:
        weight_map, total = {}, 0
        for key, shapes in groups.items():
            tensors = {}
            for name, shape in shapes.items():
                if "norm" in name:
                    tensors[name] = torch.ones(shape)
                else:
                    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                    tensors[name] = torch.randn(shape, generator=g) * 0.02
                weight_map[name] = files[key]
                total += tensors[name].numel() * 4
            tensorfile.write(tmp / files[key], tensors)
            del tensors
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        cfg.save_pretrained(tmp)
        byte_tokenizer().save_pretrained(tmp)
    return target


def maxrss() -> int:
    """This process's kernel high-water RSS (``VmHWM``; see ``compresskit.engine.stream.memory.peak_rss``)."""
    from compresskit.engine.stream.memory import peak_rss

    return peak_rss()


class Peak:
    """Samples RSS (``/proc/self/statm``) and, at each new maximum, the work directory's last step;
    also where the high-water mark last rose (a spike shorter than the sampling interval is seen by the
    kernel's high-water mark, and located to the step during which it rose)."""

    def __init__(self, work: Path | None, every: float = 0.05) -> None:
        from compresskit.engine.stream.memory import current_rss

        self.rss, self.work, self.every = current_rss, work, every
        self.peak, self.where, self._stop = 0, None, threading.Event()
        self.high, self.high_where = maxrss(), None
        threading.Thread(target=self._run, daemon=True).start()

    def _step(self) -> dict | None:
        try:
            return json.loads((self.work / "progress.json").read_text()) if self.work else None
        except (OSError, ValueError):
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            r, h = self.rss(), maxrss()
            if r > self.peak:
                self.peak, self.where = r, self._step() or self.where
            if h > self.high:
                self.high, self.high_where = h, self._step() or self.high_where
            time.sleep(self.every)

    def stop(self) -> None:
        self._stop.set()


def one(spec: dict) -> dict:
    """One prune in this (fresh) process; returns time, memory and I/O facts."""
    import torch

    torch.set_num_threads(THREADS)
    import compresskit
    from compresskit.engine.registry import Registry
    from compresskit.engine.stream.memory import current_rss
    from compresskit.engine.stream.workdir import describe

    import accelerate  # noqa: F401  (imported by the run anyway: part of the runtime, not of the run)
    import transformers.models.llama.modeling_llama  # noqa: F401

    import compresskit.engine.stream.engine  # noqa: F401
    import compresskit.engine.stream.grads  # noqa: F401

    reg = Registry.from_entrypoints()
    model = spec.pop("model")
    if model.startswith("random-llama-"):
        model = str(random_checkpoint(model.removeprefix("random-llama-")))
    if model == "smollm2" and spec.get("max_memory"):
        from compresskit_plugins.adapters.llama.sources import smollm2_dir

        smollm2_dir()
    out = spec.pop("output")
    work = Path(spec["work_dir"]) if spec.get("work_dir") else None
    runtime, runtime_high = current_rss(), maxrss()
    peak = Peak(work)
    t, c = time.perf_counter(), time.process_time()
    result = compresskit.prune(model=model, registry=reg, **spec)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    peak.stop()
    pruned_high = maxrss()
    result.save(out)
    io = {}
    try:
        io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    except OSError:
        pass
    return {"wall_s": wall, "cpu_s": cpu, "runtime_rss": runtime, "peak_rss": peak.peak,
            "peak_hwm": maxrss(), "getrusage_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_hwm_prune": pruned_high, "runtime_hwm": runtime_high,
            "peak_during": describe(peak.where) if peak.where else "before the first step",
            "peak_hwm_rose_during": describe(peak.high_where) if peak.high_where else "before the first step",
            "streaming": result.manifest.get("streaming"), "sparsity": result.report.overall_sparsity,
            "rchar": int(io.get("rchar", 0)), "read_bytes": int(io.get("read_bytes", 0)),
            "checkpoint_bytes": _checkpoint_bytes(model)}


def _checkpoint_bytes(model: str) -> int:
    from compresskit_plugins.adapters.llama.streaming import checkpoint_dir

    return sum(p.stat().st_size for p in checkpoint_dir(model).glob("*.safetensors"))


def _child(spec: dict) -> dict:
    res = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"child failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def masks_differ(a: Path, b: Path) -> tuple[int, int]:
    """(entries whose zero/non-zero state differs, prunable entries) between two saved outputs;
    one tensor of each at a time, so comparing two 4 GB outputs needs two tensors of memory."""
    from safetensors import safe_open

    def where(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys() if ".layers." in k and k.endswith("proj.weight")})
        return out

    wa, wb = where(a), where(b)
    assert wa.keys() == wb.keys()
    diff = total = 0
    for k in sorted(wa):
        with safe_open(str(wa[k]), "pt") as ha, safe_open(str(wb[k]), "pt") as hb:
            ta, tb = ha.get_tensor(k), hb.get_tensor(k)
        diff, total = diff + int(((ta == 0) != (tb == 0)).sum()), total + ta.numel()
    return diff, total


def memory_model(nsamples: int, seqlen: int, s: int) -> list[dict]:
    from compresskit.engine.stream import memory

    rows = []
    for name, cfg in LLAMA2.items():
        z = memory.sizes_from_config(cfg, nsamples, seqlen, s)
        fixed = memory.streamed_fixed(z, 1, gram=False)
        step = max(fixed, key=fixed.get)
        rows.append({"model": name, "weights": z.M * s, "in_memory": memory.in_memory_peak(z, 1, gram=False),
                     "streamed_fixed": fixed[step], "largest_step": step, "block": z.P_b * s,
                     "accumulators": z.P_l * 4, "one_copy": z.N * z.a, "saved_inputs": z.blocks * z.N * z.a,
                     "head": fixed["head"], "nsamples": nsamples, "seqlen": seqlen, "bytes_per_weight": s})
    return rows


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["big", "smollm2", "memory-model"], action="append")
    ap.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    ap.add_argument("--budget", default="1.45GB", help="--max-memory of the big run")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--smollm2-nsamples", type=int, default=16)
    ap.add_argument("--smollm2-budget", default="1.5GB")
    ap.add_argument("--no-in-memory", action="store_true",
                    help="skip the big checkpoint's in-memory run (its masks are compared with the streamed run's)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--generate", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.generate:
        print(random_checkpoint(args.generate))
        return
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return
    parts = args.only or ["memory-model", "big", "smollm2"]
    old = json.loads((RESULTS / "streaming.json").read_text()) if (RESULTS / "streaming.json").is_file() else {}
    data: dict = {**old, "threads": THREADS, "machine": {"cpu": platform.machine(), "cores": os.cpu_count(),
                                     "python": platform.python_version()}}
    common = dict(metric="gblm", calibration="random", device="cpu", progress=False, report_error=False)

    def write() -> None:  # after every part, so that a failing part keeps the others
        (RESULTS / "streaming.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
        (RESULTS / "streaming.md").write_text(table(data))

    from compresskit.cache import cache_dir

    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-streaming-", dir=cache_dir()) as tmp:
        tmp = Path(tmp)
        if "memory-model" in parts:
            data["memory_model"] = {"paper": memory_model(128, 2048, 2), "default": memory_model(32, 256, 2)}
            write()
        if "smollm2" in parts:
            cfg = dict(common, nsamples=args.smollm2_nsamples, seqlen=args.seqlen, calibration="handbook",
                       gradient_options={"recompute": True})
            mem = _child(dict(cfg, model="smollm2", output=str(tmp / "mem")))
            st = _child(dict(cfg, model="smollm2", output=str(tmp / "st"), max_memory=args.smollm2_budget,
                             work_dir=str(tmp / "st-work")))
            diff, total = masks_differ(tmp / "mem", tmp / "st")
            data["smollm2"] = {"in_memory": mem, "streamed": st, "masks_differ": diff, "mask_entries": total,
                               "budget": args.smollm2_budget, "nsamples": args.smollm2_nsamples,
                               "seqlen": args.seqlen}
            write()
        if "big" in parts:
            # generated in a process of its own: this one stays small (its children are measured)
            subprocess.run([sys.executable, __file__, "--generate", args.preset], check=True)
            big = _child(dict(common, model=f"random-llama-{args.preset}", nsamples=args.nsamples,
                              seqlen=args.seqlen, output=str(tmp / "big"), max_memory=args.budget,
                              work_dir=str(tmp / "big-work")))
            data["big"] = {**big, "preset": args.preset, "config": PRESETS[args.preset], "budget": args.budget,
                           "nsamples": args.nsamples, "seqlen": args.seqlen}
            if not args.no_in_memory:
                mem = _child(dict(common, model=f"random-llama-{args.preset}", nsamples=args.nsamples,
                                  seqlen=args.seqlen, output=str(tmp / "big-mem")))
                diff, total = masks_differ(tmp / "big-mem", tmp / "big")
                data["big"]["in_memory"] = {k: mem[k] for k in ("wall_s", "cpu_s", "peak_hwm", "runtime_rss")}
                data["big"].update(masks_differ=diff, mask_entries=total)
    write()
    print(table(data))


def table(data: dict) -> str:
    from compresskit.engine.stream.memory import parse_size

    lines = ["# Streamed pruning: memory, time, bytes read", ""]
    rows = []
    if "big" in data:
        rows.append((f"random LLaMA `{data['big']['preset']}`, streamed", data["big"], data["big"]["budget"]))
        if "in_memory" in data["big"]:
            rows.append((f"random LLaMA `{data['big']['preset']}`, in memory",
                         {**data["big"]["in_memory"], "peak_rss": 0, "checkpoint_bytes": data["big"]["checkpoint_bytes"]},
                         "-"))
    if "smollm2" in data:
        rows += [("SmolLM2-135M, in memory", data["smollm2"]["in_memory"], "-"),
                 ("SmolLM2-135M, streamed", data["smollm2"]["streamed"], data["smollm2"]["budget"])]
    if rows:
        lines += ["<!-- --8<-- [start:measured] -->", "", f"GBLM (l1, alpha 100), 50 % unstructured, no error report, CPU, `torch.set_num_threads({data.get('threads', 2)})`, one "
                  "fresh process per row. Peak RSS is the whole process's high-water mark kept by the kernel (`VmHWM`; "
                  "the save of the output included), including the runtime (Python, torch, transformers: the RSS "
                  "right before the prune call).", "",
                  "| run | checkpoint (GB) | --max-memory | peak RSS (GB) | runtime (GB) | peak - runtime (GB) | "
                  "checkpoint / budget | wall (s) | CPU (s) | checkpoint read (GB, x size) | activations spilled "
                  "(GB) | peak during |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for name, r, budget in rows:
            st = r.get("streaming") or {}
            ratio = f"{r['checkpoint_bytes'] / parse_size(budget):.2f}" if budget != "-" else "-"
            read = (f"{gb(st['checkpoint_bytes_read'])} ({st['checkpoint_bytes_read'] / r['checkpoint_bytes']:.2f}x)"
                    if st else "-")
            spilled = gb(st["activations_spilled"]) if st else "-"
            during = r.get("peak_hwm_rose_during", r["peak_during"]) if st else "-"
            lines.append(f"| {name} | {gb(r['checkpoint_bytes'])} | {budget} | {gb(max(r['peak_rss'], r.get('peak_hwm', r.get('ru_maxrss', 0))))} | "
                         f"{gb(r['runtime_rss'])} | {gb(max(r['peak_rss'], r.get('peak_hwm', r.get('ru_maxrss', 0))) - r['runtime_rss'])} | "
                         f"{ratio} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {read} | {spilled} | {during} |")
        lines.append("")
        for name, r, budget in rows:  # the verdict against the budget, and what the memory model expected
            st = r.get("streaming") or {}
            if not st or budget == "-":
                continue
            peak, limit = max(r["peak_rss"], r.get("peak_hwm", r.get("ru_maxrss", 0))), parse_size(budget)
            step, size = max(st["memory_model"].items(), key=lambda kv: kv[1])
            verdict = ("within it" if peak <= limit else
                       f"**over it by {gb(peak - limit)} GB ({(peak - limit) / limit:.0%})**")
            expected = st["runtime_rss"] + size
            lines += [f"- {name}: peak RSS {gb(peak)} GB against `--max-memory {budget}`: {verdict}. The memory "
                      f"model expected {gb(expected)} GB ({(expected - peak) / peak:+.0%} of the measured peak): "
                      f"the runtime {gb(st['runtime_rss'])} + its largest step, {step}, {gb(size)} (activations "
                      f"within the budget included); measured peak during {r.get('peak_hwm_rose_during', r['peak_during'])}.", ""]
    if "big" in data:
        b = data["big"]
        c = b["config"]
        lines += [f"The `{b['preset']}` checkpoint: {c['num_hidden_layers']} blocks, hidden {c['hidden_size']}, MLP "
                  f"{c['intermediate_size']}, {c['num_attention_heads']} heads ({c['num_key_value_heads']} KV), "
                  f"vocabulary {c['vocab_size']}, float32; calibration {b['nsamples']} x {b['seqlen']} random "
                  "tokens. Each block is read three times (twice for the gradients, once to prune it); the "
                  "embeddings twice (block 0's inputs for each pass), the head once, and the rest is copied into "
                  "the output.", ""]
        if "masks_differ" in b:
            lines += [f"Mask entries that differ between the streamed and the in-memory run of this checkpoint: "
                      f"**{b['masks_differ']}** of {b['mask_entries']:,}.", ""]
    if "smollm2" in data:
        s = data["smollm2"]
        lines += [f"SmolLM2: calibration `handbook`, {s['nsamples']} x {s['seqlen']} tokens; gradients recomputed in "
                  f"both rows. Mask entries that differ between the two outputs: **{s['masks_differ']}** of "
                  f"{s['mask_entries']:,}.", ""]
    if rows:
        lines += ["<!-- --8<-- [end:measured] -->", ""]
    if "memory_model" in data:
        lines += ["## The memory model for LLaMA-2 (GBLM, float16 weights, no error report)", "",
                  "<!-- --8<-- [start:memory-model] -->", "", "Bytes from the formulas of docs/howto/large-models.md (`compresskit.engine.stream.memory`), without the "
                  "runtime. *Streamed, fixed* is the largest step with every activation on disk; *one copy* is "
                  "the hidden states of the calibration set (N x L x d x 2 bytes), of which a step holds two or "
                  "three when they fit the budget; the gradient pass keeps every block's inputs (*saved inputs*), "
                  "on disk beyond the budget.", "",
                  "| model | calibration | weights (GB) | in memory (GB) | streamed, fixed (GB) | largest step | "
                  "one block (GB) | its accumulators (GB) | one copy (GB) | saved inputs (GB) |",
                  "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
        for key, label in (("paper", "128 x 2048"), ("default", "32 x 256")):
            for r in data["memory_model"][key]:
                lines.append(f"| {r['model']} | {label} | {gb(r['weights'])} | {gb(r['in_memory'])} | "
                             f"{gb(r['streamed_fixed'])} | {r['largest_step']} | {gb(r['block'])} | "
                             f"{gb(r['accumulators'])} | {gb(r['one_copy'])} | {gb(r['saved_inputs'])} |")
        lines += ["", "<!-- --8<-- [end:memory-model] -->", ""]
    m = data.get("machine", {})
    lines += [f"Machine: {m.get('cpu')}, {m.get('cores')} cores shared with other jobs, Python {m.get('python')}.",
              "", "Command: `.venv/bin/python bench/streaming.py` (parts: `--only big|smollm2|memory-model`).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
