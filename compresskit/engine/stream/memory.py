"""The memory model of a run: what is resident at each step, in model and calibration sizes.

Symbols (bytes unless said otherwise): ``s`` bytes per weight of the model dtype; ``P_b`` the
parameters of the largest block, ``P_l`` its prunable weights, ``W`` its largest prunable
layer, ``X`` the sum of ``in_features**2`` over its prunable layers (Gram matrices), ``M`` the
parameters of the whole model, ``E`` those outside the blocks on the input side (embeddings),
``H`` on the output side (final norm, head; 0 extra when tied to the embeddings), ``N`` the
calibration samples, ``L`` tokens per sample, ``d`` the hidden size, ``d_ff`` the MLP width,
``h`` attention heads, ``V`` the vocabulary, ``g`` the gradient statistics the metric needs
(1 for GBLM), ``a = L*d*s`` one sample's hidden states, ``R`` the runtime (Python, torch,
tokenizer; measured at start).

Streamed (one block resident):

* capture: ``E*s + acts``
* gradient forward: ``P_b*s + acts``
* head: ``H*s + 4*L*V*4`` (logits, their float32 copy, log-softmax, gradient)
* gradient backward: ``P_b*s + g*P_l*4 + 2*W*4 + T`` with ``T = L*(8d + 3*d_ff)*s + 2*h*L^2*s``
  (one sample's autograd intermediates through one block; the ``L^2`` term is the attention
  matrix of an eager or math attention kernel, less with fused kernels); ``2*W*4``: one layer's
  weight gradient and the temporary its statistic is folded from
* prune: ``P_b*s + 29*W + X*4``: for the layer being decided its dense copy, the metric's copy,
  its gradient statistic, scores, their sorted values and (int64) indices, the mask (``7*W*4 + W``
  bytes); the Gram term only for SparseGPT, ``--update obs`` or the error report

``acts`` is what is live of the calibration activations: ``2*N*a`` while pruning or in the
forward (a block's inputs and outputs), ``3*N*a`` in the backward (inputs, output gradients,
input gradients), plus the kept inputs of the blocks not yet back-propagated in the gradient
pass; whatever exceeds the activation budget is on disk instead. In memory (the classic path)
the whole model ``M*s`` is resident throughout, plus ``g*(sum of P_l over blocks)*4``
accumulators and every block's ``T`` during the gradient pass.

These counts hold only if memory freed is memory returned: glibc keeps freed chunks below its
adaptive mmap threshold (up to 32 MB) on the heap, where fragmentation made a streamed run peak
0.3-0.4 GB above the live tensors. :func:`return_freed_memory` fixes the threshold at
:data:`MMAP_THRESHOLD` for a streamed run, so every tensor of a megabyte or more is its own
mapping, returned to the system the moment it is freed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import TYPE_CHECKING, Any

from compresskit.errors import OptionError

if TYPE_CHECKING:
    from torch import nn

    from compresskit.interfaces import ModelAdapter

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
ACTIVATION_SHARE = 0.5
"""Without ``--max-memory``: activations stay in memory up to this share of the available memory."""
MARGIN = 0.05
"""Share of ``--max-memory`` kept free for allocator slack and temporaries not modelled."""
MMAP_THRESHOLD = 1 << 20
"""Allocations of this many bytes or more are served (and returned) by ``mmap`` in a streamed run."""


def parse_size(value: Any) -> int:
    """``1.3GB``, ``800MiB``, ``2e9`` or an integer of bytes -> bytes (decimal units: GB = 10^9)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise OptionError(f"--max-memory must be positive, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise OptionError(f"--max-memory {value!r} is not a size; write e.g. 1.3GB, 800MiB or 2000000000 (bytes)")
    return int(float(m.group(1)) * _UNITS[unit])


def fmt(n: float) -> str:
    """Bytes as ``1.23 GB``."""
    for unit, f in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.2f} {unit}"
    return f"{int(n)} B"


