"""Built-in compresskit plugins, shipped as ``compresskit_plugins``.

Each module registers through the ``compresskit`` entry-point group exactly as a
third-party plugin would (see ``pyproject.toml``).
"""
