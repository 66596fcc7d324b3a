"""``scripts/main-job`` then ``scripts/test``, in that order and again: the main job changes no tracked file.

The job's code path (``bench/main_job.py``: run ``compresskit prune ... --eval``, record its numbers) runs
here on the tiny random LLaMA with two calibration samples; the record goes into the output directory,
and ``git status --porcelain --untracked-files=no`` is what it was before.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAIN_JOB = ROOT / "bench" / "main_job.py"


def _tracked_changes() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_main_job_leaves_every_tracked_file_unchanged(tmp_path):
    before = _tracked_changes()
    out = tmp_path / "main"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(2):  # in order, and again (the second run overwrites the first)
        proc = subprocess.run([sys.executable, str(MAIN_JOB), "--model", "random:tiny", "--nsamples", "2",
                               "--seqlen", "16", "--eval-windows", "2", "--no-progress", "--output", str(out)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert _tracked_changes() == before, "the main job changed a tracked file"
    rec = json.loads((out / "main-job.json").read_text())
    assert rec["model"] and set(rec["perplexity"]) == {"dense", "pruned"}
    assert (out / "main-job.md").read_text() == runpy.run_path(str(MAIN_JOB))["table"](rec)
    assert "--record" in proc.stderr  # says how to make it the committed record


def test_record_without_a_run_names_the_command_that_makes_one(tmp_path, capsys):
    rc = runpy.run_path(str(MAIN_JOB))["main"](["--record", str(tmp_path / "nothing")])
    assert rc == 2
    assert "run scripts/main-job first" in capsys.readouterr().err
