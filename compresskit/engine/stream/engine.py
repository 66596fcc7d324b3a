"""The streamed run: plan, read the checkpoint block by block, prune, write the output's shards.

:func:`prune` is what :func:`compresskit.prune` does for a run with ``max_memory``, a
``work_dir`` or ``resume`` (or a model that does not fit): the model is instantiated on the
meta device, gradient statistics come from :mod:`compresskit.engine.stream.grads`, and the ordinary
runner (:func:`compresskit.engine.runner.prune_model`) walks the blocks through the
:class:`~compresskit.engine.stream.session.Streamed` residency, which reads each block from the
checkpoint and writes it, pruned, as one shard of the output. A ``block_done`` hook records
each finished block in the work directory; ``resume`` continues from the last one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compresskit import hookimpl
from compresskit.engine.device import peak_memory
from compresskit.engine.planning import PruneResult
from compresskit.errors import CompressKitError, OptionError
from compresskit.run import LayerReport, PruneReport
from compresskit.engine.stream import memory, tensorfile
from compresskit.engine.stream.activations import ActivationStore, Activations, Inputs
from compresskit.engine.stream.checkpoint import INDEX, Checkpoint, ModelTensors

if TYPE_CHECKING:
    from compresskit.config import RunConfig
    from compresskit.engine.registry import Registry
    from compresskit.run import Run
    from compresskit.engine.stream.session import Session

log = logging.getLogger(__name__)

SUPPORT = ("checkpoint_dir", "load_empty", "save_extras")
"""Adapter methods a streamed run needs (``head_loss`` is optional; see docs/howto/large-models.md)."""

NOT_IN_FINGERPRINT = ("progress", "resume", "work_dir", "max_memory", "evaluate", "eval_data", "eval_limit",
                      "eval_tasks")
"""RunConfig fields that do not change the result (a run may resume with other values)."""


def supports(adapter: Any) -> bool:
    return all(callable(getattr(adapter, m, None)) for m in SUPPORT)


def check(config: RunConfig, registry: Registry | None = None) -> dict[str, Any]:
    """The dry run of a streamed run (nothing but the checkpoint's headers is read)."""
    p, run, _ = _start(config, registry)
    blocks = p.adapter.blocks(run.model)
    return {"layers": sum(len(p.adapter.prunable(b)) for b in blocks), "blocks": len(blocks),
            "pattern": p.pattern.name, "sparsity": p.sparsity}


def _start(config: RunConfig, registry: Registry | None):
    from compresskit.engine.planning import plan
    from compresskit.engine.device import compute_device

    p = plan(config, registry)
    if config.evaluate or config.eval_tasks:
        raise OptionError("--eval and --eval-tasks need the whole model in memory, which a streamed run (--max-memory, "
                          "--work-dir, --resume) avoids; evaluate the saved output afterwards: compresskit eval OUTPUT")
    if config.select is not None:
        raise OptionError("--select prunes several times and keeps the best model in memory, which a streamed run "
                          "avoids; select on a model that fits, or drop --max-memory/--work-dir/--resume")
    from compresskit.interfaces import Allocation

    if p.allocation is not None and type(p.allocation).prepare is not Allocation.prepare:
        raise OptionError(f"allocation {p.allocation.name!r} walks the dense model in a pre-pass before pruning, which "
                          "a streamed run does not hold in memory; use --allocation uniform or a --sparsity-map, or "
                          "run without --max-memory/--work-dir/--resume")
    if not supports(p.adapter):
        raise CompressKitError(f"adapter {p.adapter.name!r} cannot stream (it lacks {', '.join(SUPPORT)}); run "
                               "without --max-memory/--work-dir/--resume")
    source = p.adapter.resolve_source(config.model)
    checkpoint = Checkpoint(p.adapter.checkpoint_dir(source))
    loaded = p.adapter.load_empty(checkpoint.directory, source)
    device = compute_device(config.device)  # a streamed run is a single process
    run = p.new_run(loaded, device)
    p.check_run(run)
    return p, run, checkpoint


def prune(config: RunConfig, registry: Registry | None = None):
    """Prune block by block from the checkpoint (see the module docstring); returns a :class:`StreamedResult`."""
    import torch

    from compresskit.engine.planning import _manifest
    from compresskit.cache import cache_dir, tensor_fingerprint
    from compresskit.engine.runner import needed_statistics
    from compresskit.engine.stream import grads
    from compresskit.engine.stream.session import Session
    from compresskit.engine.stream.workdir import WorkDir

    t0 = time.perf_counter()
    p, run, checkpoint = _start(config, registry)
    adapter, loaded = p.adapter, run.loaded
    calibration = config.calibration or adapter.default_calibration(loaded.source)
    run.batches = run.placement.to_rest(
        adapter.calibration_batches(loaded, config.nsamples, config.seqlen, config.seed, calibration))
    data_fp = tensor_fingerprint(run.batches)
    facts = _facts(config, p, run, checkpoint, data_fp)
    owned = config.work_dir is None
    where = Path(config.work_dir) if config.work_dir else cache_dir() / "work" / tensor_fingerprint(facts)[:16]
    work = WorkDir(where, facts, config.resume, owned=owned)
    try:
        dtype = getattr(torch, getattr(adapter.options, "dtype", "float32"))
        tensors = ModelTensors(loaded.model, checkpoint, dtype)
        specs = needed_statistics(run)
        n_grads = sum(1 for s in specs if s.source == "gradients")
        gram = any(s.name in ("gram", "error_gram") for s in specs)  # the error report's is as large
        z = memory.sizes_of(adapter, loaded.model, tensors, len(run.batches), config.seqlen,
                            torch.empty((), dtype=dtype).element_size())
        limit = memory.parse_size(config.max_memory) if config.max_memory else None
        memory.return_freed_memory()  # the memory model counts live tensors: freed must mean returned
        memory.trim()
        runtime = memory.current_rss()
        budget = memory.activation_budget(z, n_grads, gram, limit, runtime)
        store = ActivationStore(work.acts, budget)
        s = Session(adapter, loaded, tensors, run.settings.device, store, work, config.progress)
        work.note_resume()
        manifest = _manifest(config, p, run, calibration, data_fp)
        if p.gradient_stats:
            import_path = config.gradient_options.get("import_path")
            run.gradients, manifest["gradients"] = grads.obtain(s, run.batches, p.gradient_stats, import_path)
        if work.progress.get("phase") != "done":
            _prune(s, run)
            _finish(s, run)
        _restore(run, work.progress)
        manifest["report"] = run.report.to_dict()
        manifest["notes"] = run.notes
        manifest["streaming"] = {
            "work_dir": str(work.path), "max_memory": limit, "runtime_rss": runtime, "activation_budget": budget,
            "activations_peak_in_memory": store.peak, "activations_spilled": store.spilled,
            "activations_persisted": store.persisted, "checkpoint_bytes_read": checkpoint.counter.bytes,
            "work_dir_bytes_read": store.counter.bytes, "work_dir_bytes_written": store.counter.written,
            "resumed": work.progress.get("resumes", []),
            "memory_model": {k: v for k, v in memory.streamed_peak(z, n_grads, gram, budget).items()},
        }
        manifest["total_seconds"] = time.perf_counter() - t0
        manifest["device_peak_bytes"] = peak_memory(run.settings.device)  # GPU memory; None on the CPU
    except BaseException:
        work.close()
        raise
    return StreamedResult(loaded, adapter, run.report, manifest, run, work=work)


def _facts(config: RunConfig, p: Any, run: Run, checkpoint: Checkpoint, data_fp: str) -> dict[str, Any]:
    """What identifies the run's result (compared key by key on resume)."""
    from compresskit.options import as_dict

    return {
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_IN_FINGERPRINT},
        "resolved": {k: as_dict(v.options) for k, v in p.plugins.items()},
        "checkpoint": {"path": str(checkpoint.directory), "files": checkpoint.identity()},
        "calibration": data_fp,
        "device": str(run.settings.device.type),
        "versions": _versions(),
    }


