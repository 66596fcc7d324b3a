"""Additive per-layer statistics: small trees of tensors whose parts combine by summation.

Every statistic the runner collects for a layer — activation norms, Gram matrices, gradient
aggregates, token and sample counts — is a dict of tensors (its *parts*) that are sums over
calibration samples. Two collections over disjoint samples therefore combine with one
operation, :func:`merge` (part-wise addition), whatever the statistic: that is what lets a run
split calibration across processes (all-reduce = merge) or save and restore its progress.
Only :meth:`Statistic.finish` turns the sums into the value a metric reads (e.g. a square
root), and it runs once, after every sample is in.

Metrics and solvers name what they need (``statistics()``): a built-in name (``act_sq``,
``gram``, ``grad_l1``, ``grad_l2``, ``block_grad_rms``, ...) or a :class:`Statistic` instance of
their own. The runner collects each distinct statistic once per layer and passes the finished values in a
:class:`LayerStats`.

This module imports torch only inside functions, so plugins can import it at module level.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Iterator, Mapping

if TYPE_CHECKING:
    import torch
    from torch import nn

REFERENCE_SCALE = 100.0
"""The per-sample gradient factor the GBLM reference code bakes into its gradient files."""

Parts = dict[str, "torch.Tensor"]
"""The additive parts of one statistic of one layer (tensors that are sums over samples)."""


class Statistic(ABC):
    """One additive per-layer statistic.

    Attributes:
        name: key under which the finished value appears in :class:`LayerStats`.
        source: ``inputs`` (folded from every calibration input of the layer by :meth:`update`),
            ``gradients`` (folded by the gradient engine from per-sample weight gradients of the
            model's loss) or ``block_gradients`` (folded by :mod:`compresskit.engine.blockgrad` from
            per-sample weight gradients of a block-local ``objective``, one block at a time).
    """

    name: ClassVar[str]
    source: ClassVar[str] = "inputs"
    sample_limit: ClassVar[int | None] = None
    """``inputs`` statistics only: fold the first this many calibration samples (per process), then
    stop (None: every sample). The runner's default error report uses it (:class:`ErrorGram`)."""

    @abstractmethod
    def init(self, layer: nn.Linear) -> Parts:
        """Zeroed parts for ``layer``, float32 (counts int64) on the layer's device."""

    def update(self, parts: Parts, x: torch.Tensor) -> None:
        """Fold ``x`` (float32 ``[tokens, in_features]`` inputs of the layer) into ``parts`` in place.

        With ``--accumulate float64`` the runner hands float64 copies of the float32 parts of
        :meth:`init`; in-place additions (``parts["sum"] += ...``) work with either.
        """

    def finish(self, parts: Parts) -> Any:
        """The value metrics read, from the summed parts (default: the single part itself)."""
        (value,) = parts.values()
        return value

    def key(self) -> str:
        """Identity of the statistic including its settings (two equal keys are collected once)."""
        fields = dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
        return self.name + "".join(f"|{k}={v}" for k, v in sorted(fields.items()))


class ActSq(Statistic):
    """``act_sq``: per input column, the sum of squared inputs over every calibration token.

    ``act_sq.sqrt()`` is the column norm ``||X_j||_2`` that Wanda and GBLM multiply ``|W|`` by.
    """

    name = "act_sq"

    def init(self, layer: nn.Linear) -> Parts:
        import torch

        return {"sum": torch.zeros(layer.in_features, dtype=torch.float32, device=layer.weight.device)}

    def update(self, parts: Parts, x: torch.Tensor) -> None:
        parts["sum"] += x.pow(2).sum(dim=0)


class Gram(Statistic):
    """``gram``: ``X^T X`` summed over calibration tokens (``[in, in]``; SparseGPT's Hessian up to scale)."""

    name = "gram"

    def init(self, layer: nn.Linear) -> Parts:
        import torch

        n = layer.in_features
        return {"xtx": torch.zeros(n, n, dtype=torch.float32, device=layer.weight.device)}

    def update(self, parts: Parts, x: torch.Tensor) -> None:
        xtx = parts["xtx"]
        if xtx.dtype == x.dtype:
            xtx.addmm_(x.t(), x)
        else:  # float64 accumulators (--accumulate float64): each sample's float32 product, summed in float64
            xtx += (x.t() @ x).to(xtx.dtype)


