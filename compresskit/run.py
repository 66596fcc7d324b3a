"""The state of one pruning run, and its report.

A :class:`Run` is built by :func:`compresskit.api.prune` (or by hand for
:func:`compresskit.engine.runner.prune_model`) and handed to every lifecycle hook. It holds the
settings, the configured plugins, the model, the calibration data and statistics, where the
walk is (``block_index``, ``inputs``), the per-layer targets and the report, so that plugins
(allocations, checkpoints, monitors) read one explicit object instead of runner internals.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pluggy
    import torch

    from compresskit.interfaces import Allocation, Loaded, MaskPattern, ModelAdapter, ScoreMetric, Solver
    from compresskit.engine.walk import BlockInput


@dataclasses.dataclass(frozen=True)
class RunnerSettings:
    """Knobs of the layerwise procedure.

    Attributes:
        sparsity: the uniform target (N:M patterns imply their own).
        device: compute device; blocks visit it one at a time.
        offload: where the model rests between blocks (CPU).
        propagate: ``pruned`` (the next block sees the pruned block's outputs, the reference LLM
            procedure) or ``dense`` (statistics from the dense network, Wanda's vision script).
        report_error: record ``||WX - W'X||^2/||WX||^2`` per layer: from the Gram matrix when the
            metric or solver collects it, else from a Gram matrix of the first few calibration
            samples (``PruneReport.error_samples``; see compresskit.engine.runner.ERROR_SAMPLES).
        progress: show a progress bar over blocks.
        accumulate: dtype of the statistics' sums (``float32``; ``float64``: finished in float32,
            nearly independent of summation order, e.g. of how many processes shared the samples).
    """

    sparsity: float = 0.5
    device: Any = "cpu"
    offload: Any = "cpu"
    propagate: str = "pruned"
    report_error: bool = True
    progress: bool = True
    accumulate: str = "float32"


@dataclasses.dataclass
class LayerReport:
    """One pruned layer: where, its target and achieved sparsity, error and time."""

    block: int
    name: str
    shape: tuple[int, int]
    target: float
    sparsity: float
    seconds: float
    error: float | None = None


@dataclasses.dataclass
class PruneReport:
    """What the run did: per-layer targets, sparsity, error and time, per-block time, totals."""

    layers: list[LayerReport] = dataclasses.field(default_factory=list)
    block_seconds: list[float] = dataclasses.field(default_factory=list)
    capture_seconds: float = 0.0
    seconds: float = 0.0
    error_samples: int | None = None
    """The layer errors were measured on the first this many calibration samples (all of them when
    there are fewer; None: on all of them, from the Gram matrix the metric or solver collects)."""

    def _weighted(self, attr: str) -> float:
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(getattr(r, attr) * r.shape[0] * r.shape[1] for r in self.layers) / max(total, 1)

    @property
    def overall_sparsity(self) -> float:
        """Achieved sparsity over every pruned layer, weighted by layer size."""
        return self._weighted("sparsity")

    @property
    def overall_target(self) -> float:
        """The size-weighted mean of the per-layer targets."""
        return self._weighted("target")

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall_sparsity": self.overall_sparsity,
            "overall_target": self.overall_target,
            "seconds": self.seconds,
            "capture_seconds": self.capture_seconds,
            "block_seconds": self.block_seconds,
            "error_samples": self.error_samples,
            "layers": [dataclasses.asdict(r) for r in self.layers],
        }


@dataclasses.dataclass
class Run:
    """Everything a run knows, in one place (see the module docstring).

    Attributes:
        adapter, metric, pattern, solver, allocation: the configured plugins (``solver`` None:
            pruned weights are zeroed and nothing else changes).
        loaded: the model being pruned in place.
        settings: the layerwise knobs.
        hook: the plugin manager's hook relay (``run.hook.block_done(run=..., block_index=...)``);
            :func:`compresskit.engine.runner.prune_model` gives a run without one a manager holding only
            the core's own hooks.
        batches: the calibration batches.
        gradients: finished gradient statistics by ``adapter.gradient_key`` and statistic name, at
            rest (CPU); the runner hands each layer's to the compute device.
        sparsity_map: explicit ``{layer glob: sparsity}`` targets (highest priority).
        targets: the target of every layer decided so far, by layer id ``<block>.<name>``.
        block_index: the block being pruned (None before the first and after the last).
        inputs: the current block's inputs (after ``block_done``: the next block's). Set before
            :func:`~compresskit.engine.runner.prune_model`, they are ``start_block``'s inputs and the
            walk skips its capture (streamed and resumed runs).
        report: per-layer rows, filled as blocks finish.
        notes: facts plugins add for the manifest (``notes[plugin] = {...}``).
        residency: where blocks and activations live during the walk (None: in memory, see
            :class:`compresskit.engine.walk.Residency`; the streamed engine sets its own).
        start_block: the first block to prune (> 0 when a run resumes; ``report`` then holds
            the rows of the blocks before it).
        sample_offset: where ``batches`` start among all calibration samples (this rank's shard
            under ``torchrun``; 0 otherwise), so that "the first samples" mean the same in any world size.
    """

    adapter: ModelAdapter
    metric: ScoreMetric
    pattern: MaskPattern
    loaded: Loaded
    settings: RunnerSettings = dataclasses.field(default_factory=RunnerSettings)
    solver: Solver | None = None
    allocation: Allocation | None = None
    hook: Any = None
    batches: list[dict[str, torch.Tensor]] = dataclasses.field(default_factory=list)
    gradients: dict[str, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)
    sparsity_map: dict[str, float] | None = None
    targets: dict[str, float] = dataclasses.field(default_factory=dict)
    block_index: int | None = None
    inputs: list[BlockInput] = dataclasses.field(default_factory=list)
    report: PruneReport = dataclasses.field(default_factory=PruneReport)
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    pm: pluggy.PluginManager | None = None
    residency: Any = None
    start_block: int = 0
    sample_offset: int = 0

    @property
    def model(self):
        return self.loaded.model

    @property
    def placement(self):
        """Where the run computes and where its tensors rest (:class:`compresskit.engine.device.Placement`)."""
        from compresskit.engine.device import Placement

        return Placement(self.settings.device, self.settings.offload)

    def target(self, block_index: int, layer_name: str) -> float:
        """This layer's target: the first ``layer_sparsity`` answer, else the uniform one (cached)."""
        from compresskit.engine.targets import check_fraction, layer_id

        key = layer_id(block_index, layer_name)
        if key not in self.targets:
            answer = self.hook.layer_sparsity(run=self, block_index=block_index, layer_name=layer_name)
            value = self.settings.sparsity if answer is None else answer
            self.targets[key] = check_fraction(value, f"the target of layer {key}")
        return self.targets[key]
