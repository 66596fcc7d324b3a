"""Recipes: `compresskit recipe DIR` then `prune --recipe` reproduces a run; precedence; unknown keys."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
from click.testing import CliRunner

from compresskit.cli import cli, prune, recipe, toml
from compresskit.config import RunConfig

TINY = ["--adapter", "llama", "--model", "random:tiny", "--nsamples", "4", "--seqlen", "16", "--no-progress"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _tensors(directory):
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    assert files, f"no safetensors in {directory}"
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def test_recipe_of_an_output_reruns_it_with_identical_masks(tmp_path):
    (tmp_path / "map.json").write_text(json.dumps({"1.mlp.*": 0.7}))
    first = tmp_path / "first"
    r = run("prune", *TINY, "--metric", "wanda", "--sparsity", "0.6", "--seed", "3", "--sparsity-map",
            tmp_path / "map.json", "-o", "pattern.scope=layer", "--no-error-report", "--output", first)
    assert r.exit_code == 0, r.output
    text = run("recipe", first).output
    assert 'name = "wanda"' in text and "sparsity = 0.6" in text and '"1.mlp.*" = 0.7' in text
    # read it through a pipe, as the shell's <(compresskit recipe first/) hands it over
    read_end, write_end = os.pipe()
    os.write(write_end, text.encode())
    os.close(write_end)
    try:
        again = tmp_path / "again"
        r = run("prune", "--recipe", f"/dev/fd/{read_end}", "--no-progress", "--output", again)
    finally:
        os.close(read_end)
    assert r.exit_code == 0, r.output
    a, b = _tensors(first), _tensors(again)
    assert a.keys() == b.keys()
    for key in a:
        assert ((a[key] == 0) == (b[key] == 0)).all(), f"mask of {key} differs"
        assert (a[key] == b[key]).all(), f"weights of {key} differ"
    m1, m2 = (json.loads((d / "compresskit.json").read_text()) for d in (first, again))
    assert m1["resolved"] == m2["resolved"]
    assert m1["calibration"]["fingerprint"] == m2["calibration"]["fingerprint"]
    assert m2["config"]["sparsity_map"] == {"1.mlp.*": 0.7} and m2["config"]["report_error"] is False


def _resolved(monkeypatch, *args) -> tuple[RunConfig, str]:
    """The RunConfig `prune` builds (its dry run is intercepted before a model loads)."""
    from compresskit import api

    seen = []

    def fake_check(config, registry=None):
        seen.append(config)
        return {"layers": 0, "blocks": 0, "pattern": "x", "sparsity": 0.0}

    monkeypatch.setattr(api, "check", fake_check)
    r = CliRunner().invoke(cli, ["prune", *map(str, args), "--dry-run"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return seen[0], r.output


RECIPE = """
model = "random:tiny"
sparsity = 0.6
nsamples = 3
seed = 5
eval-windows = 7

[metric]
name = "wanda"
variant = false

