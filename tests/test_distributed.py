"""Data-parallel calibration: 2 gloo ranks on the CPU give the single-process statistics and masks.

Ranks are forked from the test process (``distributed_harness``), one thread each; the
single-process reference runs the same way with ``world=1`` so that both see the same
threading. ``test_torchrun_cli`` (slow) runs the real launcher.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

import compresskit.api  # noqa: F401 - imported before forking, so ranks start in milliseconds
import transformers.models.llama.modeling_llama  # noqa: F401
from compresskit.engine import distributed
from compresskit.errors import CompressKitError, DistributedError
import hang
from distributed_harness import launch

TINY = dict(adapter="llama", model="random:tiny", nsamples=8, seqlen=32, seed=0, device="cpu", progress=False)


def _prune(rank: int, overrides: dict) -> dict:
    """Prune on this rank, recording each group's summed statistic parts (every rank) and each
    layer's finished statistics as its metric sees them (the rank that decides the layer)."""
    from compresskit import api
    from compresskit.engine import runner
    from compresskit.stats import leaves

    parts, finished = {}, {}
    collect, layer_stats = runner._collect, runner.layer_stats

    def spy_collect(step, group, specs, accumulate="float32"):
        out = collect(step, group, specs, accumulate)
        for name, tree in out.items():
            parts[f"{step.index}.{name}"] = {k: v.clone() for k, v in leaves(tree)}
        return out

    def spy_stats(run, i, name, layer_parts, specs):
        stats = layer_stats(run, i, name, layer_parts, specs)
        finished[f"{i}.{name}"] = {**{k: v.clone() for k, v in stats.items()},
                                   "tokens": torch.tensor(stats.tokens), "samples": torch.tensor(stats.samples)}
        return stats

    runner._collect, runner.layer_stats = spy_collect, spy_stats
    result = api.prune(**{**TINY, **overrides})
    layers = {f"{i}.{n}": m.weight.detach().clone() for i, b in enumerate(result.adapter.blocks(result.model))
              for n, m in result.adapter.prunable(b).items()}
    return {"parts": parts, "stats": finished, "weights": layers,
            "sparsity": torch.tensor(result.report.overall_sparsity),
            "rows": json.dumps([(r.block, r.name, r.sparsity, r.error) for r in result.report.layers]),
            "manifest": json.dumps({k: result.manifest.get(k) for k in ("distributed", "calibration", "gradients")})}


def _ok(results: list[dict]) -> list:
    for r, res in enumerate(results):
        assert res["ok"], f"rank {r}: {res['error']}"
    return [res["result"] for res in results]


def _agreement(a: dict, b: dict) -> tuple[int, int]:
    """(differing mask entries, total entries) between two runs' pruned weights."""
    diff = sum(int(((a[k] == 0) != (b[k] == 0)).sum()) for k in a)
    return diff, sum(v.numel() for v in a.values())


def _order_bound(name: str, value: torch.Tensor, tokens: int, samples: int) -> torch.Tensor:
    """How far two float32 sums of the same ``n`` terms per entry may differ by summation order alone.

    Recursive summation of ``n`` float32 terms is off by at most ``gamma_n * sum|terms|`` with
    ``gamma_n = n u / (1 - n u)``, ``u = 2**-24`` (Higham, *Accuracy and Stability of Numerical
    Algorithms*, eq. 3.4; any order, blocked or pairwise, obeys it), so two orders differ by at
    most twice that. ``sum|terms|`` per entry: ``act_sq`` sums squares over tokens and ``grad_l1``
    absolute gradients over samples (all terms >= 0, so the value itself); ``grad_l2`` is the square
    root of such a sum, whose relative error is half the sum's (plus one rounding);
    ``gram[i, j] = sum_t x_ti x_tj`` has ``sum_t |x_ti x_tj| <= sqrt(gram_ii gram_jj)`` (Cauchy-Schwarz).
    Measured on random:tiny (8 samples, 256 tokens) the largest difference is 0.07 (sparsegpt) and
    0.24 (gblm) of this bound; a later block's inputs also carry the rounding of the previous
    block's update, which stays far inside it. Integer statistics are compared exactly elsewhere.
    """
    u = 2.0 ** -24
    n = samples if name.startswith("grad_") else tokens
    gamma = n * u / (1 - n * u)
    value = value.double()
    if name in ("act_sq", "grad_l1", "grad_l2"):
        terms = value.abs()
    elif name in ("gram", "error_gram"):  # error_gram: the same sum over the first few samples' tokens (n <= tokens)
        diag = value.diagonal().clamp_min(0) * (1 + gamma)  # the diagonal itself is a rounded sum of squares
        terms = (diag[:, None] * diag[None, :]).sqrt()
    else:
        raise AssertionError(f"no rounding bound for statistic {name!r}: derive one in _order_bound")
    return 2 * gamma * terms


