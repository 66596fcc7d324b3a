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
@click.option("--recompute-gradients", is_flag=True, help="Ignore cached gradient statistics.")
@click.option("--gradients", "gradient_file", default=None, type=click.Path(exists=True, dir_okay=False), help="Import a GBLM reference gradient file (.pth).")
@click.option("-o", "--option", "options", multiple=True, metavar="SCOPE.KEY=VALUE", help="Plugin option, e.g. -o metric.alpha=100; scopes metric, pattern, adapter, gradient (e.g. -o gradient.checkpointing=true). Repeatable.")
@click.option("--output", type=click.Path(file_okay=False), default=None, help="Directory for the pruned model and compresskit.json.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --output.")
@click.option("--save-format", type=click.Choice(["dense", "compressed-tensors"]), default="dense", show_default=True, help="How --output stores the weights: dense safetensors, or compressed-tensors sparse (see `compresskit export`).")
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
    if kw["save_format"] != "dense":
        from compresskit.export import preflight

        preflight(kw["save_format"], kw["adapter"], kw["output"], kw["overwrite"])
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
        metric_options=opts["metric"], pattern_options={**pattern_opts, **opts["pattern"]},
        adapter_options=opts["adapter"], gradient_options=grad_opts, progress=not kw["no_progress"],
    )
    if kw["dry_run"]:
        _dry_run(config)
        return
    result = api.prune(config)
    _print_summary(result)
    if kw["output"]:
        from compresskit.export import save_result

        save_result(result, kw["output"], kw["save_format"], overwrite=kw["overwrite"], progress=not kw["no_progress"])
        click.echo(f"saved to {kw['output']} ({kw['save_format']}; manifest: compresskit.json)")
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


def _headline(res: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool))


@cli.command("eval")
@click.argument("model")
@click.option("--adapter", default=None, help="Model family; default: from the directory's compresskit.json, else llama.")
@click.option("--data", default=None, help="Evaluation data (default: the adapter's).")
@click.option("--seqlen", type=int, default=256, show_default=True, help="Window length in tokens (LLMs).")
@click.option("--windows", type=int, default=None, help="Cap on evaluation windows/batches [default: the adapter's cap; 0 = all].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(model: str, adapter: str | None, data: str | None, seqlen: int, windows: int | None, as_json: bool) -> None:
    """Evaluate a dense model or a pruned output directory (perplexity or accuracy)."""
    from compresskit.output import read_manifest

    manifest = read_manifest(model) or {}
    name = adapter or manifest.get("config", {}).get("adapter") or "llama"
    reg = _registry()
    entry = reg.get("adapter", name)
    from compresskit.options import build

    ad = entry.cls(build(entry.cls.Options, manifest.get("config", {}).get("adapter_options", {}) if not adapter else {}, "adapter."))
    loaded = ad.load(model)
    from compresskit.api import resolve_eval_limit

    res = ad.evaluate(loaded, data, seqlen, resolve_eval_limit(ad, windows))
    res = {"model": model, "adapter": ad.name, **res}
    if as_json:
        click.echo(json.dumps(res, default=str))
    else:
        click.echo(f"{model}: {_headline(res)}")


@cli.command("export")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["dense", "compressed-tensors"]), default="dense", show_default=True, help="compressed-tensors: sparse-bitmask (unstructured, 4:8, any N:M) or sparse-24-bitmask (2:4), chosen from compresskit.json; dense: plain safetensors (decompresses an export).")
@click.option("--output", type=click.Path(file_okay=False), default=None, help="New directory [default: DIRECTORY-FORMAT beside it].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None, help="Cast the floating weights [default: keep the saved dtype].")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output (only if it is a compresskit output).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def export_cmd(directory: str, fmt: str, output: str | None, dtype: str | None, overwrite: bool, no_progress: bool) -> None:
    """Write a pruned output directory in a deployable format (verified bit for bit).

    \b
    compresskit export out/ --format compressed-tensors --output out-ct/
    compresskit export out-ct/ --format dense --output out-dense/
    """
    from compresskit.export import export

    r = export(directory, output, format=fmt, overwrite=overwrite, dtype=dtype, progress=not no_progress)
    kind = f"{r.format}, {r.sparsity_format} ({r.structure}), {r.layers} layers" if r.sparsity_format else r.format
    click.echo(f"exported {directory} -> {r.path} ({kind}, {r.dtype}): weights {r.source_bytes / 1e6:.2f} MB -> "
               f"{r.output_bytes / 1e6:.2f} MB ({r.output_bytes / r.source_bytes:.1%})")


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
