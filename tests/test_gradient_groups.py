"""Layer groups and the memory plan of the gradient pass (gradient.groups, gradient.max_memory)."""

from __future__ import annotations

import re

import pytest
import torch

import compresskit
from compresskit.engine import distributed, gradcache, gradients, gradplan
from compresskit.engine.gradplan import GiB, Activations, activation_estimate, peak, plan_gradient_pass, split
from compresskit.errors import GradientError, OptionError
from compresskit.options import build
from compresskit.stats import GradNorm
from compresskit_plugins.adapters.llama import LlamaAdapter

CPU = torch.device("cpu")
RUN = dict(adapter="llama", model="random:tiny", nsamples=3, seqlen=24, calibration="random",
           progress=False, report_error=False, sparsity=0.5, metric="gblm")

# LLaMA-2-7B: hidden 4096, MLP 11008, 32 blocks, vocabulary 32000, bfloat16, 2048 tokens per sample
D, F, B, V, L = 4096, 11008, 32, 32000, 2048
LAYERS_7B = [(D, D)] * 4 + [(F, D), (F, D), (D, F)]
ACC_7B = [o * i * 4 for _ in range(B) for o, i in LAYERS_7B]  # float32 accumulators, block order
WEIGHTS_7B = int(12.55 * GiB)


def obtain(llama_calibration, tmp_path, stats, **opts):
    adapter, loaded, batches = llama_calibration
    return gradients.obtain(adapter, loaded, batches, stats, CPU,
                            {"cache_dir": str(tmp_path), "recompute": True, **opts}, progress=False)


@pytest.mark.parametrize("precision", ["float32", "reference"])
@pytest.mark.parametrize("groups", [2, 3])
def test_groups_give_the_statistics_of_one_pass_bit_for_bit(llama_calibration, tmp_path, strict_devices, precision, groups):
    stats = [GradNorm("l1", 100.0), GradNorm("l2", 100.0)]
    one, info1 = obtain(llama_calibration, tmp_path, stats, precision=precision)
    many, info = obtain(llama_calibration, tmp_path, stats, precision=precision, groups=groups)
    assert info1["groups"] == 1 and info["groups"] == groups and info["plan"]["groups"] == groups
    assert list(many) == list(one) and len(one) == 14
    for key in one:
        for name in ("grad_l1", "grad_l2"):
            assert many[key][name].dtype == torch.float32
            assert torch.equal(many[key][name], one[key][name]), (key, name)


def test_each_group_pass_grads_only_its_own_contiguous_layers(llama_calibration, tmp_path):
    adapter, loaded, batches = llama_calibration
    seen = []

    class Spy(LlamaAdapter):
        def loss(self, model, batch):
            seen.append(frozenset(n for n, p in model.named_parameters() if p.requires_grad))
            return super().loss(model, batch)

    gradients.obtain(Spy(), loaded, batches, [GradNorm("l1")], CPU, {"cache_dir": str(tmp_path), "groups": 3},
                     progress=False)
    passes = list(dict.fromkeys(seen))  # each group's set, in order: 3 samples per group
    assert len(seen) == 9 and len(passes) == 3 and all(seen.count(p) == 3 for p in passes)
    order = [f"model.layers.{i}.{n}.weight" for i, b in enumerate(loaded.model.model.layers)
             for n in adapter.prunable(b)]
    assert [n for p in passes for n in sorted(p, key=order.index)] == order  # disjoint, contiguous, complete
    assert all(p.grad is None for p in loaded.model.parameters())
    assert all(p.requires_grad for p in loaded.model.parameters())  # flags restored after every group


def test_cross_rank_sum_applies_per_group(llama_calibration, tmp_path, monkeypatch):
    """Under torchrun each group's parts are summed across ranks before the next group starts: a fake
    two-rank sum (each half of the samples) is called once per group, with the same results as one group."""
    calls = []

    def two_ranks(compute, batches, what="gradient statistics"):
        a, b = compute(list(batches[:1])), compute(list(batches[1:]))
        calls.append(sorted(next(iter(a.values()))))
        return {s: {k: {p: a[s][k][p] + b[s][k][p] for p in a[s][k]} for k in a[s]} for s in a}

    monkeypatch.setattr(distributed, "sum_over_samples", two_ranks)
    stats = [GradNorm("l2", 100.0)]
    one, _ = obtain(llama_calibration, tmp_path, stats)
    assert len(calls) == 1 and len(calls[0]) == 14
    calls.clear()
    many, _ = obtain(llama_calibration, tmp_path, stats, groups=3)
    assert len(calls) == 3 and sorted(k for c in calls for k in c) == sorted(one)
    assert all(torch.equal(many[k]["grad_l2"], one[k]["grad_l2"]) for k in one)