def _prune(s: Session, run: Run) -> None:
    """The runner over streamed blocks, from the recorded block on; each finished block is committed."""
    from compresskit.interfaces import Solver
    from compresskit.engine.runner import needed_statistics, prune_model

    work, st = s.work, s.work.progress
    blocks = s.blocks
    if st.get("phase") == "prune":
        _restore(run, st)
        run.start_block = st.get("next", 0)
    specs = [x for x in needed_statistics(run) if x.source in ("inputs", "block_gradients")]
    block_solver = run.solver is not None and type(run.solver).solve_block is not Solver.solve_block
    if (specs or block_solver) and run.start_block < len(blocks):
        hidden, ctx = s.capture(run.batches)
        if run.start_block:
            del hidden
            hidden = s.store.open(st["inputs"]).to(s.device)
        run.inputs = Inputs(hidden, ctx)

    def write(i: int, tensors: dict) -> None:
        tensorfile.write(work.model / shard_name(i, len(blocks)), tensors, counter=s.store.counter)

    run.residency = s.residency(write)
    keeper = _Checkpointer(s, len(blocks))
    run.pm.register(keeper)
    try:
        prune_model(run)
    finally:
        run.pm.unregister(keeper)
        run.residency = None


class _Checkpointer:
    """``block_done``: persist the next block's inputs, then commit the block (first of all hooks)."""

    def __init__(self, s: Session, n_blocks: int) -> None:
        self.s, self.n = s, n_blocks

    @hookimpl(tryfirst=True)
    def block_done(self, run: Run, block_index: int) -> None:
        hidden = getattr(run.inputs, "hidden", None)
        last = block_index == self.n - 1
        if isinstance(hidden, Activations) and not last:
            hidden.persist()
        name = hidden.name if isinstance(hidden, Activations) and not last else None
        self.s.work.commit(phase="prune", next=block_index + 1, inputs=name, **_state(run))
        self.s.work.keep_only({name} if name else set())


