"""Docs and examples are tested: the example scripts run, and the docs cover the plugin surface."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

import hang

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"prune_llama.py": "overall sparsity 0.5000", "prune_vit.py": "overall sparsity 0.5000",
           "api.py": "random metric: overall sparsity 0.500"}


def _needs(script: str) -> None:
    if script == "prune_vit.py":
        pytest.importorskip("timm", reason="prune_vit.py needs the vit extra (timm)")


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_script_runs(script, capsys, monkeypatch, tmp_path):
    """In-process (the heavy imports are already loaded): seconds each."""
    _needs(script)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script])
    runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    assert SCRIPTS[script] in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_script_runs_as_a_program(script, tmp_path):
    """As a user runs it (a fresh interpreter: ~10 s of imports each on a 2-core machine)."""
    _needs(script)
    res = hang.run([sys.executable, str(ROOT / "examples" / script)], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert SCRIPTS[script] in res.stdout


# ---- the docs cover the plugin surface ----------------------------------------------------

DOCS = ROOT / "docs"


def _docs_text() -> str:
    return "\n".join(p.read_text() for p in sorted(DOCS.rglob("*.md")))


def _page(rel: str) -> str:
    return (DOCS / rel).read_text()


def _hookspecs():
    import inspect

    from compresskit import hookspecs

    for name, fn in vars(hookspecs).items():
        if callable(fn) and hasattr(fn, "compresskit_spec"):
            yield name, f"{name}({', '.join(inspect.signature(fn).parameters)})"


def _interface_members():
    from compresskit.interfaces import Plugin
    from compresskit.engine.kinds import KINDS

    for base in [Plugin, *(k.base for k in KINDS.values())]:
        for name in vars(base).get("__annotations__", {}):  # class attributes (name, summary, Options, ...)
            yield base.__name__, name
        for name, member in vars(base).items():
            if name.startswith("_") or not (callable(member) or isinstance(member, property)):
                continue
            yield base.__name__, name


def test_hookspecs_found():
    assert {n for n, _ in _hookspecs()} >= {"register_metrics", "register_patterns", "register_adapters"}


@pytest.mark.parametrize("name,signature", list(_hookspecs()))
def test_every_hookspec_is_documented_with_its_signature(name, signature):
    assert f"`{signature}`" in _page("reference/interfaces.md"), f"hookspec {signature} missing from the hook reference"


@pytest.mark.parametrize("base,method", list(_interface_members()))
def test_every_interface_method_is_documented(base, method):
    import re

    page = _page("reference/interfaces.md")
    section = page.split(f"## {base}", 1)[1].split("\n## ", 1)[0]
    assert re.search(rf"`{method}[(`]", section), f"{base}.{method} is not described in the {base} section of reference/interfaces.md"


def _builtin_entries():
    from compresskit.testing import fresh_registry

    reg = fresh_registry()
    from compresskit.engine.kinds import KINDS

    return [e for kind in KINDS for e in reg.entries(kind)]


@pytest.mark.parametrize("entry", _builtin_entries(), ids=lambda e: f"{e.kind}-{e.name}")
def test_every_builtin_plugin_is_documented(entry):
    page = _page("reference/plugins.md")
    assert f"`{entry.name}`" in page, f"built-in {entry.kind} {entry.name!r} missing from reference/plugins.md"
    for alias in entry.aliases:
        assert f"`{alias}`" in page, f"alias {alias!r} of {entry.name!r} missing from reference/plugins.md"
    assert f"::: {entry.cls.__module__}.{entry.cls.__qualname__}" in page, "its docstring is not rendered"
    assert f"`{entry.name}`" in _page("explanation/algorithms.md") or entry.kind in ("adapter", "allocation")


def test_snippet_sections_exist():
    import re

    for page in DOCS.rglob("*.md"):
        for path, section in re.findall(r'--8<-- "([^":]+)(?::([\w-]+))?"', page.read_text()):
            target = ROOT / path
            assert target.exists(), f"{page.name} includes missing file {path}"
            if section:
                assert f"[start:{section}]" in target.read_text(), f"{page.name}: no section {section!r} in {path}"


def test_every_benchmark_table_is_on_the_benchmarks_page():
    page = _page("benchmarks.md")
    for table in sorted((ROOT / "bench" / "results").glob("*.md")):
        assert f'--8<-- "bench/results/{table.name}"' in page, f"{table.name} is not included in docs/benchmarks.md"


def test_manifest_keys_are_documented():
    import re

    from compresskit.api import prune

    manifest = prune(adapter="llama", model="random:tiny", metric="wanda", nsamples=2, seqlen=16,
                     device="cpu", progress=False).manifest
    documented = set(re.findall(r"^\| `(\w+)` \|", _page("howto/report.md"), flags=re.M))
    optional = {"gradients", "evaluation", "zeroshot", "selection", "distributed", "streaming"}  # gradient metrics / --eval / --eval-tasks / --select / torchrun / streamed runs
    assert set(manifest) - documented == set(), "undocumented manifest keys"
    assert documented - set(manifest) <= optional, "documented keys the manifest does not have"


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="docs extra not installed: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings", reason="docs extra not installed: pip install -e '.[docs]'")
    pytest.importorskip("mkdocs_click", reason="docs extra not installed: pip install -e '.[docs]'")
    res = hang.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                   cwd=ROOT, capture_output=True, text=True,
                         env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "site" / "plugins" / "tutorial" / "index.html").exists()
    cli_page = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "--sparsity" in cli_page and "compresskit prune" in cli_page