def test_split_is_contiguous_balanced_and_refuses_too_many_groups():
    sizes = [3, 1, 1, 1, 4, 1, 1, 2]
    for g in range(1, len(sizes) + 1):
        ranges = split(sizes, g)
        assert len(ranges) == g and ranges[0][0] == 0 and ranges[-1][1] == len(sizes)
        assert all(a < b for a, b in ranges) and all(ranges[k][1] == ranges[k + 1][0] for k in range(g - 1))
    assert [sum(sizes[a:b]) for a, b in split(sizes, 2)] == [6, 8]
    assert [sum(ACC_7B[a:b]) for a, b in split(ACC_7B, 2)] == [sum(ACC_7B) // 2] * 2  # 16 blocks each
    with pytest.raises(GradientError, match="more groups than the 8 prunable layers; use at most 8"):
        split(sizes, 9)


def test_7b_in_26_gib_plans_checkpointing_and_groups():
    """The issue's numbers: weights 12.55 GiB (bfloat16), accumulators 24.1 GiB (float32), activations
    11 GiB without checkpointing; a 26 GiB budget (the published GBLM figure)."""
    acts = activation_estimate(B, D, F, L, 2, V, F * D)
    assert sum(ACC_7B) / GiB == pytest.approx(24.1, abs=0.05)
    assert acts.plain / GiB == pytest.approx(11.3, abs=0.6) and acts.checkpointed < 3 * GiB
    synthetic = Activations(11 * GiB, acts.checkpointed)
    for accumulators in (int(24.1 * GiB), ACC_7B):
        plan = plan_gradient_pass(WEIGHTS_7B, accumulators, synthetic, 26 * GiB)
        assert plan.checkpointing and plan.groups >= 2 and plan.chosen == "plan"
        assert plan.estimate == peak(WEIGHTS_7B, accumulators, synthetic, True, plan.groups) <= 26 * GiB
        assert peak(WEIGHTS_7B, accumulators, synthetic, True, plan.groups - 1) > 26 * GiB  # the smallest G
    # cheaper plans where they fit
    roomy = plan_gradient_pass(WEIGHTS_7B, ACC_7B, synthetic, 48 * GiB)
    assert (roomy.checkpointing, roomy.groups) == (False, 1)
    middle = plan_gradient_pass(WEIGHTS_7B, ACC_7B, synthetic, 40 * GiB)
    assert (middle.checkpointing, middle.groups) == (True, 1)


def test_an_impossible_budget_names_the_least_that_works():
    acts = activation_estimate(B, D, F, L, 2, V, F * D)
    with pytest.raises(GradientError, match=r"needs at least ([0-9.]+) GiB.*gradient\.max_memory=\1GiB") as exc:
        plan_gradient_pass(WEIGHTS_7B, ACC_7B, acts, 13 * GiB)
    least = float(re.search(r"at least ([0-9.]+) GiB", str(exc.value)).group(1))
    assert 13 < least < 16 and "streamed run" in str(exc.value)
    plan = plan_gradient_pass(WEIGHTS_7B, ACC_7B, acts, int(least * GiB))  # that budget does work
    assert plan.estimate <= least * GiB
    with pytest.raises(GradientError, match=r"with gradient\.checkpointing=False.*drop gradient\.checkpointing"):
        plan_gradient_pass(WEIGHTS_7B, ACC_7B, acts, 20 * GiB, checkpointing=False)


def test_explicit_settings_win_over_the_plan():
    acts = activation_estimate(B, D, F, L, 2, V, F * D)
    kept = plan_gradient_pass(WEIGHTS_7B, ACC_7B, acts, 80 * GiB, groups=4)
    assert (kept.checkpointing, kept.groups) == (False, 4)
    kept = plan_gradient_pass(WEIGHTS_7B, ACC_7B, acts, 80 * GiB, checkpointing=True)
    assert (kept.checkpointing, kept.groups) == (True, 1)
    kept = plan_gradient_pass(WEIGHTS_7B, ACC_7B, acts, 26 * GiB, checkpointing=True)
    assert (kept.checkpointing, kept.groups) == (True, 3)
    over = plan_gradient_pass(WEIGHTS_7B, ACC_7B, acts, 26 * GiB, checkpointing=False, groups=1)
    assert (over.checkpointing, over.groups, over.chosen) == (False, 1, "user") and over.estimate > 26 * GiB


def test_options_parse_groups_checkpointing_and_max_memory():
    opts = build(gradients.GradientOptions, {"groups": "3", "checkpointing": "true", "max_memory": "26GiB"})
    assert (opts.groups, opts.checkpointing, opts.max_memory) == (3, True, "26GiB")
    opts = build(gradients.GradientOptions, {"groups": "auto", "checkpointing": "auto", "max_memory": 26 * GiB})
    assert (opts.groups, opts.checkpointing, opts.max_memory) == ("auto", "auto", 26 * GiB)
    assert gradients.GradientOptions().groups == "auto" and gradients.GradientOptions().checkpointing == "auto"
    for bad, match in [({"groups": "0"}, "groups must be an integer >= 1 or auto"),
                       ({"groups": "two"}, r"gradient\.groups expects int or 'auto'"),
                       ({"max_memory": "lots"}, r"gradient\.max_memory='lots' is not a size"),
                       ({"checkpointing": "maybe"}, r"gradient\.checkpointing expects bool or 'auto'")]:
        with pytest.raises(OptionError, match=match):
            build(gradients.GradientOptions, bad, "gradient.")


def test_the_plan_reaches_the_manifest(tmp_path):
    res = compresskit.prune(**RUN, gradient_options={"cache_dir": str(tmp_path), "groups": 2})
    info = res.manifest["gradients"]
    assert info["groups"] == 2 and info["checkpointing"] is False
    assert info["plan"]["groups"] == 2 and info["plan"]["chosen"] == "default" and info["plan"]["budget"] is None
    assert info["plan"]["estimate"] > 0
    res = compresskit.prune(**RUN, gradient_options={"cache_dir": str(tmp_path), "recompute": True,
                                                     "max_memory": "1GiB"})
    plan = res.manifest["gradients"]["plan"]
    assert (plan["checkpointing"], plan["groups"], plan["chosen"]) == (False, 1, "plan")
    assert plan["budget"] == GiB and plan["budget_source"] == "gradient.max_memory" and plan["estimate"] <= GiB


def test_default_on_cpu_is_one_unplanned_pass(llama_calibration, tmp_path):
    _, info = obtain(llama_calibration, tmp_path, [GradNorm("l1")])
    assert (info["checkpointing"], info["groups"]) == (False, 1)
    assert info["plan"]["chosen"] == "default" and info["plan"]["budget"] is None


def test_cpu_budget_plans_groups_only_when_they_rest_on_disk(llama_calibration, tmp_path, monkeypatch):
    """On the CPU finished groups leave the memory the pass runs in only when they go to disk: then a
    budget below weights + accumulators is met with groups; when they cannot (the group files cannot
    be written) they rest in the same memory, groups do not lower the peak, and the budget is refused
    with the least that fits instead of being 'planned'."""
    adapter, loaded, batches = llama_calibration
    layers = gradients.target_layers(adapter, loaded.model)
    acc = sum(gradplan.accumulator_sizes(layers, [GradNorm("l1")]))
    assert acc == 4 * sum(layer.weight.numel() for layer in layers.values())
    acts = gradplan.model_activations(adapter, loaded.model, layers, batches[0])
    small = gradplan.weight_bytes(loaded.model) + acc // 2 + acts.checkpointed
    _, info = obtain(llama_calibration, tmp_path, [GradNorm("l1")], max_memory=small)
    plan = info["plan"]
    assert plan["chosen"] == "plan" and plan["checkpointing"] and plan["groups"] >= 2
    assert plan["estimate"] <= small and info["statistics"]["grad_l1"]["rest"] == "disk"

    def unwritable(root):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(gradcache, "Spill", unwritable)
    with pytest.raises(GradientError, match=r"needs at least .* GiB .*checkpointing=True, groups=1"):
        obtain(llama_calibration, tmp_path, [GradNorm("l1")], max_memory=small)


def test_free_cuda_memory_is_the_budget_when_none_is_given(llama_calibration, tmp_path, monkeypatch):
    monkeypatch.setattr(gradplan, "is_cuda", lambda device: True)
    monkeypatch.setattr(gradplan, "free_memory", lambda device: 10 * GiB)
    _, info = obtain(llama_calibration, tmp_path, [GradNorm("l1")])
    plan = info["plan"]
    assert plan["budget_source"] == "free device memory" and plan["chosen"] == "plan"
    assert plan["budget"] == int(10 * GiB * gradplan.FREE_SHARE) + gradplan.weight_bytes(llama_calibration[1].model)


def test_vit_groups_equal_one_pass_and_a_budget_without_estimate_runs_unplanned(registry, tmp_path, caplog):
    """A model whose samples have no input_ids (a ViT) gets no estimate: a budget is then not planned
    against (a warning says so) and the pass runs as set; groups still give the one-pass sums."""
    pytest.importorskip("timm")
    adapter = registry.get("adapter", "vit").cls()
    loaded = adapter.load("random:tiny")
    batches = adapter.calibration_batches(loaded, 2, 0, 0, "random")
    stats = [GradNorm("l2")]
    run = dict(progress=False)
    one, _ = gradients.obtain(adapter, loaded, batches, stats, CPU, {"cache_dir": str(tmp_path)}, **run)
    many, info = gradients.obtain(adapter, loaded, batches, stats, CPU,
                                  {"cache_dir": str(tmp_path), "recompute": True, "groups": 4, "max_memory": "1KB"},
                                  **run)
    assert info["groups"] == 4 and info["plan"]["estimate"] is None and "no memory estimate" in caplog.text
    assert all(torch.equal(many[k]["grad_l2"], one[k]["grad_l2"]) and one[k]["grad_l2"].abs().sum() > 0 for k in one)
