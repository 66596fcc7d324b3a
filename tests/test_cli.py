"""The command line: runs, listings and error paths."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from compresskit.cli import cli, parse_options
from compresskit.config import RunConfig

TINY = ["--adapter", "llama", "--model", "random:tiny", "--nsamples", "2", "--seqlen", "16", "--no-progress"]


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_prune_wanda_writes_loadable_half_sparse_model(tmp_path):
    out = tmp_path / "D"
    r = run("prune", *TINY, "--metric", "wanda", "--sparsity", "0.5", "--output", str(out))
    assert r.exit_code == 0, r.output
    assert "overall sparsity 0.5000" in r.output
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    for name, m in model.model.layers.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert ((m.weight == 0).sum(1) == m.weight.shape[1] // 2).all(), name
    man = json.loads((out / "compresskit.json").read_text())
    assert man["resolved"]["sparsity"] == 0.5 and man["config"]["metric"] == "wanda"


def test_prune_2_4_shorthand(tmp_path):
    r = run("prune", *TINY, "--metric", "wanda", "--pattern", "2:4", "--output", str(tmp_path / "D"))
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "D" / "compresskit.json").read_text())
    assert man["resolved"]["pattern_options"] == {"n": 2, "m": 4}


def test_unknown_metric_suggests():
    r = run("prune", *TINY, "--metric", "wnda")
    assert r.exit_code != 0 and "Did you mean 'wanda'" in r.output


def test_contradictory_sparsity_and_existing_output(tmp_path):
    r = run("prune", *TINY, "--metric", "wanda", "--pattern", "2:4", "--sparsity", "0.6")
    assert r.exit_code != 0 and "contradicts" in r.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    r = run("prune", *TINY, "--metric", "wanda", "--output", str(tmp_path / "full"))
    assert r.exit_code != 0 and "--overwrite" in r.output


def test_bad_option_syntax_and_key():
    r = run("prune", *TINY, "--metric", "wanda", "-o", "alpha=1")
    assert r.exit_code != 0 and "SCOPE.KEY=VALUE" in r.output
    r = run("prune", *TINY, "--metric", "wanda", "-o", "metric.alpha=1")
    assert r.exit_code != 0 and "unknown option 'metric.alpha'; valid options: variant" in r.output


def test_list_info_plugins_dry_run():
    r = run("list", "metrics")
    assert "wanda" in r.output and "magnitude" in r.output
    data = json.loads(run("list", "patterns", "--json").output)
    assert {"nm", "unstructured"} <= {d["name"] for d in data}
    r = run("info", "pattern", "nm")
    assert "pattern.n (int, default 2)" in r.output
    r = run("plugins")
    assert "register_metrics" in r.output and "compresskit" in r.output
    r = run("prune", *TINY, "--metric", "wanda", "--pattern", "4:8", "--dry-run")
    assert r.exit_code == 0 and "ok: 14 layers in 2 blocks" in r.output


def test_parsers():
    assert RunConfig(pattern="4:8").pattern_spec() == ("nm", {"n": 4, "m": 8})
    assert RunConfig(pattern="unstructured").pattern_spec() == ("unstructured", {})
    assert parse_options(("metric.alpha=0", "pattern.scope=layer", "update.percdamp=0.1")) == {
        "adapter": {}, "metric": {"alpha": "0"}, "pattern": {"scope": "layer"}, "update": {"percdamp": "0.1"},
        "allocation": {}, "gradient": {}}
    with pytest.raises(Exception):
        parse_options(("nodot=1",))


def test_gradient_scope_options_reach_the_engine():
    r = run("prune", *TINY, "--metric", "gblm", "-o", "gradient.bogus=1")
    assert r.exit_code != 0 and "gradient.bogus" in r.output and "checkpointing" in r.output
