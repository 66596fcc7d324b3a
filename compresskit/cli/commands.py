"""Sub-commands beside ``prune``: ``recipe`` (a run's settings as TOML) and ``new-plugin`` (a plugin
package from a template). :mod:`compresskit.cli` adds :data:`COMMANDS` to its group; the work is
done in :mod:`compresskit.cli.recipe` and :mod:`compresskit.cli.scaffold`. The group's ``prune`` command
comes through click's context (the root command).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from compresskit.cli.common import registry
from compresskit.errors import CompressKitError
from compresskit.engine.kinds import KINDS

def _prune_command(ctx: click.Context) -> click.Command:
    root = ctx.find_root()
    command = root.command.get_command(root, "prune") if isinstance(root.command, click.Group) else None
    if command is None:
        raise CompressKitError("`compresskit recipe` needs the compresskit command group (its prune command)")
    return command


@click.command("recipe")
@click.argument("output", type=click.Path(exists=True))
def recipe_cmd(output: str) -> None:
    """Print the recipe (TOML) of a finished run from OUTPUT/compresskit.json; `prune --recipe` reruns it.

    \b
    compresskit recipe out/ > run.toml
    compresskit prune --recipe <(compresskit recipe out/) --output out2/   # the same masks again
    """
    from compresskit.cli import recipe
    from compresskit.output import MANIFEST, read_manifest

    path = Path(output)
    if path.is_file():
        try:
            manifest = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CompressKitError(f"{path} is not a JSON manifest ({exc}); give an output directory") from None
    else:
        manifest = read_manifest(path)
        if manifest is None:
            raise CompressKitError(f"{path} has no {MANIFEST}: it is not a finished compresskit output; give the "
                                   "--output directory of a run")
    click.echo(recipe.from_manifest(manifest, _prune_command(click.get_current_context()), str(output)), nl=False)


@click.command("new-plugin")
@click.argument("name")
@click.option("--kind", type=click.Choice(list(KINDS)), required=True, help="The interface the plugin implements.")
@click.option("--output", "directory", type=click.Path(file_okay=False), default=None,
              help="Directory to create [default: ./compresskit-NAME].")
def new_plugin_cmd(name: str, kind: str, directory: str | None) -> None:
    """Write a ready plugin package: pyproject (entry point), the class with its Options, a conformance test.

    \b
    compresskit new-plugin my_metric --kind metric
    cd compresskit-my-metric && pip install -e . && pytest
    """
    from compresskit.cli import scaffold

    target = scaffold.write(name, kind, directory, registry=registry())
    click.echo(f"wrote {target}/ ({kind} {scaffold.plugin_name(name)!r}):")
    for f in sorted(p for p in target.rglob("*") if p.is_file()):
        click.echo(f"  {f.relative_to(target)}")
    click.echo(f"next: pip install -e {target} && pytest {target}/tests   (see {target}/README.md)")


COMMANDS = (recipe_cmd, new_plugin_cmd)
