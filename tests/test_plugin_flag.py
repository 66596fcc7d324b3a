"""Plugins without packaging: `-p FILE.py`, `-p module`, `-p no:NAME` and $COMPRESSKIT_PLUGINS."""

from __future__ import annotations

import sys
import textwrap

import pytest
from click.testing import CliRunner

from compresskit import cli as cli_module
from compresskit.cli import cli

TINY = ["--adapter", "llama", "--model", "random:tiny", "--nsamples", "2", "--seqlen", "16", "--no-progress"]

PLUGIN = textwrap.dedent('''
    """A metric kept in a plain file: typed Options with string annotations (from __future__)."""
    from __future__ import annotations

    import dataclasses
    from typing import Literal

    from compresskit import ScoreMetric, hookimpl, option


    @hookimpl
    def register_metrics(register):
        register(LocalMetric)


    @hookimpl
    def register_commands(cli):
        import click

        @cli.command("local-hello")
        def hello():
            """Say hello from a -p module."""
            click.echo("hello from a -p module")


    class LocalMetric(ScoreMetric):
        """|W| to a power; defined in a file loaded with -p."""

        name = "local_{tag}"
        summary = "local test metric"

        @dataclasses.dataclass(frozen=True)
        class Options:
            power: float = option(1.0, "exponent of |W|")
            mode: Literal["abs", "square"] = option("abs", "which magnitude")

        def score(self, weight, stats):
            w = weight.abs() if self.options.mode == "abs" else weight.pow(2)
            return w.pow(self.options.power)
''')


@pytest.fixture(autouse=True)
def _default_registry_after():
    yield
    cli_module.use_plugins(())  # later tests see the installed plugins only


def run(*args, env=None):
    return CliRunner(env=env).invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_plugin_file(tmp_path):
    path = tmp_path / "mymetric.py"
    path.write_text(PLUGIN.replace("{tag}", "file"))
    r = run("-p", path, "list", "metrics")
    assert r.exit_code == 0 and "local_file - local test metric [mymetric]" in r.output
    r = run("-p", path, "info", "metric", "local_file")
    assert "metric.mode (choice {abs|square}, default 'abs')" in r.output
    r = run("-p", path, "prune", *TINY, "--metric", "local_file", "-o", "metric.mode=square", "-o", "metric.power=0.5")
    assert r.exit_code == 0 and "overall sparsity 0.5000" in r.output, r.output
    r = run("list", "metrics")  # one run only: the next command line does not have it
    assert "local_file" not in r.output


def test_plugin_module_name(tmp_path, monkeypatch):
    (tmp_path / "my_local_plugin.py").write_text(PLUGIN.replace("{tag}", "module"))
    monkeypatch.syspath_prepend(str(tmp_path))
    r = run("-p", "my_local_plugin", "prune", *TINY, "--metric", "local_module")
    assert r.exit_code == 0 and "overall sparsity 0.5000" in r.output, r.output
    r = run("-p", "my_local_plugin", "plugins")
    assert "my_local_plugin" in r.output and "(not packaged)" in r.output


def test_no_name_disables_an_installed_plugin():
    r = run("-p", "no:wanda", "list", "metrics")
    names = [line.split()[0] for line in r.output.splitlines() if line.startswith("  ")]
    assert r.exit_code == 0 and "wanda" not in names and "magnitude" in names
    r = run("-p", "no:wanda", "prune", *TINY, "--metric", "wanda")
    assert r.exit_code != 0 and "unknown metric 'wanda'" in r.output
    assert run("list", "metrics").output.count("wanda -") == 1  # back for the next command line


def test_environment_variable_loads_and_disables(tmp_path):
    path = tmp_path / "envmetric.py"
    path.write_text(PLUGIN.replace("{tag}", "env"))
    r = run("list", "metrics", env={"COMPRESSKIT_PLUGINS": f"{path},no:magnitude"})
    assert "local_env" in r.output and "magnitude" not in r.output
    r = run("list", "metrics")
    assert "local_env" not in r.output and "magnitude" in r.output


def test_broken_named_modules_are_listed_and_stop_other_commands(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('boom')\n")
    typo = tmp_path / "typo.py"
    typo.write_text("from compresskit import hookimpl\n\n@hookimpl\ndef register_metric(register):\n    pass\n")
    r = run("-p", bad, "-p", typo, "-p", "no_such_module_xyz", "plugins")
    assert r.exit_code == 1  # listed, and not a clean bill: plugins the user named failed
    assert "FAILED: plugin broken: failed to import" in r.output and "RuntimeError: boom" in r.output
    assert "fix or remove" in r.output and "-p / $COMPRESSKIT_PLUGINS" in r.output
    assert "FAILED: plugin typo:" in r.output and "register_metric" in r.output
    assert "No module named 'no_such_module_xyz'" in r.output
    r = run("-p", bad, "prune", *TINY, "--metric", "wanda", "--dry-run")  # a named plugin that failed: stop
    assert r.exit_code == 1 and "plugin broken: failed to import" in r.output and "nothing was run" in r.output


def test_module_name_that_is_a_file_here_gets_a_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "herefile.py").write_text("x = 1\n")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    r = run("-p", "herefile", "plugins")
    assert "pass -p herefile.py to load a file" in r.output


def test_main_reads_p_before_parsing_so_plugin_commands_exist(tmp_path, monkeypatch, capsys):
    """`compresskit -p file.py local-hello`: the command comes from the -p module's register_commands."""
    path = tmp_path / "cmdplugin.py"
    path.write_text(PLUGIN.replace("{tag}", "cmd"))
    assert cli_module.plugin_args(["-v", "-p", str(path), "--plugin=no:x", "prune", "-p", "ignored"]) == (
        str(path), "no:x")
    monkeypatch.setattr(sys, "argv", ["compresskit", "-p", str(path), "local-hello"])
    try:
        cli_module.main()
    finally:
        cli.commands.pop("local-hello", None)
    assert "hello from a -p module" in capsys.readouterr().out