def _run(tmp_path: Path, tag: str, world: int, **overrides) -> list[dict]:
    env = {"COMPRESSKIT_CACHE": str(tmp_path / f"cache-{tag}-{{rank}}")}
    return _ok(launch(_prune, world, tmp_path / tag, overrides, env=env))


@pytest.mark.parametrize("metric", ["gblm", "sparsegpt"])
def test_two_ranks_equal_one_process_to_float32_rounding(tmp_path, metric, capsys):
    (single,) = _run(tmp_path, "one", 1, metric=metric)
    rank0, rank1 = _run(tmp_path, "two", 2, metric=metric)
    assert rank0["parts"].keys() == rank1["parts"].keys() == single["parts"].keys()
    for layer, want in single["parts"].items():  # the sums every rank decides from
        for key in want:
            assert torch.equal(rank0["parts"][layer][key], rank1["parts"][layer][key]), "ranks hold different sums"
    finished = {**rank0["stats"], **rank1["stats"]}  # each layer is finished by the rank that decides it
    assert finished.keys() == single["stats"].keys() and rank0["stats"] and rank1["stats"]
    for layer, want in single["stats"].items():
        got = finished[layer]
        assert got.keys() == want.keys()
        for name in want:
            if name in ("tokens", "samples"):  # integer sums: exact
                assert torch.equal(got[name], want[name]), (layer, name)
            else:  # the same terms summed in another order: within the float32 rounding bound of the sums
                bound = _order_bound(name, want[name], int(want["tokens"]), int(want["samples"]))
                excess = float(((got[name] - want[name]).abs() - bound).max())
                assert excess <= 0, f"{layer} {name}: differs beyond the float32 rounding of its sums by {excess:g}"
    for layer in rank0["weights"]:
        assert torch.equal(rank0["weights"][layer], rank1["weights"][layer]), f"ranks pruned {layer} differently"
    assert rank0["rows"] == rank1["rows"], "the ranks' reports differ"
    assert float(rank0["sparsity"]) == float(single["sparsity"])
    for layer in single["weights"]:  # the per-row (or N:M) count is fixed: identical sparsity per layer
        assert int((rank0["weights"][layer] == 0).sum()) == int((single["weights"][layer] == 0).sum()), layer
    diff, total = _agreement(single["weights"], rank0["weights"])
    with capsys.disabled():
        print(f"\n{metric} float32, 2 ranks vs 1 process: masks agree on {total - diff}/{total} weights "
              f"({100 * (total - diff) / total:.4f} %)")
    assert diff <= total * 1e-3, "more than near-ties differ"
    manifest = json.loads(rank0["manifest"])
    assert manifest["distributed"]["world_size"] == 2 and manifest["distributed"]["samples_per_rank"] == [4, 4]
    assert manifest["distributed"]["weights_agree"] is True
    assert manifest["calibration"] == json.loads(single["manifest"])["calibration"]  # same fingerprint


