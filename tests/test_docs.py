"""Docs and examples are tested: the example scripts run, and the docs cover the plugin surface."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"prune_llama.py": "overall sparsity 0.5000", "prune_vit.py": "overall sparsity 0.5000",
           "api.py": "random metric: overall sparsity 0.500"}


def _needs(script: str) -> None:
    if script == "prune_vit.py":
        pytest.importorskip("timm", reason="prune_vit.py needs the vit extra (timm)")


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_script_runs(script, capsys, monkeypatch, tmp_path):
    """In-process (the heavy imports are already loaded): seconds each."""
    _needs(script)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script])
    runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    assert SCRIPTS[script] in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_script_runs_as_a_program(script, tmp_path):
    """As a user runs it (a fresh interpreter: ~10 s of imports each on a 2-core machine)."""
    _needs(script)
    res = subprocess.run([sys.executable, str(ROOT / "examples" / script)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert SCRIPTS[script] in res.stdout