def _state(run: Run) -> dict[str, Any]:
    rep = run.report
    return {"report": {"layers": [dataclasses.asdict(r) for r in rep.layers], "block_seconds": rep.block_seconds,
                       "capture_seconds": rep.capture_seconds},
            "targets": run.targets, "notes": run.notes}


def _restore(run: Run, st: dict[str, Any]) -> None:
    rep = st.get("report")
    if not rep:
        return
    layers = [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in rep["layers"]]
    seconds = run.report.seconds
    run.report = PruneReport(layers, list(rep["block_seconds"]), rep["capture_seconds"], seconds)
    run.targets = dict(st.get("targets", {}))
    run.notes = dict(st.get("notes", {}))


def shard_name(i: int, n_blocks: int) -> str:
    """File of block ``i`` (``i == n_blocks``: everything outside the blocks)."""
    return f"model-{i + 1:05d}-of-{n_blocks + 1:05d}.safetensors"


def _finish(s: Session, run: Run) -> None:
    """The rest shard (embeddings, norm, head; copied in chunks), the index, config and tokenizer."""
    import json

    from compresskit.cache import atomic_write

    blocks = s.blocks
    n = len(blocks)
    tensors = s.tensors
    weight_map, inside = {}, set()
    for i, block in enumerate(blocks):
        for name in tensors.names_in(block):
            weight_map[name] = shard_name(i, n)
            inside.add(name)
    rest = {name: tensorfile.Lazy(tensors.out_dtype(name), tensors.shape(name), lambda name=name: tensors.chunked(name))
            for name in tensors.stored if name not in inside}
    tensorfile.write(s.work.model / shard_name(n, n), rest, counter=s.store.counter)
    weight_map.update({name: shard_name(n, n) for name in rest})
    sizes = [memory._numel(tensors.shape(k)) for k in weight_map]
    total = sum(k * _itemsize(tensors.out_dtype(name)) for k, name in zip(sizes, weight_map))
    index = {"metadata": {"total_parameters": sum(sizes), "total_size": total},
             "weight_map": dict(sorted(weight_map.items()))}
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    atomic_write(s.work.model / INDEX, lambda tmp: tmp.write_text(text))
    s.adapter.save_extras(s.loaded, s.work.model)
    s.work.commit(phase="done", **_state(run))


def _itemsize(dtype: Any) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    from compresskit._version import __version__

    out: dict[str, str | None] = {"compresskit": __version__}
    for dist in ("torch", "transformers"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link (or copy, across file systems) every file of ``src`` into ``dst``."""
    for f in sorted(src.iterdir()):
        target = dst / f.name
        if f.is_dir():
            target.mkdir()
            _link_tree(f, target)
            continue
        try:
            os.link(f, target)
        except OSError:
            shutil.copyfile(f, target)


@dataclasses.dataclass
class StreamedResult(PruneResult):
    """A streamed run's result: the pruned model is in the work directory, not in memory.

    ``save(dir)`` links (or copies) the shards, index, config and tokenizer into ``dir`` with
    the manifest, atomically; a work directory compresskit chose is deleted afterwards. Load
    the saved output with ``from_pretrained`` (or ``compresskit eval``) where it fits.
    """

    work: Any = None

    @property
    def model(self):
        raise CompressKitError("a streamed run keeps no model in memory; save() the result and load the output "
                               "directory with from_pretrained where it fits")

    def _write_dense(self, tmp: Path) -> None:
        _link_tree(self.work.model, tmp)

    def save(self, directory: str | os.PathLike, overwrite: bool = False, format: str = "dense",
             progress: bool = True) -> Path:
        """Write the output (``format`` as :meth:`compresskit.api.PruneResult.save`) and release the work directory."""
        path = super().save(directory, overwrite=overwrite, format=format, progress=progress)
        if self.work.owned:
            self.work.remove()
        else:
            self.work.close()
        return path