def test_float64_accumulation_makes_ranks_and_single_process_identical(tmp_path):
    (single,) = _run(tmp_path, "one", 1, metric="gblm", accumulate="float64", update="obs")
    rank0, rank1 = _run(tmp_path, "two", 2, metric="gblm", accumulate="float64", update="obs")
    finished = {**rank0["stats"], **rank1["stats"]}
    for layer, want in single["stats"].items():
        for name, value in want.items():
            assert torch.equal(finished[layer][name], value), (layer, name)
            assert value.dtype in (torch.float32, torch.int64)  # finished in float32, as metrics expect
    assert rank0["rows"] == single["rows"]  # same sparsity and reconstruction error per layer
    for layer, want in single["weights"].items():
        assert torch.equal(rank0["weights"][layer], want), layer
    assert json.loads(rank0["manifest"])["gradients"]["precision"] == "float64"


@pytest.mark.parametrize("overrides", [dict(metric="wanda", allocation="owl", sparsity=0.6),
                                       dict(metric="wandapp")], ids=["owl", "wandapp"])
def test_owl_targets_and_block_gradients_are_summed_across_ranks(tmp_path, overrides):
    """OWL's pre-pass and Wanda++'s block-local gradients are sums over samples too: with float64
    sums two ranks give exactly the single-process per-layer targets, statistics and masks."""
    (single,) = _run(tmp_path, "one", 1, accumulate="float64", **overrides)
    rank0, rank1 = _run(tmp_path, "two", 2, accumulate="float64", **overrides)
    assert rank0["rows"] == rank1["rows"] == single["rows"]  # per-layer sparsity (OWL's targets) and errors
    finished = {**rank0["stats"], **rank1["stats"]}
    for layer, want in single["stats"].items():
        for name, value in want.items():
            assert torch.equal(finished[layer][name], value), (layer, name)
    for layer, want in single["weights"].items():
        assert torch.equal(rank0["weights"][layer], want), layer


@pytest.mark.parametrize("overrides, words", [(dict(metric="wanda", update="ro"), "solve_block"),
                                              (dict(metric="gblm", select="metric.alpha=0,100"), "--select")])
def test_block_solvers_and_selection_refuse_torchrun(tmp_path, overrides, words):
    for res in launch(_prune_plain, 2, tmp_path, overrides):
        assert not res["ok"] and words in res["error"] and "single process" in res["error"]


def test_three_ranks_uneven_shards(tmp_path):
    (single,) = _run(tmp_path, "one", 1, metric="wanda", nsamples=7, accumulate="float64")
    ranks = _run(tmp_path, "three", 3, metric="wanda", nsamples=7, accumulate="float64")
    assert json.loads(ranks[0]["manifest"])["distributed"]["samples_per_rank"] == [3, 2, 2]
    for layer, want in single["weights"].items():
        assert all(torch.equal(r["weights"][layer], want) for r in ranks), layer


def _cli(rank: int, tmp: str) -> dict:
    from compresskit.cli import main

    here = Path(tmp) / f"cwd{rank}"
    here.mkdir()
    os.chdir(here)
    sys.argv = ["compresskit", "prune", "--model", "random:tiny", "--metric", "gblm", "--nsamples", "4", "--seqlen",
                "16", "--device", "cpu", "--no-progress", "--output", "out"]
    main()
    return {}


def test_only_rank_0_writes(tmp_path):
    """Each rank gets its own working directory and cache: only rank 0's may change."""
    results = launch(_cli, 2, tmp_path / "status", str(tmp_path), env={"COMPRESSKIT_CACHE": str(tmp_path / "cache{rank}")})
    _ok(results)
    manifest = json.loads((tmp_path / "cwd0" / "out" / "compresskit.json").read_text())
    assert manifest["distributed"]["world_size"] == 2 and manifest["distributed"]["samples_per_rank"] == [2, 2]
    assert manifest["distributed"]["backend"] == "gloo"
    assert list((tmp_path / "cache0").rglob("*.safetensors")), "rank 0 cached the gradients"
    assert list((tmp_path / "cwd1").iterdir()) == [], "rank 1 wrote into its working directory"
    assert not (tmp_path / "cache1").exists() or not any((tmp_path / "cache1").rglob("*")), "rank 1 wrote a cache"
    assert "overall sparsity" in results[0]["stdout"] and results[1]["stdout"] == ""