@dataclasses.dataclass(frozen=True)
class ErrorGram(Gram):
    """``error_gram``: ``X^T X`` over the first ``sample_limit`` calibration samples only.

    What the runner's error report reads when nothing else collects the full ``gram``: a few
    samples cost a small fraction of a full Gram matrix per distinct layer input, and the report
    then says the errors were measured on those samples (``PruneReport.error_samples``).
    """

    sample_limit: int = 4  # type: ignore[misc]
    name: ClassVar[str] = "error_gram"

    def key(self) -> str:
        """``error_gram`` whatever the limit: under ``torchrun`` each rank folds its share of the
        first samples (some none), and the ranks' parts must carry the same keys to be summed."""
        return self.name


@dataclasses.dataclass(frozen=True)
class GradNorm(Statistic):
    """``grad_l1`` / ``grad_l2``: per-weight aggregate of per-sample loss gradients of the dense model.

    Parts: ``sum`` = ``sum_n |s g_n|`` (l1) or ``sum_n (s g_n)^2`` (l2), ``s`` = ``scale``.
    Finished: the l1 sum, or the square root of the l2 sum. ``precision="reference"`` rounds
    the finished value to float16 (and the gradient engine keeps the l1 running sum in float16),
    reproducing the GBLM reference code's accumulators; ``precision="float64"`` keeps the sums
    in float64 and finishes them in float32 (the result then hardly depends on summation order,
    e.g. on how many processes shared the samples).
    """

    norm: str = "l1"
    scale: float = 1.0
    precision: str = "float32"
    source: ClassVar[str] = "gradients"

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"grad_{self.norm}"

    def init(self, layer: nn.Linear) -> Parts:
        import torch

        dtype = torch.float16 if self.precision == "reference" and self.norm == "l1" else torch.float32
        dtype = torch.float64 if self.precision == "float64" else dtype
        return {"sum": torch.zeros(layer.weight.shape, dtype=dtype, device=layer.weight.device)}

    def fold(self, parts: Parts, grad: torch.Tensor) -> None:
        """Add one sample's weight gradient: ``|s g|`` (l1) or ``(s g)^2`` (l2), in float32."""
        g = grad.float()
        if self.scale != 1.0:
            g = g * self.scale
        if self.norm == "l1":
            parts["sum"].add_(g.abs())
        else:
            parts["sum"].addcmul_(g, g)

    def finish(self, parts: Parts) -> torch.Tensor:
        out = parts["sum"].float()
        out = out.sqrt() if self.norm == "l2" else out
        return out.half().float() if self.precision == "reference" else out


@dataclasses.dataclass(frozen=True)
class BlockGradNorm(Statistic):
    """``block_grad_rms`` / ``block_grad_mean_abs``: per-weight aggregate over calibration samples of
    the gradient of a *block-local* objective, the norm of the block's own output.

    For sample ``n`` the objective is ``L_n = ||f(X_n)||_2`` (plain Frobenius norm of the block's
    output on that sample: not squared, not averaged; Wanda++'s regional loss) and ``g_n`` its
    gradient w.r.t. the layer's weight. Parts: ``sum`` = ``sum_n g_n^2`` (``rms``) or
    ``sum_n |g_n|`` (``mean_abs``), and ``samples``. Finished: ``sqrt(sum / samples)`` or
    ``sum / samples``. Collected by :mod:`compresskit.engine.blockgrad`, one block at a time with a
    backward pass through that block only, on the block's calibration inputs and its weights
    as they are before the block is pruned.
    """

    aggregate: str = "rms"
    source: ClassVar[str] = "block_gradients"

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"block_grad_{self.aggregate}"

    def init(self, layer: nn.Linear) -> Parts:
        import torch

        return {"sum": torch.zeros(layer.weight.shape, dtype=torch.float32, device=layer.weight.device),
                "samples": torch.zeros((), dtype=torch.int64, device=layer.weight.device)}

    def objective(self, output: torch.Tensor) -> torch.Tensor:
        """The scalar whose weight gradient is folded: the output's plain L2 norm, in float32."""
        return output.float().norm()

    def fold(self, parts: Parts, grad: torch.Tensor) -> None:
        """Add one sample's weight gradient."""
        g = grad.float()
        if self.aggregate == "rms":
            parts["sum"].addcmul_(g, g)
        else:
            parts["sum"].add_(g.abs())
        parts["samples"] += 1

    def finish(self, parts: Parts) -> torch.Tensor:
        mean = parts["sum"] / parts["samples"].clamp(min=1).float()
        return mean.sqrt() if self.aggregate == "rms" else mean


