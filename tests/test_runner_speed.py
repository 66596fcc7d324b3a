"""What keeps the runner near its floor and host memory near the model's bytes, checked on the CPU:
statistics folded once per distinct input, the error report's few samples, blocks written back
into the tensors they rested in."""

from __future__ import annotations

import torch

import compresskit
from compresskit.engine import runner
from compresskit.engine.device import resting_tensors, return_to

RUN = dict(adapter="llama", model="random:tiny", nsamples=6, seqlen=32, seed=0, device="cpu", progress=False)


def _spy_collect(monkeypatch) -> list[dict]:
    seen = []
    real = runner._collect

    def spy(step, group, specs, accumulate="float32"):
        out = real(step, group, specs, accumulate)
        seen.append(out)
        return out

    monkeypatch.setattr(runner, "_collect", spy)
    return seen


def test_layers_reading_one_input_share_one_set_of_statistics(monkeypatch):
    seen = _spy_collect(monkeypatch)
    compresskit.prune(**RUN, metric="sparsegpt")
    parts = seen[0]
    q, k, v = (parts[f"self_attn.{n}_proj"] for n in "qkv")
    gate, up = parts["mlp.gate_proj"], parts["mlp.up_proj"]
    assert q is k is v and gate is up and q is not gate
    assert parts["self_attn.o_proj"] is not q and parts["mlp.down_proj"] is not gate
    assert int(q["counts"]["samples"]) == 6 and int(q["counts"]["tokens"]) == 6 * 32


def test_shared_statistics_equal_those_of_each_layer_alone():
    """The Gram matrix of q (shared with k and v) is X^T X of the attention input, summed per sample."""
    from compresskit.engine.walk import walk_blocks

    res = compresskit.prune(**RUN, metric="magnitude", sparsity=0.0, report_error=False)
    adapter, model = res.adapter, res.model
    batches = adapter.calibration_batches(res.loaded, 6, 32, 0, "random")
    want = torch.zeros(64, 64)
    for step in walk_blocks(adapter, model, batches, torch.device("cpu")):
        got = runner._collect(step, list(step.layers), [compresskit.stats.Gram()])
        step.forward({"self_attn.k_proj": lambda x, n: want.addmm_(x.t(), x)})
        assert torch.equal(got["self_attn.q_proj"]["gram"]["xtx"], want)
        break


def test_error_report_reads_a_full_gram_only_where_it_is_collected_anyway():
    few = compresskit.prune(**{**RUN, "nsamples": 8}, metric="wanda")
    full = compresskit.prune(**{**RUN, "nsamples": 8}, metric="sparsegpt")
    assert few.report.error_samples == runner.ERROR_SAMPLES == 4 and few.manifest["report"]["error_samples"] == 4
    assert full.report.error_samples is None
    assert all(r.error is not None and 0 < r.error < 1 for r in few.report.layers + full.report.layers)


def test_error_report_on_the_first_samples_equals_a_run_on_those_samples_alone():
    """The errors come from the first 4 samples: a wanda run on 8 samples reports the errors that a
    Gram of its first 4 samples gives (recomputed here from the pruned and dense weights)."""
    from compresskit.ops import reconstruction_error

    dense = compresskit.prune(**RUN, metric="magnitude", sparsity=0.0, report_error=False).model
    res = compresskit.prune(**{**RUN, "nsamples": 8}, metric="wanda")
    adapter = res.adapter
    batches = adapter.calibration_batches(res.loaded, 8, 32, 0, "random")[:4]
    from compresskit.engine.walk import walk_blocks

    grams = {}
    for step in walk_blocks(adapter, dense, batches, torch.device("cpu")):  # dense block 0: its inputs are the same
        g = torch.zeros(64, 64)
        step.forward({"self_attn.q_proj": lambda x, n: g.addmm_(x.t(), x)})
        grams = {"self_attn.q_proj": g}
        break
    row = next(r for r in res.report.layers if r.block == 0 and r.name == "self_attn.q_proj")
    w_dense = adapter.blocks(dense)[0].self_attn.q_proj.weight.detach().float()
    w_pruned = adapter.blocks(res.model)[0].self_attn.q_proj.weight.detach().float()
    assert abs(row.error - reconstruction_error(w_dense, w_pruned, grams["self_attn.q_proj"])) < 1e-9


def test_a_block_returns_into_the_tensors_it_rested_in():
    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    block.register_buffer("scale", torch.ones(3))
    rest = resting_tensors(block)
    assert len(rest) == 5
    for p in block.parameters():  # as if it came back from the GPU: new storage, new values
        p.data = p.data * 2 + 1
    block.scale = block.scale * 3
    want = {(id(m), key): getattr(m, kind)[key].detach().clone() for m, kind, key, _ in rest}
    return_to(block, rest, torch.device("cpu"))
    for m, kind, key, home in rest:
        now = getattr(m, kind)[key]
        assert now.data_ptr() == home.data_ptr() and torch.equal(now.detach(), want[(id(m), key)]), key
