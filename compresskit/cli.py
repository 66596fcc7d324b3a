"""The ``compresskit`` command line: a thin layer over :mod:`compresskit.api`.

Defaults come from :class:`compresskit.config.RunConfig`; heavy imports (torch, transformers)
happen inside commands, so ``--help``, ``list``, ``info`` and ``plugins`` stay fast. Plugins add
commands through the ``register_commands`` hook.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from typing import Any

import click

from compresskit._version import __version__
from compresskit.config import RunConfig
from compresskit.errors import CompressKitError
from compresskit.kinds import BY_FIELD, BY_PLURAL, KINDS

DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}
SCOPES = (*BY_FIELD, "gradient")
_REGISTRY: list[Any] = []


def registry():
    """The process's plugin registry (built once, on first use)."""
    if not _REGISTRY:
        from compresskit.registry import Registry

        _REGISTRY.append(Registry.from_entrypoints())
    return _REGISTRY[0]


def parse_options(items: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``-o metric.alpha=0`` -> {"metric": {"alpha": "0"}, ...} for every scope."""
    out: dict[str, dict[str, str]] = {s: {} for s in SCOPES}
    for item in items:
        key, sep, value = item.partition("=")
        scope, dot, name = key.partition(".")
        if not sep or not dot or scope not in out or not name:
            raise click.BadParameter(
                f"{item!r}: expected SCOPE.KEY=VALUE with SCOPE one of {', '.join(SCOPES)} (e.g. -o metric.alpha=100); "
                "see `compresskit info metric NAME` for the keys", param_hint="-o/--option")
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
@click.option("--adapter", default=DEFAULTS["adapter"], show_default=True, help="Model family (see `compresskit list adapters`).")
@click.option("--model", default=None, help="Model source: hub id, local dir, random:tiny, or packaged name. Default: the adapter's.")
@click.option("--metric", default=DEFAULTS["metric"], show_default=True, help="Scoring metric (see `compresskit list metrics`).")
@click.option("--pattern", default=DEFAULTS["pattern"], show_default=True, help="unstructured, or N:M shorthand like 2:4 / 4:8 (n = pruned per group of m).")
@click.option("--sparsity", type=float, default=None, help="Fraction of weights to prune [default: 0.5; N:M implies its own].")
@click.option("--sparsity-map", "sparsity_map", type=click.Path(dir_okay=False), default=None, help="JSON {layer glob: sparsity} of per-layer targets (layer ids: <block>.<name>, e.g. '3.mlp.*').")
@click.option("--allocation", default=DEFAULTS["allocation"], show_default=True, help="How the target is spread over layers (see `compresskit list allocations`).")
@click.option("--update", default=DEFAULTS["update"], show_default=True, help="Weight update after masking (see `compresskit list solvers`): none, obs (SparseGPT's reconstruction).")
@click.option("--nsamples", type=int, default=DEFAULTS["nsamples"], show_default=True, help="Calibration samples.")
@click.option("--seqlen", type=int, default=DEFAULTS["seqlen"], show_default=True, help="Tokens per calibration sample and per evaluation window.")
@click.option("--paper", is_flag=True, help="The paper's settings: 128 samples x 2048 tokens, evaluation on every window (slow on CPU).")
@click.option("--seed", type=int, default=DEFAULTS["seed"], show_default=True, help="Seed of the calibration sampler.")
@click.option("--calibration", default=None, help="Calibration data: corpus name, local file, hf:name:split, image folder, or 'random'.")
@click.option("--device", default=DEFAULTS["device"], show_default=True, help="auto (CUDA if present), cpu, cuda:1, ...")
@click.option("--propagate", type=click.Choice(["pruned", "dense"]), default=DEFAULTS["propagate"], show_default=True, help="Next block's inputs from the pruned (LLM reference) or dense block.")
@click.option("--error-report/--no-error-report", default=DEFAULTS["report_error"], show_default=True, help="Per-layer reconstruction error (costs one Gram matrix per layer).")
@click.option("--eval", "evaluate", is_flag=True, help="Evaluate the dense and the pruned model and record both.")
@click.option("--eval-data", default=None, help="Evaluation data (default: the adapter's).")
@click.option("--eval-windows", type=int, default=None, help="Cap on evaluation windows/batches [default: the adapter's CPU-sized cap, 64 windows for llama; 0 = all].")
@click.option("--recompute-gradients", is_flag=True, help="Ignore cached gradient statistics.")
@click.option("--gradients", "gradient_file", default=None, type=click.Path(exists=True, dir_okay=False), help="Import a GBLM reference gradient file (.pth).")
@click.option("-o", "--option", "options", multiple=True, metavar="SCOPE.KEY=VALUE", help=f"Plugin option, e.g. -o metric.alpha=100; scopes {', '.join(SCOPES)}. Repeatable.")
@click.option("--output", type=click.Path(file_okay=False), default=None, help="Directory for the pruned model and compresskit.json.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output that is a compresskit output.")
@click.option("--max-memory", default=None, metavar="SIZE", help="Stream the model block by block within SIZE of memory (e.g. 1.3GB, 800MiB); automatic when a local checkpoint does not fit.")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None, help="Keep a streamed run's progress here (default: under the cache; deleted once the output is saved).")
@click.option("--resume", is_flag=True, help="Continue a streamed run from its work directory's last finished block.")
@click.option("--dry-run", is_flag=True, help="Resolve plugins and check every layer against the pattern, then stop.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def prune(**kw: Any) -> None:
    """Prune a model layer by layer and save it with a manifest."""
    from compresskit import api
    from compresskit.output import check_target
    from compresskit.targets import load_sparsity_map

    opts = parse_options(kw["options"])
    if kw["paper"]:
        kw["nsamples"], kw["seqlen"] = 128, 2048
        kw["eval_windows"] = 0 if kw["eval_windows"] is None else kw["eval_windows"]
    if kw["output"]:
        check_target(kw["output"], kw["overwrite"])  # fail before any work
    grad_opts: dict[str, Any] = dict(opts["gradient"])
    if kw["recompute_gradients"]:
        grad_opts["recompute"] = True
    if kw["gradient_file"]:
        grad_opts["import_path"] = kw["gradient_file"]
    config = RunConfig(
        adapter=kw["adapter"], model=kw["model"], metric=kw["metric"], pattern=kw["pattern"], sparsity=kw["sparsity"],
        sparsity_map=load_sparsity_map(kw["sparsity_map"]) if kw["sparsity_map"] else None,
        allocation=kw["allocation"], update=kw["update"], nsamples=kw["nsamples"], seqlen=kw["seqlen"],
        seed=kw["seed"], calibration=kw["calibration"], device=kw["device"], propagate=kw["propagate"],
        report_error=kw["error_report"], evaluate=kw["evaluate"], eval_data=kw["eval_data"],
        eval_limit=kw["eval_windows"], gradient_options=grad_opts, progress=not kw["no_progress"],
        max_memory=kw["max_memory"], work_dir=kw["work_dir"], resume=kw["resume"],
        **{f"{field}_options": opts[field] for field in BY_FIELD},
    )
    if kw["dry_run"]:
        info = api.check(config, registry=registry())
        click.echo(f"ok: {info['layers']} layers in {info['blocks']} blocks accept {info['pattern']} at sparsity "
                   f"{info['sparsity']:g}")
        return
    result = api.prune(config, registry=registry())
    _print_summary(result)
    if kw["output"]:
        result.save(kw["output"], overwrite=kw["overwrite"])
        click.echo(f"saved to {kw['output']} (manifest: compresskit.json)")
    else:
        click.echo("note: no --output given; the pruned model was not saved", err=True)


def _print_summary(result) -> None:
    rep = result.report
    by_block: dict[int, list] = {}
    for r in rep.layers:
        by_block.setdefault(r.block, []).append(r)
    click.echo(f"{'block':>5}  {'layers':>6}  {'target':>6}  {'sparsity':>8}  {'mean rel. error':>15}  {'seconds':>7}")
    for b, rows in by_block.items():
        errs = [r.error for r in rows if r.error is not None]
        err = f"{sum(errs) / len(errs):.4g}" if errs else "-"
        w = sum(r.shape[0] * r.shape[1] for r in rows)
        sp = sum(r.sparsity * r.shape[0] * r.shape[1] for r in rows) / w
        tg = sum(r.target * r.shape[0] * r.shape[1] for r in rows) / w
        secs = rep.block_seconds[b] if b < len(rep.block_seconds) else sum(r.seconds for r in rows)
        click.echo(f"{b:>5}  {len(rows):>6}  {tg:>6.3f}  {sp:>8.4f}  {err:>15}  {secs:>7.2f}")
    click.echo(f"overall sparsity {rep.overall_sparsity:.4f} (target {rep.overall_target:.4f}) in {rep.seconds:.1f}s")
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
@click.option("--seqlen", type=int, default=DEFAULTS["seqlen"], show_default=True, help="Window length in tokens (LLMs).")
@click.option("--windows", type=int, default=None, help="Cap on evaluation windows/batches [default: the adapter's cap; 0 = all].")
@click.option("--device", default=DEFAULTS["device"], show_default=True, help="auto (CUDA if present), cpu, cuda:1, ...")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def eval_cmd(model: str, adapter: str | None, data: str | None, seqlen: int, windows: int | None, device: str,
             as_json: bool, no_progress: bool) -> None:
    """Evaluate a dense model or a pruned output directory (perplexity or accuracy)."""
    from compresskit import api

    res = api.evaluate(model, adapter=adapter, data=data, seqlen=seqlen, limit=windows, device=device,
                       progress=not no_progress, registry=registry())
    if as_json:
        click.echo(json.dumps(res, default=str))
    else:
        click.echo(f"{model}: {_headline(res)}")


@cli.command("list")
@click.argument("kind", required=False, type=click.Choice([*BY_PLURAL, "assets"]))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(kind: str | None, as_json: bool) -> None:
    """List registered plugins of every kind (metrics, patterns, adapters, solvers, allocations) and assets."""
    reg = registry()
    kinds = [kind] if kind else [*BY_PLURAL, "assets"]
    data = {}
    for k in kinds:
        if k == "assets":
            from compresskit.data import assets

            data[k] = [{"name": a.name, "kind": a.kind, "family": a.family, "summary": a.summary, "license": a.license}
                       for a in assets(registry=reg)]
        else:
            data[k] = [{"name": e.name, "aliases": list(e.aliases), "summary": e.cls.summary, "origin": str(e.origin)}
                       for e in reg.entries(BY_PLURAL[k].name)]
    if as_json:
        click.echo(json.dumps(data if kind is None else data[kind], indent=2))
        return
    for k, rows in data.items():
        if kind is None:
            click.echo(f"{k}:")
        for r in rows:
            alias = f" (aliases: {', '.join(r['aliases'])})" if r.get("aliases") else ""
            where = f"[{r['origin']}]" if "origin" in r else f"[{r['kind']}, {r['family']}]"
            click.echo(f"  {r['name']}{alias} - {r['summary']} {where}")
    _warn_failures(reg)


def _warn_failures(reg) -> None:
    for f in reg.failures:
        click.echo(f"warning: {f.message()}", err=True)


@cli.command()
@click.argument("kind", type=click.Choice(list(KINDS)))
@click.argument("name")
def info(kind: str, name: str) -> None:
    """Show a plugin's description and its options (types, defaults, help)."""
    import inspect

    from compresskit.options import describe

    entry = registry().get(kind, name)
    click.echo(f"{kind} {entry.name} [{entry.origin}]")
    click.echo(inspect.cleandoc(entry.cls.__doc__ or entry.cls.summary).replace("``", "`"))
    rows = describe(entry.cls.Options)
    click.echo("\noptions:" if rows else "\noptions: none")
    for r in rows:
        choices = f" {{{'|'.join(map(str, r.choices))}}}" if r.choices else ""
        click.echo(f"  {KINDS[kind].field}.{r.name} ({r.type}{choices}, default {r.default!r}): {r.help}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """Installed plugins, their distributions, versions and hooks, and any that failed to load."""
    reg = registry()
    rows = reg.plugins()
    if as_json:
        click.echo(json.dumps({"plugins": rows, "failed": [dataclasses.asdict(f) for f in reg.failures]}, indent=2))
        return
    width = max([len(r["name"]) for r in rows] + [6]) + 2
    dists = [f"{r['distribution']} {r['version']}" if r["distribution"] else "(not packaged)" for r in rows]
    dwidth = max([len(d) for d in dists] + [12]) + 2
    for r, dist in zip(rows, dists):
        click.echo(f"{r['name']:<{width}}{dist:<{dwidth}}{', '.join(r['hooks'])}")
    for f in reg.failures:
        click.echo(f"{'FAILED' if f.severity == 'error' else 'WARNING'}: {f.message()}")


def main() -> None:
    """Console-script entry point: plugin commands, clear errors, exit 130 on Ctrl-C."""
    try:
        reg = registry()
        reg.pm.hook.register_commands(cli=cli)
        cli.main(prog_name="compresskit", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except CompressKitError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
