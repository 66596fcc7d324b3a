"""Prefetching the next block (compresskit.engine.prefetch): the same results, the same resting tensors.

On CUDA the walk copies block ``i + 1`` to the GPU in a worker thread while block ``i`` computes.
``$COMPRESSKIT_PREFETCH=1`` runs the same path on the CPU (the worker copies without a stream),
so these tests exercise every line of it without a GPU; the ``cuda`` test compares it on a GPU.
"""

from __future__ import annotations

import threading

import pytest
import torch

import compresskit
from compresskit.engine import prefetch
from compresskit.engine.prefetch import PREFETCH_ENV, Prefetcher, wanted
from compresskit.engine.walk import Residency, walk_blocks
from device_matrix import config


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _tiny():
    from compresskit_plugins.adapters.llama import LlamaAdapter

    adapter = LlamaAdapter()
    return adapter, adapter.load("random:tiny").model


def _prune(monkeypatch, value: str, *combo: str, **kw):
    monkeypatch.setenv(PREFETCH_ENV, value)
    return compresskit.prune(**config(*combo, "cpu"), model="random:tiny", **kw)


def test_the_default_prefetches_only_from_the_host_to_a_gpu(monkeypatch):
    monkeypatch.delenv(PREFETCH_ENV, raising=False)
    assert wanted("cuda", "cpu") and not wanted("cpu", "cpu") and not wanted("cuda", "cuda")
    monkeypatch.setenv(PREFETCH_ENV, "0")
    assert not wanted("cuda", "cpu")
    monkeypatch.setenv(PREFETCH_ENV, "1")
    assert wanted("cpu", "cpu")
    monkeypatch.setenv(PREFETCH_ENV, "sometimes")
    with pytest.raises(ValueError, match="COMPRESSKIT_PREFETCH.*auto, 0 or 1"):
        wanted("cpu", "cpu")


@pytest.mark.parametrize("combo", [("wanda", "unstructured", "none", "uniform"),
                                   ("sparsegpt", "2:4", "none", "uniform"),
                                   ("gblm", "unstructured", "ro", "owl")], ids=lambda c: "-".join(c))
def test_prefetching_changes_no_result(combo, monkeypatch, strict_devices):
    """Weights after the run equal those of a run without prefetching, in the strict device mode,
    and every block but the first was installed from its prefetched copies."""
    installed = []
    real = Prefetcher.install

    def spy(self, index, block):
        ok = real(self, index, block)
        installed.append((index, ok))
        return ok

    plain = _weights(_prune(monkeypatch, "0", *combo).model)
    monkeypatch.setattr(Prefetcher, "install", spy)
    result = _prune(monkeypatch, "1", *combo)
    got = _weights(result.model)
    assert plain.keys() == got.keys() and all(torch.equal(plain[k], got[k]) for k in plain)
    blocks = len(result.adapter.blocks(result.model))
    pruning = [ok for i, ok in installed[-blocks:]]  # the last walk is the pruning walk (OWL walks before it)
    assert pruning == [False] + [True] * (blocks - 1)


def test_blocks_go_back_into_the_tensors_they_rested_in(monkeypatch):
    """A prefetched block is a copy; leaving writes it back into the resting tensors (a model in a
    memory-mapped file keeps its pages), so after the walk every parameter has its old storage."""
    monkeypatch.setenv(PREFETCH_ENV, "1")
    adapter, model = _tiny()
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    want = {n: p.detach().clone() * (0.5 if n.endswith("proj.weight") else 1.0) for n, p in model.named_parameters()}
    seen = []
    for step in walk_blocks(adapter, model, None, torch.device("cpu")):
        seen.append({n: p.data_ptr() for n, p in step.block.named_parameters()})
        for layer in step.layers.values():
            layer.weight.data.mul_(0.5)
    assert any(ptr not in before.values() for ptr in seen[1].values())  # block 1 computed on its copy
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == before
    assert all(torch.equal(p, want[n]) for n, p in model.named_parameters())  # the changes were written back


