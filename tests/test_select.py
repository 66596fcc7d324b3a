"""--select: one prune per value, scored on held-out calibration samples; the best is kept."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from compresskit.api import check, prune
from compresskit.errors import OptionError
from compresskit.engine.select import heldout_loss, holdout_batches, parse

BASE = dict(model="random:tiny", nsamples=4, seqlen=32, device="cpu", progress=False, report_error=False)


def _equal_models(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_parse():
    s = parse(" metric.alpha = 0, 1,10")
    assert (s.scope, s.key, s.values) == ("metric", "alpha", ("0", "1", "10"))
    for bad in ("alpha=0,1", "metric.alpha", "pattern.n=2,4", "metric.alpha=0,,1", "metric.alpha=1,1"):
        with pytest.raises(OptionError):
            parse(bad)


def test_one_value_sweep_equals_a_plain_run():
    a = prune(metric="gblm", select="metric.alpha=10", **BASE)
    b = prune(metric="gblm", metric_options={"alpha": 10}, **BASE)
    assert _equal_models(a, b)
    sel = a.manifest["selection"]
    assert sel["chosen"] == 10.0 and [r["value"] for r in sel["sweep"]] == [10.0]
    assert a.manifest["config"]["select"] == "metric.alpha=10"
    assert a.manifest["calibration"]["fingerprint"] == b.manifest["calibration"]["fingerprint"]


def test_selection_picks_the_lowest_heldout_loss():
    values = (0.0, 30.0, 1e4)
    result = prune(metric="wandapp", select="metric.alpha=" + ",".join(map(str, values)), select_nsamples=3, **BASE)
    sel = result.manifest["selection"]
    assert [r["value"] for r in sel["sweep"]] == list(values)
    # recompute every candidate independently on the same held-out samples
    held, info = holdout_batches(result.adapter, result.loaded, _cfg(select_nsamples=3),
                                 "random", result.run.batches)
    assert info["fingerprint"] == sel["holdout"]["fingerprint"] and info["nsamples"] == 3
    losses = []
    for v in values:
        plain = prune(metric="wandapp", metric_options={"alpha": v}, **BASE)
        losses.append(heldout_loss(plain.adapter, plain.model, held, torch.device("cpu")))
        if v == sel["chosen"]:
            assert _equal_models(plain, result)
    assert [r["heldout_loss"] for r in sel["sweep"]] == pytest.approx(losses, rel=1e-6)
    assert len(set(losses)) == len(losses), "the oracle needs distinct losses"
    assert sel["chosen"] == values[losses.index(min(losses))]
    assert sel["heldout_loss"] == pytest.approx(min(losses), rel=1e-6)


def _cfg(**kw):
    from compresskit.config import RunConfig

    return RunConfig(**{k: v for k, v in BASE.items() if k != "progress"}, **kw)


def test_heldout_samples_follow_and_differ_from_the_calibration_samples():
    result = prune(metric="wanda", **BASE)
    held, info = holdout_batches(result.adapter, result.loaded, _cfg(select_nsamples=5), "random", result.run.batches)
    assert info["how"].startswith("samples 4..8") and info["dropped_as_duplicates"] == 0 and len(held) == 5
    for h in held:
        assert not any(torch.equal(h["input_ids"], c["input_ids"]) for c in result.run.batches)
    longer = result.adapter.calibration_batches(result.loaded, 9, 32, 0, "random")
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(longer[4:], held))


def test_selection_over_update_and_allocation_options():
    r = prune(metric="wanda", update="ro", select="update.lr=1e-5,1e-3", select_nsamples=2, **BASE)
    assert r.manifest["selection"]["option"] == "update.lr" and len(r.manifest["selection"]["sweep"]) == 2
    r = prune(metric="wanda", sparsity=0.6, allocation="owl", select="allocation.lmbda=0,0.1", select_nsamples=2, **BASE)
    assert r.manifest["resolved"]["allocation_options"]["lmbda"] == r.manifest["selection"]["chosen"]


def test_bad_values_fail_before_any_pruning(monkeypatch):
    import compresskit.api as api

    def boom(*a, **k):
        raise AssertionError("pruned before validating every value")

    monkeypatch.setattr(api, "_start", boom)
    with pytest.raises(OptionError, match="metric.alpha"):
        prune(metric="gblm", select="metric.alpha=0,abc", **BASE)
    with pytest.raises(OptionError, match="unknown option"):
        prune(metric="gblm", select="metric.nope=1,2", **BASE)
    monkeypatch.undo()
    with pytest.raises(OptionError, match="metric.alpha"):
        check(metric="gblm", model="random:tiny", select="metric.alpha=0,abc")


def test_cli_select_prints_the_sweep(tmp_path):
    from compresskit.cli import cli

    out = CliRunner().invoke(cli, ["prune", "--model", "random:tiny", "--metric", "gblm", "--nsamples", "4",
                                   "--seqlen", "32", "--select", "metric.alpha=0,100", "--select-samples", "2",
                                   "--no-progress", "--no-error-report", "--output", str(tmp_path / "out")])
    assert out.exit_code == 0, out.output
    assert "selected metric.alpha=" in out.output and "metric.alpha=0.0: loss" in out.output
    import json

    manifest = json.loads((tmp_path / "out" / "compresskit.json").read_text())
    assert len(manifest["selection"]["sweep"]) == 2
