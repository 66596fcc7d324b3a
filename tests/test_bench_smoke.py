"""Bench scripts that no other test runs still run against today's API (on random:tiny, in seconds),
and write a page that is the rendering of the record beside it."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _run(*argv: str) -> str:
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


def test_gradients_bench_measures_a_configuration_and_renders_its_record(tmp_path):
    row = json.loads(_run("bench/gradients.py", "--model", "random:tiny", "--samples", "1", "--data", "random",
                          "--one", "16", "1").strip().splitlines()[-1])
    assert row["checkpointing"] and row["seqlen"] == 16 and len(row["cpu_s"]) == 1 and row["pruned_weights"] > 0
    render = runpy.run_path(str(ROOT / "bench" / "gradients.py"))["render"]
    page = render({"env": {"machine": "x", "cores": 2, "torch": "t", "python": "p"}, "rows": [row]})
    assert "| 16 | yes |" in page


def test_checks_bench_writes_its_page_from_its_record(tmp_path):
    out = tmp_path / "checks.md"
    _run("bench/checks.py", "--model", "random:tiny", "--nsamples", "2", "--seqlen", "16", "--threads", "1",
         "--out", str(out))
    record = json.loads(out.with_suffix(".json").read_text())
    assert [r["run"] for r in record["rows"]][-1] == "gblm 50% (gradients computed)"
    render = runpy.run_path(str(ROOT / "bench" / "checks.py"))["render"]
    assert out.read_text() == render(record)


def test_vit_bench_runs_every_metric_and_renders_from_its_record():
    import pytest

    pytest.importorskip("timm")
    vit = runpy.run_path(str(ROOT / "bench" / "vit.py"))
    s = vit["Settings"](model="random:tiny", img_size=32, probe_samples=64, nsamples=2, eval_images=8, ablation=False,
                        probe_data="random", calibration="random", eval_data="random")  # nothing to download
    record = json.loads(json.dumps(vit["run"](s), default=str))  # as the bench writes it
    rows = {(r["method"], r["pattern"]): r for r in record["rows"]}
    assert len(rows) == 1 + 4 * 2 and rows["gblm", "50% unstructured"]["gradient_cache"] == "computed"
    assert "| gblm | 2:4 | pruned | 0.500 |" in vit["markdown"](record)


def test_run_bench_reads_the_gradient_cache_state_of_todays_manifest(tmp_path):
    import compresskit

    summary = runpy.run_path(str(ROOT / "bench" / "run.py"))["gradient_summary"]
    res = compresskit.prune(model="random:tiny", metric="gblm", nsamples=2, seqlen=16, calibration="random",
                            progress=False, gradient_options={"cache_dir": str(tmp_path)})
    got = summary(res.manifest["gradients"])
    assert got["cache"] == "computed" and got["seconds"] > 0
    assert summary({"cache": "hit", "seconds": 1.0}) == {"cache": "hit", "seconds": 1.0}  # records before 0.2
    assert summary({}) == {}


def test_best_bench_without_its_anchor_record_says_what_to_run(tmp_path):
    r = subprocess.run([sys.executable, "bench/best.py", "--quick", "--model", "random:tiny", "--out", str(tmp_path)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "no recipes.json in" in r.stderr and "--rerun-anchors" in r.stderr
