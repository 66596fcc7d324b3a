"""Package list computed from the tree, so that no subpackage can be left out of the wheel.

Everything else, the package-dir mapping too, is in pyproject.toml. The built-in plugins live in the top-level ``plugins/``
folder and install as ``compresskit_plugins``: a mapping that ``packages.find`` cannot express,
so the list is built here (tests/test_packaging.py builds the wheel and compares it with the tree).
"""

from setuptools import find_packages, setup

core = find_packages(include=["compresskit", "compresskit.*"])
plugins = ["compresskit_plugins"] + [f"compresskit_plugins.{p}" for p in find_packages("plugins")]
setup(packages=core + plugins)
