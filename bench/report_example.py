"""The example summary shown in docs/howto/report.md, produced by running the command it shows.

    .venv/bin/python bench/report_example.py     # seconds: random:tiny, no download

Runs ``compresskit prune`` (GBLM at 50 % on ``random:tiny``, 4 calibration samples of 32 tokens,
``--eval`` on 4 windows) and writes the command and what it printed to
``bench/results/report-example.txt``, which the docs page includes as it is.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "report-example.txt"
ARGS = ["prune", "--adapter", "llama", "--model", "random:tiny", "--metric", "gblm", "--sparsity", "0.5",
        "--nsamples", "4", "--seqlen", "32", "--eval", "--eval-windows", "4", "--no-progress"]


def main() -> int:
    exe = Path(sys.executable).with_name("compresskit")
    res = subprocess.run([str(exe) if exe.exists() else "compresskit", *ARGS], capture_output=True, text=True,
                         cwd=ROOT)
    if res.returncode != 0:
        print(res.stdout + res.stderr, file=sys.stderr)
        return res.returncode
    OUT.write_text(f"$ compresskit {' '.join(ARGS)}\n{res.stdout}")
    print(OUT.read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
