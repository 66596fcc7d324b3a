"""Choosing one plugin option on held-out calibration data (``--select SCOPE.KEY=v1,v2,...``).

:func:`prune_selected` prunes once per value of one ``metric``, ``update`` or ``allocation``
option (everything else as configured), scores every pruned model by its mean loss
(``adapter.loss``, the loss GBLM's gradients use: next-token cross-entropy for LLMs) on
*held-out calibration samples*, keeps the model with the lowest loss and records the whole
sweep in its manifest (``selection``). Evaluation data is never looked at.

Held-out samples come from the calibration source: the adapter's sampler is asked for
``nsamples + select_nsamples`` samples with the run's seed, and the first ``nsamples`` must be
exactly the run's calibration samples (the built-in samplers draw sequentially from one seeded
generator, so they are); the last ``select_nsamples`` are held out. A sampler without that
prefix property gets a second draw with another seed instead. Any held-out sample equal to a
calibration sample is dropped. Text windows are drawn independently, so a held-out window may
share text with a calibration window from the same document; images are distinct by
construction (a permutation prefix).

This module imports torch only inside functions.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from compresskit.errors import CompressKitError, OptionError

if TYPE_CHECKING:  # RunConfig and PruneResult are annotations only: compresskit.api and .config import this module
    from compresskit.interfaces import ModelAdapter
    from compresskit.engine.registry import Registry

log = logging.getLogger(__name__)

SCOPES = ("metric", "update", "allocation")
RESEED = 1_000_003
"""Seed offset of the fallback held-out draw (for samplers whose draws are not prefix-stable)."""


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One option and the values to try: ``scope.key=values[0],values[1],...``."""

    scope: str
    key: str
    values: tuple[str, ...]

    @property
    def option(self) -> str:
        return f"{self.scope}.{self.key}"


def parse(spec: str) -> Sweep:
    """``"metric.alpha=0,1,10"`` -> :class:`Sweep`; :class:`OptionError` names the problem and the fix."""
    if not isinstance(spec, str):
        raise OptionError(f"select must be a string SCOPE.KEY=v1,v2,..., got {spec!r}")
    key, sep, values = spec.partition("=")
    scope, dot, name = key.strip().partition(".")
    vals = tuple(v.strip() for v in values.split(",")) if sep else ()
    if not sep or not dot or not name or scope not in SCOPES or not vals or any(not v for v in vals):
        raise OptionError(f"--select {spec!r}: expected SCOPE.KEY=v1,v2,... with SCOPE one of {', '.join(SCOPES)}, "
                          "e.g. --select metric.alpha=0,1,10,100,1000")
    if len(set(vals)) != len(vals):
        raise OptionError(f"--select {spec!r} lists a value twice; give each value once")
    return Sweep(scope, name.strip(), vals)


def with_value(config: RunConfig, sweep: Sweep, value: str) -> RunConfig:
    """``config`` without selection, with ``sweep``'s option set to ``value``."""
    field = f"{sweep.scope}_options"
    opts = {**getattr(config, field), sweep.key: value}
    return dataclasses.replace(config, select=None, evaluate=False, eval_tasks=(), **{field: opts})


