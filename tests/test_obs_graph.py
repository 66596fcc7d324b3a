"""The OBS sweep's CUDA graph path (compresskit.obs_graph): on the CPU with a stand-in capture (the
plumbing: static buffers in and out, partial blocks, fallbacks), on CUDA with real graphs."""

from __future__ import annotations

import logging

import pytest
import torch

from compresskit import obs, obs_graph
from compresskit_plugins.patterns.nm import NMPattern


@pytest.fixture(autouse=True)
def fresh_graphs():
    obs_graph.clear()
    yield
    obs_graph.clear()


def _layer(rows=24, cols=200, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g)
    w = torch.randn(rows, cols, generator=g)
    wd, fac = obs._prepare(w, x.t() @ x, 0.01, 4)
    mask = torch.rand(rows, cols, generator=g) < 0.5
    return wd.to(device), fac.u.to(device), mask.to(device)


def _select(sal, s):
    return obs.block_threshold_mask(sal, s)


def _choose(cols, d):
    return obs.block_threshold_mask(obs.obs_saliency(cols, d), 0.5)


def _sweeps(w, u, mask):
    """Fixed mask, unstructured selection and 2:4: (new weights, mask) of each (blocks of 64; 200
    columns leave a partial last block)."""
    nm = NMPattern().mask
    return [obs.obs_sweep(w, u, 64, mask=mask),
            obs.obs_sweep(w, u, 64, choose=_choose),
            obs.obs_sweep(w, u, 64, choose=lambda c, d: nm(obs.obs_saliency(c, d), 0.5), stride=4)]


def _on_cpu(monkeypatch, capture):
    monkeypatch.setattr(obs_graph, "enabled", lambda device: True)
    monkeypatch.setattr(obs_graph, "cuda_capture", capture)


def test_replayed_blocks_give_the_column_loops_values(monkeypatch):
    w, u, mask = _layer()
    want = _sweeps(w, u, mask)
    replays = []

    def capture(body):
        return lambda: (replays.append(1), body())

    _on_cpu(monkeypatch, capture)
    got = _sweeps(w, u, mask)
    for (gw, gm), (ww, wm) in zip(got, want):
        assert torch.equal(gw, ww) and torch.equal(gm, wm)
    # 3 full blocks per sweep, fixed mask and unstructured only (2:4 selects inside the block), plus
    # one test replay when the graph was made
    assert len(replays) == 1 + 3 + 3
    assert obs_graph.captured() == {"64x24": True}


def test_a_failed_capture_leaves_the_column_loop_once(monkeypatch, caplog):
    w, u, mask = _layer()
    want = _sweeps(w, u, mask)
    calls = []

    def capture(body):
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    _on_cpu(monkeypatch, capture)
    caplog.set_level(logging.WARNING, logger="compresskit")
    for _ in range(2):
        for (gw, gm), (ww, wm) in zip(_sweeps(w, u, mask), want):
            assert torch.equal(gw, ww) and torch.equal(gm, wm)
    assert len(calls) == 1 and "could not capture a CUDA graph for blocks of 64 x 24" in caplog.text


def test_a_graph_that_differs_from_the_column_loop_is_not_used(monkeypatch, caplog):
    w, u, mask = _layer()
    want = _sweeps(w, u, mask)

    def capture(body):
        return lambda: (body(), body())  # sweeps the buffer twice: not the loop's values

    _on_cpu(monkeypatch, capture)
    caplog.set_level(logging.WARNING, logger="compresskit")
    for (gw, gm), (ww, wm) in zip(_sweeps(w, u, mask), want):
        assert torch.equal(gw, ww) and torch.equal(gm, wm)
    assert "differs from the column loop on a test block" in caplog.text
    assert obs_graph.captured() == {"64x24": False}


def test_the_switch(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.delenv(obs_graph.ENV, raising=False)
    assert obs_graph.enabled(cuda) and not obs_graph.enabled(cpu)
    monkeypatch.setenv(obs_graph.ENV, "0")
    assert not obs_graph.enabled(cuda)
    monkeypatch.setenv(obs_graph.ENV, "1")
    assert obs_graph.enabled(cuda) and not obs_graph.enabled(cpu)
    monkeypatch.setenv(obs_graph.ENV, "yes")
    with pytest.raises(ValueError, match=r"COMPRESSKIT_CUDA_GRAPHS='yes': expected auto, 0 or 1"):
        obs_graph.enabled(cuda)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_graphs_give_the_column_loops_values(monkeypatch, dtype):
    w, u, mask = _layer(rows=256, cols=512, device="cuda")
    w, u = w.to(dtype), u.to(dtype)
    monkeypatch.setenv(obs_graph.ENV, "0")
    want = _sweeps(w, u, mask)
    monkeypatch.setenv(obs_graph.ENV, "1")
    got = _sweeps(w, u, mask)
    assert obs_graph.captured() == {"64x256": True}  # captured, and matched its test block
    for (gw, gm), (ww, wm) in zip(got, want):
        assert torch.equal(gw, ww) and torch.equal(gm, wm)