@pytest.mark.parametrize("how", ["failed", "changed"])
def test_a_write_back_that_failed_or_went_stale_is_done_inline(how, monkeypatch):
    """The worker writes a leaving block back while the next one computes; if that write failed,
    or the block was changed after it left, the walk writes it inline when it settles."""
    monkeypatch.setenv(PREFETCH_ENV, "1")
    if how == "failed":
        def boom(self, pairs, event):
            raise RuntimeError("the host write failed")

        monkeypatch.setattr(prefetch.Prefetcher, "_write", boom)
    adapter, model = _tiny()
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    want = {n: p.detach().clone() * (0.5 if n.endswith("proj.weight") else 1.0) for n, p in model.named_parameters()}
    blocks = adapter.blocks(model)
    for step in walk_blocks(adapter, model, None, torch.device("cpu")):
        for layer in step.layers.values():
            layer.weight.data.mul_(0.5)
        if how == "changed" and step.index == 1:  # block 0 has left; its write-back is not settled yet
            first = next(iter(adapter.prunable(blocks[0]).values()))
            first.weight.data = torch.full_like(first.weight, 3.0)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == before
    if how == "failed":
        assert all(torch.equal(p, want[n]) for n, p in model.named_parameters())
    if how == "changed":
        assert torch.equal(next(iter(adapter.prunable(blocks[0]).values())).weight, torch.full_like(first.weight, 3.0))


def test_an_abandoned_walk_leaves_no_copy_in_flight(monkeypatch):
    monkeypatch.setenv(PREFETCH_ENV, "1")
    adapter, model = _tiny()
    residency = Residency("cpu")
    walk = walk_blocks(adapter, model, None, torch.device("cpu"), residency=residency)
    next(walk)
    assert residency.prefetcher is not None and residency.prefetcher._pending is not None
    walk.close()
    assert residency.prefetcher is None
    assert not [t for t in threading.enumerate() if t.name.startswith("compresskit-prefetch")]


def test_a_failed_copy_falls_back_to_an_inline_move(monkeypatch):
    """A copy that raised (say, out of memory) is dropped; the block is moved as without prefetching."""
    monkeypatch.setenv(PREFETCH_ENV, "1")

    def boom(self, tensors):
        raise RuntimeError("no memory for the copy")

    monkeypatch.setattr(prefetch.Prefetcher, "_copy", boom)
    combo = ("wanda", "unstructured", "none", "uniform")
    with_failures = _weights(_prune(monkeypatch, "1", *combo).model)
    monkeypatch.undo()
    plain = _weights(_prune(monkeypatch, "0", *combo).model)
    assert all(torch.equal(plain[k], with_failures[k]) for k in plain)


@pytest.mark.cuda
def test_prefetching_on_cuda_changes_no_mask(monkeypatch):
    combo = ("wanda", "unstructured", "none", "uniform")
    monkeypatch.setenv(PREFETCH_ENV, "0")
    plain = compresskit.prune(**config(*combo, "cuda"), model="random:tiny")
    monkeypatch.setenv(PREFETCH_ENV, "auto")
    fetched = compresskit.prune(**config(*combo, "cuda"), model="random:tiny")
    a, b = _weights(plain.model), _weights(fetched.model)
    assert all((a[k] == 0).equal(b[k] == 0) for k in a)
    assert all(p.device.type == "cpu" for p in fetched.model.parameters())


def test_timing_waits_for_the_compute_stream_not_the_prefetch_copies(monkeypatch):
    """The runner's per-layer and per-block waits (for honest timings) wait for the current stream
    only: a device-wide synchronize would also wait for the next block's copy at every layer."""
    from compresskit.engine import device

    waited = []

    class Stream:
        def synchronize(self):
            waited.append("current stream")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda dev=None: Stream())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: waited.append("whole device"))
    device.synchronize(torch.device("cuda", 0))
    device.synchronize(torch.device("cpu"))
    assert waited == ["current stream"]
