"""The example plugin and every generated plugin install the way the tutorial says, beside this compresskit.

The tutorial (docs/plugins/tutorial.md) tells users ``pip install -e '.[test]'`` in a generated
package, and examples/compresskit-example-plugin/README.md ``pip install -e
examples/compresskit-example-plugin``: pip resolves each package's ``compresskit`` requirement
against the compresskit already installed. Here pip installs them, dependencies and all, into a
fresh virtual environment that sees this session's packages (``site.addsitedir``) but no index
(``--no-index``, no pip configuration), so a pin that excludes the compresskit under test fails
to resolve exactly as it would for a user. The pins follow the release: ``>=`` this version,
``<`` the next minor (what ``compresskit new-plugin`` writes).
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

import hang
from compresskit._version import __version__
from compresskit.cli import scaffold
from compresskit.engine.kinds import KINDS

tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python >= 3.11's tomllib")
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "compresskit-example-plugin"


def _release_pin() -> str:
    subs = scaffold.names("x", "metric")
    return f"compresskit>={subs['version']},<{subs['next_minor']}"


def test_the_release_pin_is_this_version_up_to_the_next_minor():
    major, minor = __version__.split(".")[:2]
    assert _release_pin() == f"compresskit>={__version__},<{major}.{int(minor) + 1}"


def test_example_plugin_pin_follows_the_release():
    deps = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [d for d in deps if d.startswith("compresskit")] == [_release_pin()], \
        "examples/compresskit-example-plugin/pyproject.toml must pin the release (see scaffold.names)"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_generated_pin_follows_the_release(kind):
    deps = tomllib.loads(scaffold.render(f"tpl_{kind}", kind)["pyproject.toml"])["project"]["dependencies"]
    assert deps == [_release_pin()]


def _venv_beside_this_session(where: Path) -> Path:
    """A virtual environment without packages of its own that sees every package of this session."""
    venv.create(where, with_pip=False, symlinks=True)
    python = where / "bin" / "python"
    purelib = hang.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       capture_output=True, text=True, check=True).stdout.strip()
    outer = [p for p in sys.path if p.endswith("site-packages")] + [sysconfig.get_paths()["purelib"]]
    lines = [f"import site; site.addsitedir({p!r})" for p in dict.fromkeys(outer)]
    (Path(purelib) / "_this_session.pth").write_text("\n".join(lines) + "\n")
    return python


def _pip_install(python: Path, *requirements: str, cwd: Path) -> dict:
    """``pip install`` as the docs say, offline: no index, no configuration, the session's setuptools."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    report = cwd / "pip-report.json"
    res = hang.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
                    "--no-build-isolation", "--report", str(report), *requirements],
                   capture_output=True, text=True, cwd=cwd, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return json.loads(report.read_text())


def _installed(report: dict) -> set[str]:
    return {item["metadata"]["name"] for item in report["install"]}


def _plugins(python: Path, cwd: Path) -> str:
    res = hang.run([str(python), "-m", "compresskit", "plugins"], capture_output=True, text=True, cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_example_plugin_installs_as_its_readme_says(tmp_path):
    """``pip install -e examples/compresskit-example-plugin``, its compresskit requirement resolved."""
    python = _venv_beside_this_session(tmp_path / "venv")
    report = _pip_install(python, "-e", f"{EXAMPLE}[test]", cwd=tmp_path)
    assert _installed(report) == {"compresskit-example-plugin"}, "pip wanted to install a compresskit of its own"
    listed = _plugins(python, tmp_path)
    assert "compresskit-example-plugin 0.1.0" in listed
    assert "ria" in listed


def test_generated_plugins_install_as_the_tutorial_says(tmp_path):
    """Every kind's package from ``compresskit new-plugin``, then ``pip install -e '.[test]'``."""
    dirs = []
    for kind in sorted(KINDS):
        root = tmp_path / f"compresskit-tpl-{kind}"
        for rel, text in scaffold.render(f"tpl_{kind}", kind).items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        dirs.append(root)
    python = _venv_beside_this_session(tmp_path / "venv")
    report = _pip_install(python, *[a for d in dirs for a in ("-e", f"{d}[test]")], cwd=tmp_path)
    assert _installed(report) == {f"compresskit-tpl-{k.replace('_', '-')}" for k in KINDS}
    listed = _plugins(python, tmp_path)
    assert all(f"compresskit-tpl-{k.replace('_', '-')} 0.1.0" in listed for k in KINDS), listed