def _same_batch(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(
        isinstance(a[k], torch.Tensor) and isinstance(b[k], torch.Tensor) and a[k].shape == b[k].shape
        and torch.equal(a[k], b[k]) for k in a)


def holdout_batches(adapter: ModelAdapter, loaded: Any, config: RunConfig, calibration: str | None,
                    used: Sequence[dict]) -> tuple[list[dict], dict[str, Any]]:
    """Held-out calibration batches disjoint from ``used`` (see the module docstring) and facts about them."""
    from compresskit.engine.device import to_rest

    n, k = len(used), config.select_nsamples  # calibration data rests on the CPU, like the run's batches
    draw = to_rest(adapter.calibration_batches(loaded, n + k, config.seqlen, config.seed, calibration))
    if len(draw) == n + k and all(_same_batch(a, b) for a, b in zip(draw[:n], used)):
        extra, how = draw[n:], f"samples {n}..{n + k - 1} of the calibration sampler's draw with seed {config.seed}"
    else:
        extra = to_rest(adapter.calibration_batches(loaded, k, config.seqlen, config.seed + RESEED, calibration))
        how = f"a separate draw with seed {config.seed + RESEED} (the sampler's draws are not prefix-stable)"
    held = [b for b in extra if not any(_same_batch(b, c) for c in used)]
    if not held:
        raise CompressKitError(f"no held-out calibration sample is distinct from the {n} calibration samples; use a "
                               "larger calibration source or fewer --nsamples")
    from compresskit.cache import tensor_fingerprint

    return held, {"source": calibration, "nsamples": len(held), "how": how,
                  "dropped_as_duplicates": len(extra) - len(held), "fingerprint": tensor_fingerprint(held)}


def heldout_loss(adapter: ModelAdapter, model: Any, batches: Sequence[dict], device: Any) -> float:
    """Mean ``adapter.loss`` over ``batches`` (no gradients), on ``device``; the model goes back after."""
    import torch

    from compresskit.engine.device import Placement, host_float

    place = Placement(device)
    with place.whole_model(model), adapter.run_context(model), torch.no_grad():
        total = None
        for b in batches:  # summed on the device in order; one host read at the end
            loss = adapter.loss(model, place.to_compute(b)).double()
            total = loss if total is None else total + loss
    return host_float(total) / len(batches)


def prune_selected(config: RunConfig, registry: Registry | None, plan: Callable[..., Any],
                   prune: Callable[..., PruneResult], evaluate: Callable[[RunConfig, PruneResult], None]) -> PruneResult:
    """Prune once per value of ``config.select``, keep the lowest held-out loss (module docstring).

    ``plan``, ``prune`` and ``evaluate`` are :mod:`compresskit.api`'s (passed in: the API calls this
    module, not the other way round); ``evaluate(config, best)`` adds the chosen model's evaluation.
    """
    from compresskit.interfaces import ModelAdapter
    from compresskit.engine.kinds import BY_FIELD

    from compresskit.engine.registry import Registry

    registry = registry or Registry.from_entrypoints()
    sweep = parse(config.select)
    configs = [with_value(config, sweep, v) for v in sweep.values]
    plans = [plan(c, registry) for c in configs]  # every value validated before any work
    adapter = plans[0].adapter
    if type(adapter).loss is ModelAdapter.loss:
        raise CompressKitError(f"--select scores models by their loss, but adapter {adapter.name!r} defines no loss")
    if config.calibration is not None and config.calibration == config.eval_data:
        log.warning("--select: calibration and evaluation data are both %r; the held-out samples come from it",
                    config.calibration)
    field = BY_FIELD[sweep.scope].field
    rows, best, best_loss, held, info = [], None, math.inf, None, None
    for value, cfg in zip(sweep.values, configs):
        t0 = time.perf_counter()
        result = prune(cfg, registry)
        if held is None:
            calibration = cfg.calibration or result.adapter.default_calibration(result.loaded.source)
            held, info = holdout_batches(result.adapter, result.loaded, cfg, calibration, result.run.batches)
        loss = heldout_loss(result.adapter, result.loaded.model, held, result.run.settings.device)
        resolved = result.manifest["resolved"][f"{field}_options"].get(sweep.key, value)
        rows.append({"value": resolved, "heldout_loss": loss, "overall_sparsity": result.report.overall_sparsity,
                     "seconds": time.perf_counter() - t0})
        log.info("--select %s=%s: held-out loss %.5f", sweep.option, resolved, loss)
        if math.isfinite(loss) and loss < best_loss:
            best, best_loss = result, loss
        del result
    if best is None:
        raise CompressKitError(f"every value of {sweep.option} gave a non-finite held-out loss: "
                               + ", ".join(f"{r['value']}: {r['heldout_loss']}" for r in rows))
    chosen = next(r["value"] for r in rows if r["heldout_loss"] == best_loss)
    best.manifest["config"] = dataclasses.asdict(config)
    best.manifest["selection"] = {"option": sweep.option, "chosen": chosen, "heldout_loss": best_loss,
                                  "criterion": "mean adapter loss on held-out calibration samples (lower is better)",
                                  "holdout": info, "sweep": rows}
    if config.evaluate or config.eval_tasks:
        evaluate(config, best)
    return best


def describe(selection: dict[str, Any]) -> str:
    """The sweep as text lines (for the CLI summary)."""
    lines = [f"selected {selection['option']}={selection['chosen']} by held-out calibration loss "
             f"({selection['holdout']['nsamples']} samples):"]
    for r in selection["sweep"]:
        mark = "  <- chosen" if r["value"] == selection["chosen"] else ""
        lines.append(f"  {selection['option']}={r['value']}: loss {r['heldout_loss']:.5f}, "
                     f"sparsity {r['overall_sparsity']:.4f}, {r['seconds']:.1f}s{mark}")
    return "\n".join(lines)
