"""The command group, its ``-p`` pre-parse and the console-script entry point (:func:`main`).

The commands live in their own modules (``prune``, ``outputs``, ``catalog``, ``commands``) and are
added here; plugins add more through the ``register_commands`` hook.
"""

from __future__ import annotations

import logging
import sys

import click

from compresskit._version import __version__
from compresskit.cli import catalog, commands, outputs
from compresskit.cli.common import registry, use_plugins
from compresskit.cli.prune import prune
from compresskit.errors import CompressKitError


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
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose == 0:  # still show the few lines a user must see (cache reuse, retries)
        logging.getLogger("compresskit").setLevel(logging.INFO)
    ctx = click.get_current_context()
    if ctx.invoked_subcommand not in (None, "plugins"):  # `plugins` lists the failure and exits 1 itself
        registry().check_explicit()  # a plugin the user named and that failed: stop before any work


for _command in (prune, *outputs.COMMANDS, *catalog.COMMANDS, *commands.COMMANDS):
    cli.add_command(_command)


def main() -> None:
    """Console-script entry point: plugin commands, clear errors, exit 130 on Ctrl-C."""
    from compresskit.cli import diagnose
    from compresskit.output import Terminated, signals_as_exceptions

    reg = None
    try:
        use_plugins(plugin_args(sys.argv[1:]))  # before the registry exists: -p modules may add commands
        reg = registry()
        reg.add_commands(cli)
        # SIGTERM/SIGHUP anywhere in a command unwind like Ctrl-C: every temporary file and
        # directory (gradient cache, work directory, output) is removed on the way out
        with signals_as_exceptions():
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
