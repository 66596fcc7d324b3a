"""The layout's promises: plugins import only the public surface, and the wheel holds every package.

The public surface (documented in docs/reference/api.md with its stability promise) is what a
plugin may import; ``compresskit.engine`` and ``compresskit.cli`` are internals. The built-in
plugins, the plugin templates, the example plugin and a freshly generated plugin package are held
to it. The wheel test builds the wheel from the tracked files, compares it with the tree, installs
it (not editable) outside the source tree and prunes with it.
"""

from __future__ import annotations

import ast
import re
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import hang

ROOT = Path(__file__).resolve().parents[1]

PUBLIC = {
    "compresskit", "compresskit.api", "compresskit.blocks", "compresskit.cache", "compresskit.config",
    "compresskit.data", "compresskit.device", "compresskit.distributed", "compresskit.errors",
    "compresskit.hookspecs", "compresskit.interfaces", "compresskit.obs", "compresskit.ops", "compresskit.admm",
    "compresskit.swaps",
    "compresskit.options", "compresskit.output", "compresskit.run", "compresskit.stats", "compresskit.testing",
}
"""The modules a plugin may import (docs/reference/api.md lists the same)."""


def _imports(source: str, filename: str) -> list[tuple[int, str]]:
    """Every ``compresskit...`` module a source file imports, with its line."""
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            if node.module == "compresskit":  # `from compresskit import blocks` names a module too
                out += [(node.lineno, f"compresskit.{a.name}") for a in node.names
                        if (ROOT / "compresskit" / a.name).exists() or (ROOT / "compresskit" / f"{a.name}.py").exists()]
    return [(line, mod) for line, mod in out if mod == "compresskit" or mod.startswith("compresskit.")]


def _violations(files: list[Path]) -> list[str]:
    bad = []
    for f in files:
        text = f.read_text()
        if f.suffix == ".tmpl":  # the templates' $placeholders are not Python until substituted
            text = re.sub(r"\$\{?(\w+)\}?", r"\1", text)
        for line, mod in _imports(text, str(f)):
            if mod not in PUBLIC and not any(mod.startswith(p + ".") for p in ("compresskit.testing",)):
                bad.append(f"{f}:{line} imports {mod}")
    return bad


def test_public_surface_modules_exist():
    for mod in PUBLIC:
        path = ROOT / mod.replace(".", "/")
        assert path.with_suffix(".py").exists() or (path / "__init__.py").exists(), mod


def test_builtin_plugins_and_templates_import_only_the_public_surface():
    files = sorted((ROOT / "plugins").rglob("*.py"))
    files += sorted(p for p in (ROOT / "compresskit/cli/templates").rglob("*.py.tmpl"))
    files += sorted((ROOT / "examples").rglob("*.py"))
    assert len(files) > 30
    assert _violations(files) == []


def test_a_generated_plugin_imports_only_the_public_surface(tmp_path, registry):
    from compresskit.cli import scaffold
    from compresskit.engine.kinds import KINDS

    for kind in KINDS:
        target = scaffold.write(f"my_{kind}", kind, tmp_path / kind, registry=registry)
        files = sorted(target.rglob("*.py"))
        assert files, kind
        assert _violations(files) == [], kind


def test_the_boundary_check_catches_an_engine_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from compresskit.engine.walk import walk_blocks\nfrom compresskit import cli\nimport compresskit.ops\n")
    assert _violations([bad]) == [f"{bad}:1 imports compresskit.engine.walk", f"{bad}:2 imports compresskit.cli"]


def _tracked(prefix: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", prefix], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout: the wheel test compares the wheel with the tracked files")
    return [p for p in out.stdout.split("\n") if p]


def test_wheel_holds_every_package_and_prunes_when_installed_outside_the_tree(tmp_path):
    src = tmp_path / "src"
    files = _tracked(".")
    for rel in files:  # build from the tracked files alone, as a clean clone would
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("compresskit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {p for p in files if p.startswith("compresskit/") and not p.endswith((".pyc",))}
    want |= {"compresskit_plugins/" + p[len("plugins/"):] for p in files if p.startswith("plugins/")}
    assert sorted(want - names) == [], "tracked files missing from the wheel"

    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                              "--target", str(site), str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "COMPRESSKIT_CACHE": str(tmp_path / "cache")}
    env.pop("COMPRESSKIT_PLUGINS", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        return hang.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True)

    where = run("-c", "import compresskit, compresskit_plugins, compresskit.engine.stream, compresskit.engine.distributed, "
                      "compresskit.cli; print(compresskit.__file__); print(compresskit_plugins.__file__)")
    assert where.returncode == 0, where.stderr[-3000:]
    assert all(line.startswith(str(site)) for line in where.stdout.split()), where.stdout
    plugins = run("-m", "compresskit", "plugins", "--json")
    assert plugins.returncode == 0, plugins.stderr[-3000:]
    import json

    listed = json.loads(plugins.stdout)
    assert listed["failed"] == []
    assert {"gblm", "wanda", "sparsegpt", "magnitude", "llama", "vit"} <= {p["name"] for p in listed["plugins"]}
    pruned = run("-m", "compresskit", "prune", "--model", "random:tiny", "--metric", "gblm", "--nsamples", "4",
                 "--seqlen", "32", "--calibration", "random", "--no-progress", "--output", str(work / "out"))
    assert pruned.returncode == 0, pruned.stderr[-3000:]
    assert (work / "out" / "compresskit.json").exists()
