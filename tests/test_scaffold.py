"""`compresskit new-plugin`: the package of every kind installs (pip, offline) and passes its own tests."""

from __future__ import annotations

import importlib.metadata as md
import os
import sys

import pytest

import hang
from click.testing import CliRunner

from compresskit.cli import scaffold
from compresskit.cli import cli
from compresskit.errors import CompressKitError, OptionError
from compresskit.engine.kinds import KINDS


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Every kind's package, written by the CLI and installed by pip into one target directory."""
    root = tmp_path_factory.mktemp("new-plugin")
    dirs = {}
    for kind in KINDS:
        r = run("new-plugin", f"tpl_{kind}", "--kind", kind, "--output", root / f"compresskit-tpl-{kind}")
        assert r.exit_code == 0, r.output
        dirs[kind] = root / f"compresskit-tpl-{kind}"
    target = root / "site"
    res = hang.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "--disable-pip-version-check", "--target", str(target), *map(str, dirs.values())],
                         capture_output=True, text=True, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    return root, dirs, target


def test_every_kind_installs_with_its_entry_point(installed):
    _, _, target = installed
    found = {ep.name: ep.value for dist in md.distributions(path=[str(target)])
             for ep in dist.entry_points if ep.group == "compresskit"}
    assert found == {f"tpl_{k}": f"compresskit_tpl_{k}.plugin" for k in KINDS}


def test_the_generated_tests_pass_against_the_installed_packages(installed):
    """One pytest process over the five test directories; only the installed copies are importable."""
    root, dirs, target = installed
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONDONTWRITEBYTECODE": "1"}
    res = hang.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(root),
                          *[str(d / "tests") for d in dirs.values()]],
                         capture_output=True, text=True, cwd=root, env=env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " failed" not in res.stdout and "14 passed" in res.stdout, res.stdout[-2000:]


def test_generated_files_name_the_class_entry_point_and_check():
    files = scaffold.render("ria", "metric")
    assert set(files) == {"pyproject.toml", "README.md", "src/compresskit_ria/__init__.py",
                          "src/compresskit_ria/plugin.py", "tests/test_ria.py"}
    assert 'ria = "compresskit_ria.plugin"' in files["pyproject.toml"]
    assert "class RiaMetric(ScoreMetric)" in files["src/compresskit_ria/plugin.py"]
    assert "check_metric(plugin.RiaMetric" in files["tests/test_ria.py"]
    assert "class MyAdapter(ModelAdapter)" in scaffold.render("my-adapter", "adapter")["src/compresskit_my_adapter/plugin.py"]
    assert "src/compresskit_x/model.py" in scaffold.render("x", "adapter")


def test_bad_names_taken_names_and_full_directories_are_refused(tmp_path):
    with pytest.raises(OptionError, match="snake case"):
        scaffold.plugin_name("9lives")
    with pytest.raises(OptionError, match="snake case"):
        scaffold.plugin_name("class")
    r = run("new-plugin", "wanda", "--kind", "metric", "--output", tmp_path / "w")
    assert r.exit_code != 0 and "metric 'wanda' is already registered by wanda (compresskit" in r.output
    assert not (tmp_path / "w").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(CompressKitError, match="exists and is not empty"):
        scaffold.write("fresh_name", "metric", tmp_path / "full")
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_the_tutorials_copy_is_what_new_plugin_writes():
    """docs/plugins/tutorial.md shows examples/new-plugin/compresskit-ria: it must stay the generated package."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "examples" / "new-plugin" / "compresskit-ria"
    files = {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*") if p.is_file()}
    assert files == scaffold.render("ria", "metric"), (
        "regenerate it: rm -r examples/new-plugin/compresskit-ria && compresskit -p no:ria new-plugin ria --kind metric "
        "--output examples/new-plugin/compresskit-ria")


def test_generated_plugin_modules_load_with_p_and_without_torch(tmp_path):
    """Every kind's plugin.py registers through -p with no failure, and importing it does not import torch."""
    paths = []
    for kind in KINDS:
        path = tmp_path / f"tpl_{kind}.py"
        path.write_text(scaffold.render(f"tpl_{kind}", kind)[f"src/compresskit_tpl_{kind}/plugin.py"])
        paths.append(str(path))
    code = ("import sys; from compresskit import cli; cli.use_plugins(tuple(sys.argv[1:])); reg = cli.registry(); "
            "assert not reg.failures, [f.message() for f in reg.failures]; "
            "assert [reg.get(k, 'tpl_' + k).name for k in ('metric', 'pattern', 'adapter', 'solver', 'allocation')]; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    res = hang.run([sys.executable, "-c", code, *paths], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
