"""Commands that describe what is installed: ``list``, ``info``, ``plugins``."""

from __future__ import annotations

import dataclasses
import json

import click

from compresskit.cli.common import registry
from compresskit.engine.kinds import BY_PLURAL, KINDS


@click.command("list")
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


@click.command()
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


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """Installed plugins, their distributions, versions and hooks, and any that failed to load."""
    reg = registry()
    rows = reg.plugins()
    if as_json:
        click.echo(json.dumps({"plugins": rows, "failed": [dataclasses.asdict(f) for f in reg.failures]}, indent=2))
        if reg.explicit_failures():
            raise SystemExit(1)
        return
    width = max([len(r["name"]) for r in rows] + [6]) + 2
    dists = [f"{r['distribution']} {r['version']}" if r["distribution"] else "(not packaged)" for r in rows]
    dwidth = max([len(d) for d in dists] + [12]) + 2
    for r, dist in zip(rows, dists):
        click.echo(f"{r['name']:<{width}}{dist:<{dwidth}}{', '.join(r['hooks'])}")
    for f in reg.failures:
        click.echo(f"{'FAILED' if f.severity == 'error' else 'WARNING'}: {f.message()}")
    if reg.explicit_failures():  # a plugin named with -p / $COMPRESSKIT_PLUGINS failed: not a clean bill
        raise SystemExit(1)


COMMANDS = (list_cmd, info, plugins)
