"""A per-layer sparsity plugin: prune the MLP harder than attention, keep the overall target.

Load it for one run with ``COMPRESSKIT_PLUGINS=examples/plugins/mlp_heavier.py``, or name the
module in the ``compresskit`` entry-point group of your package to make it permanent.
"""

# --8<-- [start:plugin]
from compresskit import hookimpl

SHIFT = 0.1  # MLP layers get target + SHIFT, attention layers target - 2 * SHIFT


@hookimpl
def run_started(run):
    run.notes["mlp_heavier"] = {"shift": SHIFT}  # recorded in compresskit.json


@hookimpl
def layer_sparsity(run, block_index, layer_name):
    """MLP matrices hold 2/3 of a LLaMA block's weights, attention 1/3: the mean stays put."""
    if run.pattern.implied_sparsity is not None:
        return None  # N:M fixes its own sparsity: leave it alone
    target = run.settings.sparsity
    if layer_name.startswith("mlp."):
        return min(target + SHIFT, 0.99)
    return max(target - 2 * SHIFT, 0.0)
# --8<-- [end:plugin]