[pattern]
name = "unstructured"
scope = "layer"
"""


def test_command_line_overrides_recipe_overrides_defaults(tmp_path, monkeypatch):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE)
    config, _ = _resolved(monkeypatch, "--recipe", path)
    assert (config.sparsity, config.nsamples, config.seed, config.eval_limit) == (0.6, 3, 5, 7)
    assert config.seqlen == RunConfig.seqlen  # neither says: the default
    assert config.metric == "wanda" and config.metric_options == {"variant": False}
    assert config.pattern_options == {"scope": "layer"}
    # given on the command line wins, even when it equals the default (--seed 0): click's parameter source
    config, _ = _resolved(monkeypatch, "--recipe", path, "--sparsity", "0.5", "--seed", "0", "-o", "pattern.scope=row")
    assert (config.sparsity, config.nsamples, config.seed) == (0.5, 3, 0)
    assert config.pattern_options == {"scope": "row"} and config.metric_options == {"variant": False}
    # another metric on the command line: the recipe's [metric] options belong to wanda and are dropped
    config, out = _resolved(monkeypatch, "--recipe", path, "--metric", "magnitude")
    assert config.metric == "magnitude" and config.metric_options == {}
    assert "replaces the recipe's metric wanda; its [metric] options (variant) are not used" in out


def test_paper_yields_to_explicit_sizes_at_the_same_or_a_higher_level(tmp_path, monkeypatch):
    path = tmp_path / "r.toml"
    path.write_text('paper = true\nnsamples = 16\n')
    config, _ = _resolved(monkeypatch, "--recipe", path)
    assert (config.nsamples, config.seqlen, config.eval_limit) == (16, 2048, 0)
    config, _ = _resolved(monkeypatch, "--recipe", path, "--nsamples", "8")
    assert config.nsamples == 8
    path.write_text('nsamples = 16\n')
    config, _ = _resolved(monkeypatch, "--recipe", path, "--paper")
    assert (config.nsamples, config.seqlen) == (128, 2048)
    config, _ = _resolved(monkeypatch, "--paper", "--seqlen", "512")
    assert (config.nsamples, config.seqlen) == (128, 512)


@pytest.mark.parametrize("text,message", [
    ("nsample = 3\n", "unknown key 'nsample'. Did you mean 'nsamples'?"),
    ("[metrik]\nalpha = 1\n", "unknown key 'metrik'. Did you mean '[metric]'?"),
    ("report_error = false\n", "Did you mean 'error-report' (the option for RunConfig.report_error)?"),
    ("recipe = 'x.toml'\n", "A recipe cannot name another recipe."),
    ("nsamples = 0.5\n", "nsamples must be an integer, got 0.5"),
    ("sparsity = true\n", "sparsity must be a finite number"),
    ("propagate = 'sideways'\n", "propagate: 'sideways' is not one of"),
    ("metric = 'wanda'\n[metric]\nvariant = true\n", "a key cannot be both a value and a table"),
    ("nsamples = \n", "is not valid TOML"),
    ("seed = 1\nse-ed = 2\n", "unknown key 'se-ed'"),
    ("eval_data = 'a'\neval-data = 'b'\n", "is given twice"),
])
def test_bad_recipes_say_what_and_the_fix(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    r = run("prune", *TINY, "--recipe", path, "--dry-run")
    assert r.exit_code != 0 and message in r.output, r.output


def test_unknown_plugin_option_in_a_table_is_named_with_the_closest(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[metric]\nname = "wanda"\nvarient = true\n')
    r = run("prune", *TINY, "--recipe", path, "--dry-run")
    assert r.exit_code != 0 and "unknown option 'metric.varient'" in r.output and "did you mean 'variant'" in r.output


def test_recipe_refuses_a_directory_without_a_manifest(tmp_path):
    r = run("recipe", tmp_path)
    assert r.exit_code != 0 and "has no compresskit.json" in r.output


def test_toml_writer_round_trips_through_tomllib():
    import tomllib

    data = {"plain": "a", "quote": 'say "hi"\\ there', "control": "tab\there\nnew\x01\x7f", "unicode": "Größe ✓",
            "int": -3, "float": 0.1, "tiny": 1e-300, "big": 1.5e300, "whole": 100.0, "t": True, "f": False,
            "list": ["x", 1, 2.5], "odd key": 1, "inf": math.inf,
            "table": {"3.mlp.*": 0.7, "name": "wanda", "nested": {"k": "v"}}}
    assert tomllib.loads(toml.dumps(data)) == data
    assert "nan" in toml.toml_value(math.nan)
    with pytest.raises(toml.TomlError):
        toml.toml_value(object())


def test_every_run_setting_has_a_recipe_key():
    """A RunConfig field must reach the recipe: through the prune option of its name, a renamed one
    (FIELD_TO_PARAM), a scope table, or be listed as not carried (NOT_ON_CLI) / API-only."""
    params = {p.name for p in prune.params}
    for f in dataclasses.fields(RunConfig):
        name = recipe.FIELD_TO_PARAM.get(f.name, f.name)
        assert (name in params or f.name.endswith("_options") or f.name in recipe.NOT_ON_CLI
                or f.name in recipe.API_ONLY), f"RunConfig.{f.name} has no prune option and no recipe mapping"


def test_recipe_refuses_a_setting_no_option_can_express():
    """A manifest from a newer compresskit with a setting this one cannot pass to prune: refused, not dropped."""
    manifest = {"config": {**dataclasses.asdict(RunConfig()), "future_setting": 3}, "resolved": {}}
    with pytest.raises(Exception, match="future_setting=3 has no `compresskit prune` option"):
        recipe.from_manifest(manifest, prune)


def test_task_lists_round_trip_as_arrays(tmp_path, monkeypatch):
    manifest = {"config": dataclasses.asdict(RunConfig(eval_tasks=("piqa", "arc_easy"), eval_task_limit=5)),
                "resolved": {"model": "random:tiny"}}
    text = recipe.from_manifest(manifest, prune)
    assert 'eval-tasks = ["piqa", "arc_easy"]' in text and "eval-limit = 5" in text
    path = tmp_path / "r.toml"
    path.write_text(text)
    config, _ = _resolved(monkeypatch, "--recipe", path)
    assert config.eval_tasks == ("piqa", "arc_easy") and config.eval_task_limit == 5
