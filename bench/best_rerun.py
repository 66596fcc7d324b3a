"""Rerun ``best.json``'s rows from their command lines: ``best-rerun.json`` and ``best-rerun.md``.

    .venv/bin/python bench/best_rerun.py                      # every setting (hours on 2 cores)
    .venv/bin/python bench/best_rerun.py --settings 70%,2:4   # the ones with targets first
    .venv/bin/python bench/best_rerun.py --settings 2:4 --which anchor --tasks ''   # one run, no zero-shot

For each chosen setting of ``bench/results/best.json``, the best recipe's ``args`` and the best
anchor's ``anchor_args`` are run as a user would: ``compresskit prune ARGS --eval --output DIR``
in a fresh process (one torch thread), and the pruned perplexity it records is compared with the
one in ``best.json`` (acceptance: within 5%). With ``--tasks`` (default: the four tasks above
chance in ``zeroshot.md``) the pruned output is then evaluated zero-shot with ``compresskit eval
DIR --tasks ... --limit N``; the dense model's accuracy is ``zeroshot.json``'s screen (same
tasks, same limit). Rows are kept as they finish (``--resume`` skips those already measured).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402 - the bench folder's shared helper

RESULTS = Path(__file__).parent / "results"
TOLERANCE = 0.05
TASKS = "hellaswag,arc_easy,piqa,openbookqa"
CLI = [sys.executable, "-m", "compresskit"]


def run(cmd: list[str]) -> float:
    """Run ``cmd`` with one torch thread; its wall seconds. Its output goes to our stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr)
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {shlex.join(cmd)}")
    return time.perf_counter() - t


def one(args: str, tasks: str, limit: int, tmp: Path) -> dict:
    """Prune with ``args --eval``, then (with ``tasks``) evaluate the output zero-shot."""
    out = tmp / "out"
    prune_s = run([*CLI, "prune", *shlex.split(args), "--eval", "--output", str(out), "--overwrite",
                   "--no-progress"])
    manifest = json.loads((out / "compresskit.json").read_text())
    ev = manifest["evaluation"]
    row = {"ppl": ev["pruned"]["perplexity"], "dense_ppl": ev["dense"]["perplexity"], "wall_s": prune_s,
           "sparsity": manifest.get("report", {}).get("overall_sparsity")}
    if tasks:
        js = tmp / "zeroshot.json"
        with js.open("w") as fh:
            env = dict(os.environ, OMP_NUM_THREADS="1")
            res = subprocess.run([*CLI, "eval", str(out), "--tasks", tasks, "--limit", str(limit), "--json",
                                  "--no-progress"], env=env, stdout=fh, stderr=sys.stderr)
        if res.returncode != 0:
            raise SystemExit(f"zero-shot evaluation of {args} failed ({res.returncode})")
        row["zeroshot"] = json.loads(js.read_text())
    return row


def accuracies(zs: dict) -> dict[str, float]:
    """``task -> acc`` from ``compresskit eval --json --tasks`` output."""
    return {t: float(v["acc"]) for t, v in zs["tasks"].items()}


def stderr(zs: dict) -> float:
    """Standard error of the mean accuracy over tasks (tasks independent)."""
    errs = [float(v["acc_stderr"]) for v in zs["tasks"].values()]
    return math.sqrt(sum(e * e for e in errs)) / len(errs)


