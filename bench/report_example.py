"""The examples in docs/howto/report.md and docs/howto/recipes.md, produced by running their commands.

    .venv/bin/python bench/report_example.py     # seconds: random:tiny, no download

Runs ``compresskit prune`` (GBLM at 50 % on ``random:tiny``, 4 calibration samples of 32 tokens,
``--eval`` on 4 windows, saved as ``example`` in a temporary directory) and writes the command and
what it printed to ``bench/results/report-example.txt``, then ``compresskit recipe example`` to
``bench/results/recipe-example.toml``; the docs pages include both as they are.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "report-example.txt"
RECIPE = ROOT / "bench" / "results" / "recipe-example.toml"
ARGS = ["prune", "--adapter", "llama", "--model", "random:tiny", "--metric", "gblm", "--sparsity", "0.5",
        "--nsamples", "4", "--seqlen", "32", "--eval", "--eval-windows", "4", "--no-progress", "--output", "example"]


def main() -> int:
    exe = Path(sys.executable).with_name("compresskit")
    cmd = str(exe) if exe.exists() else "compresskit"
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run([cmd, *ARGS], capture_output=True, text=True, cwd=tmp)
        rec = subprocess.run([cmd, "recipe", "example"], capture_output=True, text=True, cwd=tmp)
    for r in (res, rec):
        if r.returncode != 0:
            print(r.stdout + r.stderr, file=sys.stderr)
            return r.returncode
    OUT.write_text(f"$ compresskit {' '.join(ARGS)}\n{res.stdout}")
    RECIPE.write_text(rec.stdout)
    print(OUT.read_text() + RECIPE.read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
