"""Where GBLM's finished gradient statistics rest, measured: host memory of the gradient pass.

Each row runs in a fresh process: load the model, obtain the gradient statistics
(``compresskit.engine.gradients.obtain``) with the row's groups, then read every layer's
statistics as the runner does. The table reports the peak resident set (VmHWM) above the RSS
after loading, next to the bytes of all float32 sums: in a single process the sums rest in the
cache file, so the peak holds the accumulators of one group (the whole pass when ``groups`` is 1)
besides the pass's activations, and a cache hit holds one layer's. A row with an unwritable cache shows the same pass with the
sums in memory (as every run before they moved to disk). The baseline is taken with the
weights paged in (a model loaded from safetensors is memory-mapped and becomes resident as it is
read).

    .venv/bin/python bench/gradrest.py [--model smollm2] [--samples 4] [--seqlen 128] [--groups 4]

Writes ``bench/results/gradrest.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "gradrest.json"
GB = 1e9


def child(model: str, samples: int, seqlen: int, groups: int, cache: str, recompute: bool) -> dict:
    import torch

    from compresskit.engine import gradients
    from compresskit.engine.registry import Registry
    from compresskit.engine.stream.memory import current_rss, peak_rss
    from compresskit.stats import GradNorm

    torch.set_num_threads(2)
    adapter = Registry.from_entrypoints().get("adapter", "llama").cls()
    loaded = adapter.load(model)
    batches = adapter.calibration_batches(loaded, samples, seqlen, 0, "random")
    for t in loaded.model.state_dict().values():  # page in memory-mapped weights: the baseline holds them
        t.float().sum()
    loaded_rss, load_peak = current_rss(), peak_rss()
    grads, info = gradients.obtain(adapter, loaded, batches, [GradNorm("l1")], torch.device("cpu"),
                                   {"cache_dir": cache, "groups": groups, "recompute": recompute}, progress=False)
    after_pass = peak_rss()
    total = 0
    for key in grads:  # as the runner reads them, one layer at a time
        total += grads[key]["grad_l1"].numel() * 4
    stat = info["statistics"]["grad_l1"]
    return {"groups": groups, "cache": stat["cache"], "rest": stat.get("rest", "memory"), "sums_gb": total / GB,
            "loaded_rss_gb": loaded_rss / GB, "load_peak_above_load_gb": (load_peak - loaded_rss) / GB,
            "pass_peak_above_load_gb": (after_pass - loaded_rss) / GB,
            "peak_above_load_gb": (peak_rss() - loaded_rss) / GB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--json", default=str(RESULTS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.model, a.samples, a.seqlen, **json.loads(a.child))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        unwritable = "/dev/null/compresskit-cache"  # the cache cannot be written: the sums rest in memory
        for groups, where, recompute in ((1, cache, True), (a.groups, unwritable, True), (a.groups, cache, True),
                                         (a.groups, cache, False)):
            args = json.dumps({"groups": groups, "cache": where, "recompute": recompute})
            out = subprocess.run([sys.executable, __file__, "--model", a.model, "--samples", str(a.samples),
                                  "--seqlen", str(a.seqlen), "--child", args],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
    record = {"model": a.model, "samples": a.samples, "seqlen": a.seqlen, "norm": "l1", "device": "cpu", "rows": rows}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(record, indent=1) + "\n")
    Path(a.json).with_suffix(".md").write_text(render(record))
    print(render(record))


def render(record: dict) -> str:
    lines = [f"Model `{record['model']}`, {record['samples']} x {record['seqlen']} random calibration tokens, GBLM's "
             f"l1 statistic in float32 on the {record['device'].upper()}, each row a fresh process. Peak = VmHWM "
             "above the RSS after loading; 'pass' is the peak by the end of the gradient pass, 'all' after reading "
             "every layer's statistics as the runner does.", "",
             "| groups | cache | sums rest | all sums GB | pass peak above load GB | all peak above load GB |",
             "|---:|---|---|---:|---:|---:|"]
    for r in record["rows"]:
        lines.append(f"| {r['groups']} | {r['cache']} | {r['rest']} | {r['sums_gb']:.2f} | "
                     f"{r['pass_peak_above_load_gb']:.2f} | {r['peak_above_load_gb']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
