"""The three plugin interfaces: ScoreMetric, MaskPattern, ModelAdapter.

Each is a one-level ABC. A plugin class sets ``name`` (the registry key typed on the CLI),
``summary`` (one line for ``compresskit list``) and ``Options`` (a frozen dataclass built with
:func:`compresskit.options.option`). The runner builds one instance per run with validated
options; plugins never build each other and never walk blocks, register hooks or move
tensors between devices: that is the runner's job (:mod:`compresskit.runner`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Sequence

import torch
from torch import nn

from compresskit.options import NoOptions

if TYPE_CHECKING:
    from pathlib import Path


@dataclasses.dataclass
class LayerContext:
    """What the runner knows about the layer being pruned, beside its weight and state.

    Attributes:
        name: qualified name inside the block, e.g. ``self_attn.q_proj``.
        block_index: index of the block in ``adapter.blocks(model)``.
        grad: the gradient statistic (``[out, in]`` float32) when the metric needs gradients.
        hessian: ``X^T X`` summed over calibration tokens (``[in, in]`` float32, see
            :func:`compresskit.ops.gram_update`) when the metric, the update stage or the
            error report needs it.
        tokens: number of calibration tokens seen by this layer.
    """

    name: str
    block_index: int
    grad: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    tokens: int = 0


@dataclasses.dataclass
class PruneDecision:
    """The result of pruning one layer: which weights go and, optionally, new kept weights.

    Attributes:
        mask: boolean ``[out, in]``, True = prune (set to zero).
        weight: replacement weight (float32, already zero where ``mask``) for methods that
            update the kept weights (SparseGPT); None keeps the original values.
    """

    mask: torch.Tensor
    weight: torch.Tensor | None = None


class MaskPattern(ABC):
    """Given scores, decide which weights go.

    ``mask(scores, sparsity)`` returns True where a weight is pruned. Higher score = keep.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    @property
    def implied_sparsity(self) -> float | None:
        """The sparsity this pattern fixes by itself (N:M), or None when ``--sparsity`` decides."""
        return None

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(n_pruned, m)`` for N:M patterns, None otherwise (used by SparseGPT's sweep)."""
        return None

    def check(self, layer_name: str, weight_shape: tuple[int, int], sparsity: float) -> None:
        """Raise :class:`~compresskit.errors.IncompatiblePatternError` if the pattern cannot apply.

        Called by the runner for every target layer before any calibration work. The message
        must name the layer and the fix.
        """

    @abstractmethod
    def mask(self, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        """Return a boolean tensor of ``scores``' shape, True = prune. Must not modify scores."""


class ScoreMetric(ABC):
    """How important is each weight? Higher score = keep.

    The runner calls, per target linear layer: ``init_state(layer)`` once; ``update(state, x)``
    for every calibration forward (``x`` is the layer input, detached, float32, flattened to
    ``[tokens, in_features]``); then ``prune(weight, state, ctx, pattern, sparsity)``, whose
    default scores with ``score`` and asks the pattern for a mask.

    Class flags tell the runner which passes to run: ``needs_calibration`` (forward passes with
    hooks), ``needs_gradients`` (a dense forward+backward per calibration sample before
    pruning; then ``gradient_norm()`` names the statistic), ``needs_hessian`` (``ctx.hessian``).
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    needs_calibration: ClassVar[bool] = True
    needs_gradients: ClassVar[bool] = False
    needs_hessian: ClassVar[bool] = False

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def gradient_norm(self) -> str | None:
        """Which gradient statistic ``score`` wants: ``"l1"`` or ``"l2"`` (None: no gradients)."""
        return None

    def gradient_scale(self) -> float:
        """Factor applied to every per-sample gradient before aggregation (GBLM reference: 100)."""
        return 1.0

    def init_state(self, layer: nn.Linear) -> Any:
        """Return a fresh float32 accumulator for ``layer`` (None for data-free metrics)."""
        return None

    def update(self, state: Any, inputs: torch.Tensor) -> None:
        """Fold a ``[tokens, in_features]`` float32 batch of layer inputs into ``state``."""

    @abstractmethod
    def score(self, weight: torch.Tensor, state: Any, grad: torch.Tensor | None) -> torch.Tensor:
        """Return importance scores of ``weight``'s shape. Must not modify ``weight``."""

    def prune(
        self,
        weight: torch.Tensor,
        state: Any,
        ctx: LayerContext,
        pattern: MaskPattern,
        sparsity: float,
    ) -> PruneDecision:
        """Decide the mask (and optionally new weights). Default: ``pattern.mask(score(...))``."""
        return PruneDecision(mask=pattern.mask(self.score(weight, state, ctx.grad), sparsity))


@dataclasses.dataclass
class Loaded:
    """A model as loaded by an adapter, with what its family needs beside it.

    Attributes:
        model: the ``nn.Module`` in eval mode, on the offload device.
        processor: tokenizer (LLaMA) or data config / transform (ViT); None when absent.
        source: the source string it was loaded from.
        info: free-form facts for the manifest (family, parameter count, origin).
    """

    model: nn.Module
    processor: Any
    source: str
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


class ModelAdapter(ABC):
    """Where are the blocks and linears of this model family, and how is it fed?

    Adapters describe structure and data; they never loop over blocks. ``Batch`` values are
    whatever ``calibration_batches`` yields and ``forward``/``loss`` accept (a dict of tensors).
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    aliases: ClassVar[dict[str, str]] = {}
    default_model: ClassVar[str] = "random:tiny"
    #: evaluation windows/batches used when the user gives no cap (None: all); CPU-sized default
    default_eval_limit: ClassVar[int | None] = None

    def __init__(self, options: Any = None, alias: str | None = None) -> None:
        self.options = options if options is not None else self.Options()
        self.alias = alias  # the name or alias the user selected this adapter by (None: its name)

    def resolve_source(self, source: str | None) -> str:
        """Map ``None`` to the preset of the alias used (``aliases``), else the default model."""
        key = (self.alias or "").strip().lower().replace("-", "_")
        return source or self.aliases.get(key) or self.default_model

    @abstractmethod
    def load(self, source: str) -> Loaded:
        """Load the model (eval mode, float32, on CPU). Must understand ``random:tiny``."""

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
        """Return ``nsamples`` batches of one sample each, deterministic in ``seed``."""

    def describe_data(self, data: str | None) -> dict[str, Any]:
        """Facts about a calibration/evaluation source for the manifest (name, fingerprint)."""
        return {"source": data}

    @abstractmethod
    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        """Run the model on one batch (used to capture block-0 inputs)."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar training loss of one batch; needed only by gradient metrics."""
        raise NotImplementedError(f"adapter {self.name!r} defines no loss")

    @contextlib.contextmanager
    def run_context(self, model: nn.Module) -> Iterator[None]:
        """Model-specific toggles for the duration of a run (e.g. KV cache off)."""
        yield

    @abstractmethod
    def save(self, loaded: Loaded, directory: Path) -> None:
        """Write the model in its family's own format into an existing empty ``directory``."""

    def evaluate(self, loaded: Loaded, data: str | None, seqlen: int, limit: int | None) -> dict[str, Any]:
        """Quality of the model: a dict with the headline metric and the protocol used."""
        raise NotImplementedError(f"adapter {self.name!r} has no evaluation")
