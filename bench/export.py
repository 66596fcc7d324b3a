"""Deployable output benchmark: file size of dense vs compressed-tensors exports, and the speed of
the pruned linear layers with the sparse kernels torch has.

    flock /tmp/compresskit-heavy.lock .venv/bin/python bench/export.py     # SmolLM2 (minutes)
    .venv/bin/python bench/export.py --model random:tiny --out /tmp/b      # smoke run, seconds

1. Sizes: prunes the model with wanda (default calibration: 32 x 256 handbook tokens) at 50 %
   unstructured, 2:4, 4:8 and 70 % unstructured; saves the dense output (float32, as pruned) and
   exports it with ``compresskit_plugins.adapters.llama.export`` to compressed-tensors, and both in bfloat16; sums the
   safetensors bytes. Every export is verified bit for bit by the export itself.
2. CPU speed: the middle block's q (out x in = 576x576), k (192x576), gate (1536x576) and down
   (576x1536) weights of each pruned model, ``y = x @ W.T`` for 1, 256 and 2048 tokens: dense
   ``F.linear`` against ``torch.sparse`` CSR and COO matmuls, and ``to_sparse_semi_structured``
   (2:4) where torch has a CPU path. Median process CPU time of repeated calls, one thread.
3. CUDA 2:4 (only with a GPU): float16 dense vs ``to_sparse_semi_structured`` on the same shapes.

Writes ``bench/results/export.md`` (included by the docs) and ``export.json``; prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import compresskit
from compresskit_plugins.adapters.llama.export import export, shard_files

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402 - the bench folder's shared helper

PATTERNS = {"50% unstructured": ("unstructured", {}, 0.5), "2:4": ("nm", {"n": 2, "m": 4}, None),
            "4:8": ("nm", {"n": 4, "m": 8}, None), "70% unstructured": ("unstructured", {}, 0.7)}
SPEED_PATTERNS = ("50% unstructured", "2:4", "70% unstructured")
LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj")
TOKENS = (1, 256, 2048)
MB = 1e6


def mb(directory: Path) -> float:
    return sum(f.stat().st_size for f in shard_files(directory)) / MB


def sizes(model: str, root: Path) -> tuple[list[dict], dict[str, dict[str, torch.Tensor]]]:
    rows, weights = [], {}
    for label, (pattern, popts, sparsity) in PATTERNS.items():
        t0 = time.process_time()
        res = compresskit.prune(adapter="llama", model=model, metric="wanda", pattern=pattern, pattern_options=popts,
                                sparsity=sparsity, device="cpu", report_error=False, progress=False)
        prune_cpu = time.process_time() - t0
        calibration = res.manifest["calibration"]
        blocks = res.model.model.layers
        block = blocks[len(blocks) // 2]
        weights[label] = {n: block.get_submodule(n).weight.detach().clone() for n in LAYERS}
        d = root / label.replace("%", "").replace(" ", "-").replace(":", "-")
        res.save(d / "dense")
        del res
        t0 = time.process_time()
        ct = export(d / "dense", d / "ct", format="compressed-tensors", progress=False)
        export_cpu = time.process_time() - t0
        export(d / "dense", d / "dense-bf16", format="dense", dtype="bfloat16", progress=False)
        export(d / "dense", d / "ct-bf16", format="compressed-tensors", dtype="bfloat16", progress=False)
        info = json.loads((d / "ct" / "compresskit.json").read_text())["export"]
        rows.append({
            "pattern": label, "format": ct.sparsity_format, "structure": ct.structure, "layers": ct.layers,
            "sparsity": info["global_sparsity"], "dense_fp32_mb": mb(d / "dense"), "ct_fp32_mb": mb(d / "ct"),
            "dense_bf16_mb": mb(d / "dense-bf16"), "ct_bf16_mb": mb(d / "ct-bf16"),
            "prune_cpu_s": prune_cpu, "export_cpu_s": export_cpu, "calibration": calibration,
        })
        print(f"sizes: {label} done", flush=True)
    return rows, weights


def cpu_time(fn, repeats: int) -> float:
    """Median process CPU seconds of one call (each sample times enough calls to last >= 20 ms)."""
    fn()
    t0 = time.process_time()
    fn()
    once = max(time.process_time() - t0, 1e-6)
    n = max(1, int(0.02 / once))
    samples = []
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        samples.append((time.process_time() - t0) / n)
    return statistics.median(samples)


def cpu_speed(weights: dict[str, dict[str, torch.Tensor]], repeats: int) -> tuple[list[dict], str]:
    torch.set_num_threads(1)
    rows = []
    try:
        from torch.sparse import to_sparse_semi_structured

        to_sparse_semi_structured(weights["2:4"][LAYERS[0]])
        semi = "available"
    except Exception as exc:  # torch: "Only CUDA tensors are currently supported"
        semi = f"not available: {type(exc).__name__}: {str(exc).splitlines()[0].rstrip('.')}"
    gen = torch.Generator().manual_seed(0)
    for layer in LAYERS:
        for tokens in TOKENS:
            w0 = weights[SPEED_PATTERNS[0]][layer]
            x = torch.randn(tokens, w0.shape[1], generator=gen)
            row = {"layer": layer, "shape": list(w0.shape), "tokens": tokens,
                   "dense_ms": cpu_time(lambda: F.linear(x, w0), repeats) * 1e3}
            for label in SPEED_PATTERNS:
                w = weights[label][layer]
                ref = F.linear(x, w)
                for kind, sp in (("csr", w.to_sparse_csr()), ("coo", w.to_sparse().coalesce())):
                    y = torch.sparse.mm(sp, x.t()).t()
                    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4), (layer, tokens, label, kind)
                    row[f"{kind} {label}_ms"] = cpu_time(lambda: torch.sparse.mm(sp, x.t()).t(), repeats) * 1e3
            rows.append(row)
            print(f"cpu speed: {layer} x {tokens} tokens done", flush=True)
    return rows, semi


def cuda_speed(weights: dict[str, dict[str, torch.Tensor]], repeats: int) -> list[dict] | str:
    if not torch.cuda.is_available():
        return "not measured: no GPU"
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for layer in LAYERS:
        w = weights["2:4"][layer].to("cuda", torch.float16)
        for tokens in TOKENS:
            x = torch.randn(tokens, w.shape[1], device="cuda", dtype=torch.float16)
            row = {"layer": layer, "shape": list(w.shape), "tokens": tokens, "device": torch.cuda.get_device_name()}
            try:
                ws = to_sparse_semi_structured(w)
                assert torch.allclose(F.linear(x, ws), F.linear(x, w), rtol=1e-2, atol=1e-2)
                row.update(dense_ms=gpu_time(lambda: F.linear(x, w), repeats),
                           semi_ms=gpu_time(lambda: F.linear(x, ws), repeats))
            except Exception as exc:  # shape limits of the semi-structured kernels
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            rows.append(row)
    return rows


def gpu_time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(20):
            fn()
        b.record()
        torch.cuda.synchronize()
        samples.append(a.elapsed_time(b) / 20)
    return statistics.median(samples)


def ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def markdown(env: dict, size_rows: list[dict], speed_rows: list[dict], semi: str, cuda) -> str:
    out = [
        f"**Settings.** Model `{env['model']}`, pruned with wanda (default calibration: {env['calibration']}) "
        f"on the CPU; compressed-tensors {env['compressed_tensors']}, torch {env['torch']}. Machine: "
        f"{env['cpu']}, {env['cores']} cores shared with other jobs (load average {env['load']:.1f}). "
        f"Command: `{env['command']}`.",
        "",
        "File size: the safetensors files of each output directory (MB = 10^6 bytes). The dense output is "
        "float32, as pruned; bf16 columns are the same output exported with `--dtype bfloat16`. "
        "Ratio = exported / dense of the same dtype.",
        "",
        "| pattern | format | layers | sparsity | dense fp32 MB | compressed fp32 MB | ratio | dense bf16 MB "
        "| compressed bf16 MB | ratio | export CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in size_rows:
        out.append(f"| {r['pattern']} | `{r['format']}` ({r['structure']}) | {r['layers']} | {r['sparsity']:.3f} "
                   f"| {r['dense_fp32_mb']:.1f} | {r['ct_fp32_mb']:.1f} | {r['ct_fp32_mb'] / r['dense_fp32_mb']:.2f} "
                   f"| {r['dense_bf16_mb']:.1f} | {r['ct_bf16_mb']:.1f} | {r['ct_bf16_mb'] / r['dense_bf16_mb']:.2f} "
                   f"| {r['export_cpu_s']:.1f} |")
    out += [
        "",
        "CPU speed of the pruned linear layers (middle block's weights, `y = x @ W.T`, float32, one thread): "
        "median process CPU time of one call in ms, and in brackets dense time / sparse time "
        "(**below 1 means slower than dense**). CSR and COO: `torch.sparse.mm(W_sparse, x.T).T` on the pruned "
        "weight, transposes included.",
        "",
        "| layer | out x in | tokens | dense ms | " + " | ".join(f"{k} {p}" for k in ("CSR", "COO") for p in SPEED_PATTERNS)
        + " |",
        "|---|---|---|---|" + "---|" * (2 * len(SPEED_PATTERNS)),
    ]
    for r in speed_rows:
        cells = [f"{ms(r[f'{k} {p}_ms'])} ({r['dense_ms'] / r[f'{k} {p}_ms']:.2g}x)"
                 for k in ("csr", "coo") for p in SPEED_PATTERNS]
        out.append(f"| {r['layer'].split('.')[-1]} | {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | "
                   f"{ms(r['dense_ms'])} | " + " | ".join(cells) + " |")
    out += ["", f"`torch.sparse.to_sparse_semi_structured` (2:4) on the CPU: {semi}.", ""]
    if isinstance(cuda, str):
        out.append(f"CUDA 2:4 (`to_sparse_semi_structured`, float16): {cuda}.")
    else:
        out += ["CUDA 2:4 (float16, median of 20-call batches): dense vs `to_sparse_semi_structured` `F.linear`.", "",
                "| layer | out x in | tokens | dense ms | 2:4 ms | dense / 2:4 |", "|---|---|---|---|---|---|"]
        for r in cuda:
            if "error" in r:
                out.append(f"| {r['layer'].split('.')[-1]} | {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | - | "
                           f"{r['error']} | - |")
            else:
                out.append(f"| {r['layer'].split('.')[-1]} | {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | "
                           f"{r['dense_ms']:.4f} | {r['semi_ms']:.4f} | {r['dense_ms'] / r['semi_ms']:.2f}x |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--from-json", action="store_true", help="re-render export.md from OUT/export.json, no measuring")
    a = ap.parse_args()
    if a.from_json:
        text = render(json.loads((a.out / "export.json").read_text()))
        (a.out / "export.md").write_text(text)
        print(text)
        return
    torch.set_num_threads(2)
    import compressed_tensors

    with tempfile.TemporaryDirectory(prefix="compresskit-bench-export-") as tmp:
        size_rows, weights = sizes(a.model, Path(tmp))
    speed_rows, semi = cpu_speed(weights, a.repeats)
    cuda = cuda_speed(weights, a.repeats)
    cal = size_rows[0]["calibration"]
    env = {"model": a.model, "calibration": f"{cal['nsamples']} x {cal['seqlen']} tokens of `{cal.get('source')}`, seed 0",
           "compressed_tensors": compressed_tensors.__version__, "torch": torch.__version__,
           "cpu": cpu_name(), "cores": os.cpu_count(), "load": os.getloadavg()[0], "python": platform.python_version(),
           "command": "python bench/export.py" + (f" --model {a.model}" if a.model != "smollm2" else "")}
    record = json.dumps({"env": env, "sizes": size_rows, "cpu_speed": speed_rows, "semi_structured_cpu": semi,
                         "cuda": cuda}, indent=2) + "\n"
    text = render(json.loads(record))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "export.md").write_text(text)
    (a.out / "export.json").write_text(record)
    print(text)


def render(record: dict) -> str:
    """export.md from export.json."""
    return markdown(record["env"], record["sizes"], record["cpu_speed"], record["semi_structured_cpu"], record["cuda"])


if __name__ == "__main__":
    main()