class _FailOnRank1:
    """A plugin whose ``block_done`` fails on rank 1 after block 0 (or kills that rank outright)."""

    def __init__(self, how: str) -> None:
        self.how = how

    def block_done(self, run, block_index):
        if distributed.current().rank == 1 and block_index == 0:
            if self.how == "die":
                os._exit(3)
            raise CompressKitError("rank one cannot go on")


_FailOnRank1.block_done = __import__("compresskit").hookimpl(_FailOnRank1.block_done)


def _prune_failing(rank: int, how: str) -> dict:
    from compresskit import api
    from compresskit.testing import fresh_registry

    api.prune(**{**TINY, "metric": "wanda"}, registry=fresh_registry(_FailOnRank1(how)))
    return {}


def test_an_error_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    rank0, rank1 = launch(_prune_failing, 2, tmp_path, "raise")
    assert rank1["error"] == "CompressKitError: rank one cannot go on"
    assert rank0["error"] == "DistributedError: rank 1 of 2 failed: rank one cannot go on"


def test_a_rank_that_dies_does_not_hang_the_others(tmp_path):
    rank0, rank1 = launch(_prune_failing, 2, tmp_path, "die")
    assert rank1["error"].startswith("died")
    assert rank0["error"].startswith("DistributedError: rank 0 lost contact with the other ranks"), rank0["error"]


def _prune_plain(rank: int, overrides: dict) -> dict:
    from compresskit import api

    api.prune(**{**TINY, **overrides})
    return {}


def test_more_ranks_than_samples_is_refused(tmp_path):
    for res in launch(_prune_plain, 2, tmp_path, {"metric": "wanda", "nsamples": 1}):
        assert not res["ok"] and "2 ranks but only 1 calibration samples" in res["error"]


def test_reference_gradient_precision_is_refused(tmp_path):
    over = {"metric": "gblm", "gradient_options": {"precision": "reference"}}
    for res in launch(_prune_plain, 2, tmp_path, over):
        assert not res["ok"] and "gradient.precision=reference" in res["error"]


def _perplexity(rank: int, text: str) -> dict:
    from compresskit.api import evaluate

    res = evaluate("random:tiny", adapter="llama", data=text, seqlen=16, limit=0, device="cpu", progress=False)
    return {"ppl": torch.tensor(res["perplexity"], dtype=torch.float64)}


def test_sharded_perplexity_equals_single_process(tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"word{i} and some text" for i in range(60)))
    (single,) = _ok(launch(_perplexity, 1, tmp_path / "one", str(text)))
    rank0, rank1 = _ok(launch(_perplexity, 2, tmp_path / "two", str(text)))
    assert torch.equal(rank0["ppl"], single["ppl"]) and torch.equal(rank1["ppl"], single["ppl"])


# ---- the single-process context and the pure helpers ------------------------------------------


def test_single_process_context_changes_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.current()
    assert not distributed.launched() and not ctx.enabled and ctx.is_writer
    tree = {"a": {"sum": torch.ones(3)}, "counts": {"tokens": torch.tensor(4)}}
    assert ctx.all_reduce(tree) is tree and torch.equal(tree["a"]["sum"], torch.ones(3))
    assert ctx.shard([1, 2, 3]) == [1, 2, 3] and ctx.from_writer(lambda: None) is None
    with distributed.session() as inner:
        assert inner is ctx


def test_shards_are_contiguous_and_balanced():
    sizes = [distributed.Context(rank=r, world_size=3).shard_range(8) for r in range(3)]
    assert sizes == [(0, 3), (3, 6), (6, 8)]
    assert distributed.Context(world_size=3).sizes(7) == [3, 2, 2]
    with pytest.raises(DistributedError, match="start at most 2 processes"):
        distributed.Context(world_size=4).require_samples(2)