class Counts(Statistic):
    """Tokens and samples seen by a layer (collected for every layer that sees calibration data)."""

    name = "counts"

    def init(self, layer: nn.Linear) -> Parts:
        import torch

        zero = torch.zeros((), dtype=torch.int64, device=layer.weight.device)
        return {"tokens": zero.clone(), "samples": zero.clone()}

    def count(self, parts: Parts, tokens: int, samples: int) -> None:
        """Add ``tokens`` flattened rows coming from ``samples`` calibration samples."""
        parts["tokens"] += tokens
        parts["samples"] += samples

    def finish(self, parts: Parts) -> dict[str, int]:
        return {k: int(v) for k, v in parts.items()}


BUILTIN: dict[str, Statistic] = {"act_sq": ActSq(), "gram": Gram(), "grad_l1": GradNorm("l1"), "grad_l2": GradNorm("l2"),
                                 "block_grad_rms": BlockGradNorm("rms"), "block_grad_mean_abs": BlockGradNorm("mean_abs")}
"""Statistics available by name."""


def resolve(specs: Iterable[str | Statistic]) -> list[Statistic]:
    """Turn names and instances into distinct :class:`Statistic` objects (by :meth:`~Statistic.key`)."""
    from compresskit.errors import CompressKitError

    out: dict[str, Statistic] = {}
    for spec in specs:
        if isinstance(spec, str):
            if spec not in BUILTIN:
                raise CompressKitError(f"unknown statistic {spec!r}; built-in ones are {', '.join(BUILTIN)} "
                                       "(or return a compresskit.stats.Statistic instance)")
            spec = BUILTIN[spec]
        if not isinstance(spec, Statistic):
            raise CompressKitError(f"statistics() must name statistics or return Statistic instances, got {spec!r}")
        out.setdefault(spec.key(), spec)
    return list(out.values())


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Part-wise sum of two trees of the same shape (nested dicts of tensors). Neither is modified."""
    if a.keys() != b.keys():
        raise ValueError(f"cannot merge statistics with different parts: {sorted(a)} vs {sorted(b)}")
    return {k: merge(a[k], b[k]) if isinstance(a[k], Mapping) else a[k] + b[k] for k in a}


def merge_into(a: Mapping[str, Any], b: Mapping[str, Any]) -> None:
    """Add tree ``b`` into tree ``a`` in place."""
    for k, v in b.items():
        if isinstance(v, Mapping):
            merge_into(a[k], v)
        else:
            a[k] += v


def leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted path, tensor)`` of every part, in a stable (sorted) order: for reductions and files."""
    for k in sorted(tree):
        v = tree[k]
        if isinstance(v, Mapping):
            yield from leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


class LayerStats(Mapping[str, Any]):
    """The finished statistics of one layer, as a metric or solver reads them.

    ``stats["act_sq"]``, ``stats["gram"]``, ``stats["grad_l1"]``, ...; ``stats.tokens`` and
    ``stats.samples`` count the calibration data the layer saw; ``block_index`` and ``name``
    say which layer it is.
    """

    def __init__(self, values: dict[str, Any], block_index: int, name: str, tokens: int = 0, samples: int = 0) -> None:
        self._values = values
        self.block_index, self.name, self.tokens, self.samples = block_index, name, tokens, samples

    def __getitem__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise KeyError(f"statistic {key!r} was not collected for layer {self.block_index}.{self.name}; "
                           f"declare it in statistics() (collected: {', '.join(self._values) or 'none'})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)
