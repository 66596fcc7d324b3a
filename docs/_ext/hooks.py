"""mkdocs hooks: publish the benchmark plots committed in bench/results/ next to the benchmarks page."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


def on_post_build(config: Any, **kwargs: Any) -> None:
    """Copy ``bench/results/*.png`` to ``<site>/benchmarks/`` (the page embeds them by name)."""
    results = Path(config["config_file_path"]).parent / "bench" / "results"
    target = Path(config["site_dir"]) / "benchmarks"
    target.mkdir(parents=True, exist_ok=True)
    for png in sorted(results.glob("*.png")):
        shutil.copy2(png, target / png.name)
