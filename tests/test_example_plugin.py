"""End-to-end discovery of the separately installed example plugin (examples/compresskit-example-plugin).

scripts/bootstrap (and so CI) installs it with ``pip install -e examples/compresskit-example-plugin``,
its compresskit requirement resolved against the installed compresskit; without it these tests
skip. tests/test_plugin_install.py installs it (and every generated plugin) in a fresh environment.
"""

from __future__ import annotations

import importlib.metadata as md
import json

import pytest
from click.testing import CliRunner

from compresskit.cli import cli

INSTALLED = any(ep.name == "ria" and ep.value.startswith("compresskit_example_plugin")
                for ep in md.entry_points(group="compresskit"))
pytestmark = pytest.mark.skipif(
    not INSTALLED,
    reason="example plugin not installed; run `pip install -e examples/compresskit-example-plugin`",
)


def test_ria_listed_with_its_distribution():
    res = CliRunner().invoke(cli, ["list", "metrics"])
    assert res.exit_code == 0, res.output
    line = next(line for line in res.output.splitlines() if line.strip().startswith("ria "))
    assert "compresskit-example-plugin" in line
    plugins = CliRunner().invoke(cli, ["plugins"])
    assert plugins.exit_code == 0 and "compresskit-example-plugin" in plugins.output


def test_ria_prunes_random_tiny_through_the_cli(tmp_path):
    out = tmp_path / "ria"
    res = CliRunner().invoke(cli, [
        "prune", "--adapter", "llama", "--model", "random:tiny", "--metric", "ria", "--sparsity", "0.5",
        "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--no-progress", "--output", str(out),
    ])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "compresskit.json").read_text())
    assert manifest["plugins"]["metric"].startswith("ria (compresskit-example-plugin")
    assert abs(manifest["report"]["overall_sparsity"] - 0.5) < 1e-3


def test_ria_conforms_as_discovered():
    from compresskit.engine.registry import Registry
    from compresskit.testing import check_metric

    reg = Registry.from_entrypoints()
    assert check_metric(reg.get("metric", "ria").cls, registry=reg)


def test_example_plugin_own_tests_pass():
    """Run the example package's own test functions (they take no fixtures) in this session."""
    import runpy
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "compresskit-example-plugin" / "tests" / "test_ria.py"
    tests = {k: v for k, v in runpy.run_path(str(path)).items() if k.startswith("test_") and callable(v)}
    assert len(tests) >= 4
    for fn in tests.values():
        fn()
