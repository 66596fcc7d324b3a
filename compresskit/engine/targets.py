"""Per-layer sparsity targets: the explicit map, the allocation dispatch, the uniform fallback.

A layer's target is the first answer of the ``layer_sparsity`` hook. The core answers twice:
first (``tryfirst``) from the run's explicit sparsity map (``--sparsity-map FILE``, or a mapping
passed as ``sparsity`` to :func:`compresskit.prune`), last (``trylast``) from the run's
``--allocation`` plugin; installed plugins answer in between. No answer: the uniform target.

A sparsity map is ``{layer glob: sparsity}``; a layer's id is ``<block index>.<name inside the
block>`` (e.g. ``3.mlp.down_proj``) and the first glob (``fnmatch``, in the map's order) that
matches it decides. Every glob must match some layer (a typo is an error, not a no-op).
"""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from compresskit.errors import OptionError
from compresskit.hookspecs import hookimpl

if TYPE_CHECKING:
    import compresskit  # annotations name compresskit.run.Run


def layer_id(block_index: int, name: str) -> str:
    """The id sparsity maps and reports use for a layer: ``<block index>.<name>``."""
    return f"{block_index}.{name}"


def check_fraction(value: Any, label: str) -> float:
    """``value`` as a sparsity in ``[0, 1)``, or an :class:`OptionError` naming ``label``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptionError(f"{label} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise OptionError(f"{label} must be in [0, 1), got {value}; e.g. 0.5 prunes half the weights")
    return float(value)


def parse_sparsity_map(obj: Any, source: str = "sparsity map") -> dict[str, float]:
    """Validate ``{glob: sparsity}`` (order kept). Raises :class:`OptionError` with the fix."""
    if not isinstance(obj, Mapping) or not obj:
        raise OptionError(f"{source} must be a non-empty JSON object {{\"layer glob\": sparsity}}, "
                          f'e.g. {{"*.mlp.*": 0.6, "*": 0.5}}')
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not key:
            raise OptionError(f"{source}: keys must be layer globs such as '*.self_attn.*', got {key!r}")
        out[key] = check_fraction(value, f"{source}[{key!r}]")
    return out


def load_sparsity_map(path: str | Path) -> dict[str, float]:
    """Read a JSON sparsity map file (see the module docstring)."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except OSError as exc:
        raise OptionError(f"cannot read --sparsity-map {p}: {exc.strerror or exc}; give an existing JSON file") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OptionError(f"--sparsity-map {p} is not valid JSON ({exc}); write an object such as "
                          '{"*.mlp.*": 0.6, "*": 0.5}') from exc
    return parse_sparsity_map(obj, f"--sparsity-map {p}")


def lookup(mapping: Mapping[str, float], layer: str) -> float | None:
    """The sparsity of the first glob matching ``layer``, or None."""
    for glob, value in mapping.items():
        if fnmatch.fnmatchcase(layer, glob):
            return value
    return None


def check_covers(mapping: Mapping[str, float], layers: Iterable[str]) -> None:
    """Every glob must match at least one layer id, else :class:`OptionError` with examples."""
    layers = list(layers)
    unused = [g for g in mapping if not any(fnmatch.fnmatchcase(lay, g) for lay in layers)]
    if unused:
        examples = ", ".join(layers[:3])
        raise OptionError(f"sparsity map glob {unused[0]!r} matches no prunable layer; layer ids look like "
                          f"{examples}, ... (block index, then the name inside the block)")


@hookimpl(tryfirst=True)
def layer_sparsity(run: compresskit.run.Run, block_index: int, layer_name: str) -> float | None:
    """The explicit sparsity map's answer (the core's first word)."""
    if not run.sparsity_map:
        return None
    return lookup(run.sparsity_map, layer_id(block_index, layer_name))


class AllocationDispatch:
    """The run's ``--allocation`` plugin answering the hooks (the core's last word)."""

    @hookimpl
    def run_started(self, run: compresskit.run.Run) -> None:
        if run.allocation is not None:
            run.allocation.prepare(run)

    @hookimpl(trylast=True)
    def layer_sparsity(self, run: compresskit.run.Run, block_index: int, layer_name: str) -> float | None:
        if run.allocation is None:
            return None
        return run.allocation.sparsity(run, block_index, layer_name)


ALLOCATION = AllocationDispatch()