def table(rows: list[dict]) -> str:
    lines = ["| setting | which | recipe | PPL in best.json | PPL rerun | change | within 5% | zero-shot mean acc | prune + eval s | CPU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        accs = accuracies(r["zeroshot"]) if r.get("zeroshot") else {}
        mean = f"{100 * sum(accs.values()) / len(accs):.1f} ± {100 * stderr(r['zeroshot']):.1f}" if accs else "-"
        lines.append(f"| {r['setting']} | {r['which']} | {r['recipe']} | {r['expected']:.2f} | {r['ppl']:.2f} | "
                     f"{r['ppl'] / r['expected'] - 1:+.1%} | {'yes' if r['ok'] else '**no**'} | {mean} | "
                     f"{r['wall_s']:.0f} | {r.get('cpu', '-')} |")
    return "\n".join(lines) + "\n"


def page(data: dict) -> str:
    """``best-rerun.md`` from its record ``best-rerun.json``."""
    rows = data["rows"]
    tasks = sorted({r["tasks"] for r in rows if r.get("tasks")})
    limits = sorted({r["limit"] for r in rows if r.get("tasks")})
    head = ("Each row of `best.json` rerun from its command line (`compresskit prune ARGS --eval`, one torch thread, "
            f"a fresh process): the pruned perplexity against `best.json`'s (tolerance {data['tolerance']:.0%}). ")
    if tasks:
        head += (f"Zero-shot: `compresskit eval OUTPUT --tasks {', '.join(tasks)} --limit {', '.join(map(str, limits))}` "
                 "on the pruned output; mean acc = mean of the tasks' `acc` ± its standard error; the dense "
                 "model's screen is in `zeroshot.md`. ")
    head += ("Seconds: wall time of the prune command, both perplexity evaluations included, on a shared machine. "
             "CPU: the machine's processor where recorded (`-`: not recorded). On another machine floating-point "
             "rounding differs (the dense perplexity, column `dense_ppl` of the record, changes in its sixth digit) "
             "and the iterative methods (ADMM-gradual's mask re-selection, RO's optimiser) carry it further: a "
             "rerun elsewhere reproduces `best.json` within the tolerance, not bit for bit.")
    return head + "\n\n" + table(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default=None, help="comma-separated settings of best.json (default: all)")
    ap.add_argument("--which", choices=["both", "recipe", "anchor"], default="both")
    ap.add_argument("--tasks", default=TASKS, help="zero-shot tasks of the pruned output ('' = none)")
    ap.add_argument("--limit", type=int, default=150, help="documents per zero-shot task (zeroshot.md's screen: 150)")
    ap.add_argument("--resume", action="store_true", help="keep rows already in best-rerun.json")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    out = Path(a.out)
    best = json.loads((RESULTS / "best.json").read_text())
    chosen = set(a.settings.split(",")) if a.settings else {b["setting"] for b in best}
    unknown = chosen - {b["setting"] for b in best}
    if unknown:
        raise SystemExit(f"no setting {sorted(unknown)} in best.json; it has {[b['setting'] for b in best]}")
    path = out / "best-rerun.json"
    rows = json.loads(path.read_text())["rows"] if a.resume and path.exists() else []
    done = {(r["setting"], r["which"], r["args"]) for r in rows}
    for b in best:
        if b["setting"] not in chosen:
            continue
        for which in (("recipe", "anchor") if a.which == "both" else (a.which,)):
            args = b["args"] if which == "recipe" else b["anchor_args"]
            if (b["setting"], which, args) in done:
                continue
            with tempfile.TemporaryDirectory(prefix="best-rerun-") as tmp:
                r = one(args, a.tasks, a.limit, Path(tmp))
            expected = b["ppl"] if which == "recipe" else b["anchor_ppl"]
            if not math.isfinite(r["ppl"]):
                raise SystemExit(f"non-finite perplexity from {args}")
            rows.append({"setting": b["setting"], "which": which, "recipe": b["recipe" if which == "recipe" else "anchor"],
                         "args": args, "expected": expected, **r,
                         "ok": abs(r["ppl"] / expected - 1) <= TOLERANCE, "tasks": a.tasks, "limit": a.limit,
                         "cpu": cpu_name()})  # another machine rounds differently
            out.mkdir(parents=True, exist_ok=True)
            data = {"tolerance": TOLERANCE, "rows": rows}
            path.write_text(json.dumps(data, indent=1) + "\n")
            (out / "best-rerun.md").write_text(page(data))
    print(table(rows))


if __name__ == "__main__":
    main()