def current_rss() -> int:
    """Resident memory of this process now (Linux ``/proc``; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def peak_rss() -> int:
    """This process's peak resident memory so far, as the kernel keeps it (no spike escapes it).

    ``VmHWM`` of ``/proc/self/status``, not ``getrusage``'s ``ru_maxrss``: Linux carries a
    parent's high-water mark into its child's ``ru_maxrss`` across fork + exec, so a process
    started by one that once held 1.6 GB reports at least 1.6 GB. ``ru_maxrss`` without ``/proc``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def trim() -> None:
    """Give freed heap memory back to the operating system (glibc ``malloc_trim``; elsewhere nothing).

    glibc serves allocations below its (adaptive, up to 32 MB) mmap threshold from the heap and
    keeps what is freed there: without this, every block's tensors of a few MB to 32 MB leave
    their pages resident and the process grows by about a block per block. Called after each
    streamed step; it costs milliseconds.
    """
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018  (glibc only)
            _LIBC.mallopt  # noqa: B018
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` for the rest of the process (see the
    module docstring); True when set (glibc), False elsewhere. Costs a page fault per new large
    tensor, a few percent of a streamed run's time."""
    libc = _libc()
    M_MMAP_THRESHOLD = -3
    return bool(libc) and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


def available_memory() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (psutil elsewhere), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The model and calibration sizes of the memory model (see the module docstring)."""

    s: int
    M: int
    P_b: int
    P_l: int
    P_lin: int
    W: int
    X: int
    E: int
    H: int
    N: int
    L: int
    d: int
    d_ff: int
    heads: int
    V: int
    blocks: int

    @property
    def a(self) -> int:
        """One sample's hidden states."""
        return self.L * self.d * self.s

    def per_sample_autograd(self) -> int:
        """``T``: what autograd keeps of one sample through one block (attention scores: eager/math kernel)."""
        return self.L * (8 * self.d + 3 * self.d_ff) * self.s + 2 * self.heads * self.L ** 2 * self.s


def sizes_from_config(cfg: dict[str, Any], N: int, L: int, s: int) -> Sizes:
    """Sizes of a LLaMA-architecture model from its ``config.json`` values (for the docs' table)."""
    d, f, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hd = d // heads
    V = cfg["vocab_size"]
    layers = [(d, heads * hd), (d, kv * hd), (d, kv * hd), (heads * hd, d), (d, f), (d, f), (f, d)]
    P_l = sum(i * o for i, o in layers)
    P_b = P_l + 2 * d
    E = V * d
    H = d + V * d  # final norm and head (the same matrix as E when tied)
    M = n * P_b + E + d + (0 if cfg.get("tie_word_embeddings") else V * d)
    return Sizes(s, M, P_b, P_l, n * P_l, max(i * o for i, o in layers), sum(i * i for i, _ in layers),
                 E, H, N, L, d, f, heads, V, n)


def sizes_of(adapter: ModelAdapter, model: nn.Module, tensors: Any, N: int, L: int, s: int) -> Sizes:
    """Sizes of a weight-less (meta) model and its calibration set."""
    blocks = list(adapter.blocks(model))
    inside = set()
    P_b = P_l = W = X = P_lin = d_ff = 0
    for block in blocks:
        names = tensors.names_in(block)
        inside.update(names)
        numel = sum(_numel(tensors.shape(n)) for n in names)
        lin = adapter.prunable(block)
        pl = sum(lay.weight.numel() for lay in lin.values())
        P_lin += pl
        if numel >= P_b:
            P_b, P_l = numel, pl
            W = max(lay.weight.numel() for lay in lin.values()) if lin else 0
            X = sum(lay.in_features ** 2 for lay in lin.values())
            d_ff = max((max(lay.in_features, lay.out_features) for lay in lin.values()), default=0)
    cfg = getattr(model, "config", None)
    d = int(getattr(cfg, "hidden_size", 0) or 0)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    input_side = {n for m in model.modules() if id(m) not in in_blocks and m is not head for n in tensors.owner_names(m)}
    E = sum(_numel(tensors.shape(n)) for n in input_side)  # a tied head counts here too: capture reads it
    H = sum(_numel(tensors.shape(n)) for n in (tensors.owner_names(head) if head is not None else [])) or E
    V = int(getattr(cfg, "vocab_size", 0) or 0)
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    M = sum(_numel(tensors.shape(n)) for n in tensors.stored)
    return Sizes(s, M, P_b, P_l, P_lin, W, X, E, H, N, L, d, d_ff, heads, V, len(blocks))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def streamed_fixed(z: Sizes, gradients: int, gram: bool) -> dict[str, int]:
    """Resident bytes of each streamed step besides the activations and the runtime."""
    out = {
        "capture": z.E * z.s,
        "gradient forward": z.P_b * z.s if gradients else 0,
        "head": z.H * z.s + 4 * z.L * z.V * 4 if gradients else 0,
        "gradient backward": (z.P_b * z.s + gradients * z.P_l * 4 + 2 * z.W * 4 + z.per_sample_autograd()
                              if gradients else 0),
        "prune": z.P_b * z.s + 29 * z.W + (z.X * 4 if gram else 0),
    }
    return out


def streamed_peak(z: Sizes, gradients: int, gram: bool, budget: int | None = None) -> dict[str, int]:
    """Resident bytes of each streamed step with the activations (capped at ``budget``), without the runtime."""
    acts = {"capture": z.N * z.a, "gradient forward": 2 * z.N * z.a, "head": z.N * z.a,
            "gradient backward": 3 * z.N * z.a, "prune": 2 * z.N * z.a}
    if gradients:  # the kept inputs of the blocks not yet back-propagated
        acts["gradient forward"] += (z.blocks - 1) * z.N * z.a
        acts["head"] += (z.blocks - 1) * z.N * z.a
        acts["gradient backward"] += max(z.blocks - 2, 0) * z.N * z.a
    fixed = streamed_fixed(z, gradients, gram)
    return {k: v + (acts[k] if budget is None else min(acts[k], budget)) for k, v in fixed.items()}


def in_memory_peak(z: Sizes, gradients: int, gram: bool) -> int:
    """Resident bytes of the in-memory path (whole model), without the runtime."""
    model = z.M * z.s
    grad = (gradients * z.P_lin * 4 + 2 * z.W * 4 + z.blocks * z.per_sample_autograd() + 4 * z.L * z.V * 4
            if gradients else 0)
    prune = 3 * z.N * z.a + 29 * z.W + (z.X * 4 if gram else 0)
    return model + max(grad, prune)


def activation_budget(z: Sizes, gradients: int, gram: bool, max_memory: int | None, runtime: int) -> int:
    """Bytes of activations kept in memory: what ``max_memory`` leaves after the largest fixed step.

    Raises:
        OptionError: ``max_memory`` cannot hold the largest step even with every activation on disk.
    """
    fixed = max(streamed_fixed(z, gradients, gram).values())
    if max_memory is None:
        avail = available_memory()
        return int(ACTIVATION_SHARE * avail) if avail else 1 << 62
    left = int(max_memory * (1 - MARGIN)) - runtime - fixed
    need = 4 * z.a  # a few samples' hidden states, live while one sample is processed
    if left < need:
        raise OptionError(f"--max-memory {fmt(max_memory)} is too small for this model: the runtime takes "
                          f"{fmt(runtime)} and the largest streamed step {fmt(fixed)} (one block plus its "
                          f"workspace, see docs/howto/large-models.md); give at least "
                          f"{fmt((runtime + fixed + need) / (1 - MARGIN))}")
    return left