def test_float64_accumulators_finish_in_float32():
    tree = {"x": {"sum": torch.zeros(2)}, "c": {"tokens": torch.zeros((), dtype=torch.int64)}}
    distributed.accumulators(tree, "float64")
    assert tree["x"]["sum"].dtype == torch.float64 and tree["c"]["tokens"].dtype == torch.int64
    tree["x"]["sum"] += torch.tensor([1.0, 2.0])
    distributed.combine(tree)
    assert tree["x"]["sum"].dtype == torch.float32 and tree["x"]["sum"].tolist() == [1.0, 2.0]


def test_digest_sees_one_changed_weight_and_not_the_order_of_summation():
    a = {"w": torch.randn(64, 64)}
    b = {"w": a["w"].clone()}
    assert distributed.digest(a.items()) == distributed.digest(b.items())
    b["w"][3, 5] = 0.0
    assert distributed.digest(a.items()) != distributed.digest(b.items())


def test_owners_balance_the_layers_of_a_group():
    from torch import nn

    layers = {"q": nn.Linear(64, 64), "k": nn.Linear(64, 16), "up": nn.Linear(64, 256), "down": nn.Linear(256, 64)}
    own = distributed.owners(list(layers), layers, 2)
    assert own["down"] != own["up"] and set(own.values()) == {0, 1}
    assert distributed.owners(list(layers), layers, 1) == dict.fromkeys(layers, 0)
    assert distributed.decided_here(list(layers), layers) == list(layers)  # single process: all


def test_buckets_group_by_dtype_and_size():

    ts = [torch.zeros(4), torch.zeros(4), torch.zeros(2, dtype=torch.int64), torch.zeros(100)]
    assert [len(b) for b in distributed.context._buckets(ts, cap=40)] == [2, 1, 1]


@pytest.mark.slow
def test_torchrun_cli(tmp_path):
    """The real launcher: ``torchrun --nproc-per-node 2 -m compresskit prune`` (~20 s of imports)."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed next to this interpreter")
    cmd = [torchrun, "--nproc-per-node", "2", "--master-port", str(__import__("distributed_harness").free_port()),
           "-m", "compresskit", "prune", "--model", "random:tiny", "--metric", "gblm", "--nsamples", "4",
           "--seqlen", "16", "--device", "cpu", "--no-progress", "--output", str(tmp_path / "out")]
    res = hang.run(cmd, capture_output=True, text=True, cwd=tmp_path,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "COMPRESSKIT_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "compresskit.json").read_text())
    assert manifest["distributed"]["world_size"] == 2
    bad = hang.run([*cmd[:5], "-m", "compresskit", "prune", "--model", "random:tiny", "--nsamples", "1",
                    "--device", "cpu", "--no-progress"], capture_output=True, text=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert bad.returncode != 0 and "2 ranks but only 1 calibration samples" in bad.stderr


def _vit(rank: int) -> dict:
    from compresskit import api

    res = api.prune(adapter="vit", model="random:tiny", metric="gblm", nsamples=4, device="cpu", progress=False,
                    evaluate=True, eval_limit=10)
    return {"evaluation": json.dumps(res.manifest["evaluation"])}


def test_vit_sharded_evaluation_equals_single_process(tmp_path):
    pytest.importorskip("timm")
    (single,) = _ok(launch(_vit, 1, tmp_path / "one", env={"COMPRESSKIT_CACHE": str(tmp_path / "c-one")}))
    rank0, rank1 = _ok(launch(_vit, 2, tmp_path / "two", env={"COMPRESSKIT_CACHE": str(tmp_path / "c{rank}")}))
    assert rank0["evaluation"] == single["evaluation"] == rank1["evaluation"]
    assert list((tmp_path / "c0").rglob("vit-eval/*")) and not (tmp_path / "c1").exists()
