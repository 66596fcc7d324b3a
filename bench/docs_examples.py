"""The example outputs on the docs pages, produced by running the commands they show.

    .venv/bin/python bench/docs_examples.py     # under a minute: random:tiny, no download

In a temporary directory, runs and writes to ``bench/results/``:

* ``report-example.txt``: ``compresskit prune`` (GBLM at 50 % on ``random:tiny``, 4 calibration
  samples of 32 tokens, ``--eval`` on 4 windows, saved as ``example``) — docs/howto/report.md;
* ``recipe-example.toml``: ``compresskit recipe example`` — docs/howto/recipes.md;
* ``zeroshot-example.txt``: ``compresskit prune ... --eval-tasks hellaswag,piqa --eval-limit 5`` and
  ``zeroshot-eval-example.json``: ``compresskit eval example --tasks piqa --limit 20 --json``
  (indented) — docs/howto/zeroshot.md (needs the ``zeroshot`` extra and the packaged task data).

Each text file starts with the command line; the pages include the files as they are.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OUT, RECIPE = RESULTS / "report-example.txt", RESULTS / "recipe-example.toml"
ZEROSHOT, ZEROSHOT_EVAL = RESULTS / "zeroshot-example.txt", RESULTS / "zeroshot-eval-example.json"
ARGS = ["prune", "--adapter", "llama", "--model", "random:tiny", "--metric", "gblm", "--sparsity", "0.5",
        "--nsamples", "4", "--seqlen", "32", "--eval", "--eval-windows", "4", "--no-progress", "--output", "example"]
ZEROSHOT_ARGS = ["prune", "--model", "random:tiny", "--metric", "wanda", "--nsamples", "4", "--seqlen", "16",
                 "--eval-tasks", "hellaswag,piqa", "--eval-limit", "5", "--device", "cpu", "--no-progress"]
ZEROSHOT_EVAL_ARGS = ["eval", "example", "--tasks", "piqa", "--limit", "20", "--device", "cpu", "--no-progress", "--json"]


def _run(args: list[str], cwd: str) -> str:
    exe = Path(sys.executable).with_name("compresskit")
    res = subprocess.run([str(exe) if exe.exists() else "compresskit", *args], capture_output=True, text=True, cwd=cwd)
    if res.returncode != 0:
        raise SystemExit(f"compresskit {' '.join(args)} failed:\n{res.stdout}{res.stderr}")
    return res.stdout


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        OUT.write_text(f"$ compresskit {' '.join(ARGS)}\n{_run(ARGS, tmp)}")
        RECIPE.write_text(_run(["recipe", "example"], tmp))
        ZEROSHOT.write_text(f"$ compresskit {' '.join(ZEROSHOT_ARGS)}\n{_run(ZEROSHOT_ARGS, tmp)}")
        ZEROSHOT_EVAL.write_text(json.dumps(json.loads(_run(ZEROSHOT_EVAL_ARGS, tmp)), indent=1) + "\n")
    for f in (OUT, RECIPE, ZEROSHOT, ZEROSHOT_EVAL):
        print(f"== {f.relative_to(ROOT)}\n{f.read_text()}", end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
