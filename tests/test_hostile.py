"""Hostile input and faults, one case per test: nothing silent, nothing destroyed, no raw tracebacks.

Every case goes through the command line (``CliRunner`` on ``cli``, or ``main()`` in-process
where the console script's own handling matters) or the public Python API, and asserts the exit
status, the key words of the message and what is on disk afterwards (an earlier output intact,
no hidden temporary directory left). Checkpoints, files and one earlier output are built once
per module on ``random:tiny``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

import hang

import compresskit
import compresskit.cli.common as cli_mod
from compresskit.cli import main as cli_main
from compresskit.cli import cli
from compresskit.errors import OptionError, UnknownPluginError

TINY = ["--adapter", "llama", "--model", "random:tiny", "--nsamples", "2", "--seqlen", "16", "--no-progress"]
WANDA = [*TINY, "--metric", "wanda"]
API = dict(adapter="llama", model="random:tiny", metric="wanda", nsamples=2, seqlen=16, device="cpu", progress=False)


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """random:tiny's matrices are too small for threads; on a busy machine they only spin."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)



def invoke(*args: str, env: dict | None = None):
    """Run the CLI group; an exception other than the CLI's own exit is a raw traceback: fail."""
    r = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=True)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        pytest.fail("raw exception:\n" + "".join(traceback.format_exception(r.exception)))
    assert "Traceback" not in r.output
    return r


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The console script in-process: ``(exit status, stdout, stderr)``; plugin commands and the
    registry are reset so that environment variables set by the test apply."""
    monkeypatch.setattr(cli_mod, "_REGISTRY", [])
    monkeypatch.setattr(cli, "commands", dict(cli.commands))
    monkeypatch.setattr(sys, "argv", ["compresskit", *args])
    try:
        cli_main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def fresh_registry(monkeypatch):
    monkeypatch.setattr(cli_mod, "_REGISTRY", [])


def snapshot(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` by relative path."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Hidden temporary siblings (``.<name>.tmp-*``, ``.<name>.old-*``, probes) left in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and
                  any(mark in p.name for mark in (".tmp-", ".old-", ".dense-", "probe")))


def save_tensors(directory: Path, mutate) -> Path:
    from safetensors.torch import load_file, save_file

    f = directory / "model.safetensors"
    sd = load_file(str(f))
    mutate(sd)
    save_file(sd, str(f), metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Checkpoints, calibration files and an earlier output, built once."""
    from safetensors.torch import load_file, save_file

    from compresskit_plugins.adapters.llama.sources import random_model

    root = tmp_path_factory.mktemp("hostile")
    model, tok = random_model("tiny")
    good = root / "good"
    model.save_pretrained(good, safe_serialization=True)
    tok.save_pretrained(good)
    w: dict[str, Path] = {"root": root, "good": good}
    for name in ("trunc", "corrupt", "missing", "renamed", "nanw", "infw", "overflow"):
        w[name] = root / name
        shutil.copytree(good, w[name])
    data = (good / "model.safetensors").read_bytes()
    (w["trunc"] / "model.safetensors").write_bytes(data[: len(data) // 2])
    (w["corrupt"] / "model.safetensors").write_bytes(os.urandom(4096))
    sd = load_file(str(good / "model.safetensors"))
    key = "model.layers.0.mlp.down_proj.weight"
    save_file({k: v for k, v in sd.items() if k != key}, str(w["missing"] / "model.safetensors"), metadata={"format": "pt"})
    save_file({k.replace("down_proj", "down_projection"): v for k, v in sd.items()},
              str(w["renamed"] / "model.safetensors"), metadata={"format": "pt"})
    save_tensors(w["nanw"], lambda d: d[key].view(-1).__setitem__(7, float("nan")))
    save_tensors(w["infw"], lambda d: d["model.embed_tokens.weight"].view(-1).__setitem__(3, float("inf")))
    # finite weights whose activations overflow: block 1's inputs are scaled to ~3e38, squares are inf
    save_tensors(w["overflow"], lambda d: d["model.layers.1.input_layernorm.weight"].fill_(3e38))
    (root / "empty").mkdir()
    (root / "empty.txt").write_text("\n\n   \n")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    (root / "notext.jsonl").write_text('{"body": "no text field"}\n')
    (root / "short.txt").write_text("tiny\n\nalso tiny\n")
    (root / "table.csv").write_text("a,b\n1,2\n")
    (root / "random.pth").write_bytes(os.urandom(2048))
    (root / "map_nomatch.json").write_text(json.dumps({"*.no_such_layer": 0.5}))
    (root / "map_bad.json").write_text("{'*': 0.5")
    previous = root / "previous"
    r = CliRunner().invoke(cli, ["prune", *WANDA, "--output", str(previous)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    w["previous"] = previous
    return w


@pytest.fixture
def earlier(world, tmp_path):
    """A copy of an earlier compresskit output at ``tmp_path/out`` and its snapshot."""
    out = tmp_path / "out"
    shutil.copytree(world["previous"], out)
    return out, snapshot(out)


def gradient_file(path: Path, mutate=None) -> Path:
    """A reference-style gradient file for random:tiny (keys ``<name>_layer_<i>``)."""
    from compresskit_plugins.adapters.llama.sources import random_model

    model, _ = random_model("tiny")
    grads = {}
    for i, block in enumerate(model.model.layers):
        for name, m in block.named_modules():
            if isinstance(m, torch.nn.Linear):
                grads[f"{name}_layer_{i}"] = torch.rand(m.weight.shape).half()
    if mutate:
        mutate(grads)
    torch.save(grads, path)
    return path


def plugin_file(tmp_path: Path, name: str, body: str) -> str:
    p = tmp_path / f"{name}.py"
    p.write_text("from compresskit import hookimpl\n" + body)
    return str(p)


# --------------------------------------------------------------------------- --model: missing, empty, damaged


def test_model_missing_path(tmp_path):
    r = invoke("prune", "--model", str(tmp_path / "nope"), "--metric", "wanda", "--output", str(tmp_path / "o"))
    assert r.exit_code == 1 and "no such directory" in r.output and "random:tiny" in r.output
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_model_empty_directory(world, tmp_path):
    r = invoke("prune", "--model", str(world["root"] / "empty"), "--metric", "wanda", "--output", str(tmp_path / "o"))
    assert r.exit_code == 1 and "no config.json" in r.output
    assert not (tmp_path / "o").exists()


def test_model_is_a_file(world, tmp_path):
    r = invoke("prune", "--model", str(world["root"] / "empty.txt"), "--metric", "wanda")
    assert r.exit_code == 1 and "is a file, not a directory" in r.output


def test_model_truncated_safetensors(world, tmp_path):
    r = invoke("prune", "--model", str(world["trunc"]), "--metric", "wanda", "--output", str(tmp_path / "o"))
    assert r.exit_code == 1 and "could not load model" in r.output and "intact" in r.output
    assert len(r.output.strip().splitlines()) <= 2 and not (tmp_path / "o").exists()


def test_model_corrupt_safetensors(world, tmp_path):
    r = invoke("prune", "--model", str(world["corrupt"]), "--metric", "wanda", "--output", str(tmp_path / "o"))
    assert r.exit_code == 1 and "could not load model" in r.output and "Safetensor" in r.output
    assert not (tmp_path / "o").exists()


def test_model_missing_tensor_is_refused(world, tmp_path):
    r = invoke("prune", "--model", str(world["missing"]), "--metric", "wanda", "--output", str(tmp_path / "o"))
    assert r.exit_code == 1 and "lacks 1 tensors" in r.output and "mlp.down_proj" in r.output
    assert "LOAD REPORT" not in r.output and not (tmp_path / "o").exists()


def test_model_renamed_tensors_are_refused(world, tmp_path):
    r = invoke("prune", "--model", str(world["renamed"]), "--metric", "wanda", "--output", str(tmp_path / "o"))
    assert r.exit_code == 1 and "renamed?" in r.output and "down_projection" in r.output
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- non-finite values


def test_nan_weight_in_checkpoint(world, earlier):
    out, before = earlier
    r = invoke("prune", "--model", str(world["nanw"]), "--nsamples", "2", "--seqlen", "16", "--no-progress",
               "--metric", "wanda", "--output", str(out), "--overwrite")
    assert r.exit_code == 1 and "non-finite" in r.output and "model.layers.0.mlp.down_proj.weight" in r.output
    assert "1 NaN" in r.output and snapshot(out) == before and leftovers(out.parent) == []


def test_inf_weight_in_checkpoint(world, tmp_path):
    r = invoke("prune", "--model", str(world["infw"]), "--nsamples", "2", "--seqlen", "16", "--no-progress",
               "--metric", "magnitude", "--output", str(tmp_path / "o"))
    assert r.exit_code == 1 and "1 inf" in r.output and "embed_tokens" in r.output
    assert not (tmp_path / "o").exists()


def test_overflowing_activations_name_the_layer(world, tmp_path):
    r = invoke("prune", "--model", str(world["overflow"]), "--nsamples", "2", "--seqlen", "16", "--no-progress",
               "--metric", "wanda", "--output", str(tmp_path / "o"))
    assert r.exit_code == 1 and "block 1" in r.output and "calibration inputs (activations)" in r.output
    assert "float32" in r.output and not (tmp_path / "o").exists() and leftovers(tmp_path) == []


NAN_METRIC = """
from compresskit import ScoreMetric

class NaNScores(ScoreMetric):
    '''Scores that are NaN in one column.'''
    name = "nanscores"
    summary = "test"
    def statistics(self):
        return ("act_sq",)
    def score(self, weight, stats):
        s = weight.abs().clone()
        s[:, 0] = float("nan")
        return s

@hookimpl
def register_metrics(register):
    register(NaNScores)
"""


def test_nan_scores_stop_the_run(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESSKIT_PLUGINS", plugin_file(tmp_path, "nanscores", NAN_METRIC))
    fresh_registry(monkeypatch)
    r = invoke("prune", *TINY, "--metric", "nanscores", "--output", str(tmp_path / "o"))
    assert r.exit_code == 1 and "block 0" in r.output and "scores of metric 'nanscores'" in r.output
    assert "NaN" in r.output and not (tmp_path / "o").exists()


NAN_SOLVER = """
from compresskit import Solver

class NaNSolver(Solver):
    '''Writes a NaN.'''
    name = "nansolver"
    summary = "test"
    def solve(self, weight, mask, stats):
        new = weight.masked_fill(mask, 0.0)
        new[0, 0] = float("inf")
        return new

@hookimpl
def register_solvers(register):
    register(NaNSolver)
"""


def test_non_finite_solver_weights_stop_the_run(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESSKIT_PLUGINS", plugin_file(tmp_path, "nansolver", NAN_SOLVER))
    fresh_registry(monkeypatch)
    r = invoke("prune", *WANDA, "--update", "nansolver", "--output", str(tmp_path / "o"))
    assert r.exit_code == 1 and "weights from solver 'nansolver'" in r.output and "inf" in r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_metric_alpha_not_finite(value):
    r = invoke("prune", *TINY, "--metric", "gblm", "-o", f"metric.alpha={value}")
    assert r.exit_code == 1 and "metric.alpha must be a finite number" in r.output


def test_imported_gradients_with_nan(world, tmp_path):
    f = gradient_file(tmp_path / "g.pth", lambda d: d["mlp.up_proj_layer_1"].view(-1).__setitem__(0, float("nan")))
    r = invoke("prune", *TINY, "--metric", "gradient", "--gradients", str(f), "--output", str(tmp_path / "o"))
    assert r.exit_code == 1 and "NaN/inf" in r.output and "mlp.up_proj_layer_1" in r.output
    assert not (tmp_path / "o").exists()


def test_imported_gradients_negative(tmp_path):
    f = gradient_file(tmp_path / "g.pth", lambda d: d["self_attn.q_proj_layer_0"].view(-1).__setitem__(5, -1.0))
    r = invoke("prune", *TINY, "--metric", "gradient", "--gradients", str(f))
    assert r.exit_code == 1 and "negative values" in r.output and "self_attn.q_proj_layer_0" in r.output


def test_gradients_random_bytes(world, tmp_path):
    r = invoke("prune", *TINY, "--metric", "gblm", "--gradients", str(world["root"] / "random.pth"),
               "--output", str(tmp_path / "o"))
    assert r.exit_code == 1 and "could not read" in r.output and "gradient_computation.py" in r.output
    assert "weights_only` set to `False`" not in r.output and not (tmp_path / "o").exists()


def test_computed_gradients_overflow_are_not_cached(monkeypatch, tmp_path):
    from compresskit.engine import gradients

    real = gradients.compute

    def overflowing(*args, **kwargs):
        parts = real(*args, **kwargs)
        for per_layer in parts.values():
            per_layer["mlp.gate_proj_layer_1"]["sum"][0, 0] = float("inf")
        return parts

    monkeypatch.setattr(gradients, "compute", overflowing)
    monkeypatch.setenv("COMPRESSKIT_CACHE", str(tmp_path / "cache"))
    r = invoke("prune", *TINY, "--metric", "gblm", "--output", str(tmp_path / "o"))
    assert r.exit_code == 1 and "computed for layer 'mlp.gate_proj_layer_1'" in r.output and "float32" in r.output
    assert not list((tmp_path / "cache").rglob("*.safetensors")) and not (tmp_path / "o").exists()


def test_tampered_gradient_cache_is_recomputed(monkeypatch, tmp_path, caplog):
    from safetensors import safe_open
    from safetensors.torch import save_file

    monkeypatch.setenv("COMPRESSKIT_CACHE", str(tmp_path / "cache"))
    assert invoke("prune", *TINY, "--metric", "gblm", "--no-error-report").exit_code == 0
    (cached,) = (tmp_path / "cache" / "gradients").glob("*.safetensors")
    with safe_open(str(cached), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["mlp.up_proj_layer_0"] = tensors["mlp.up_proj_layer_0"] * 3  # same keys and shapes, other bytes
    save_file(tensors, str(cached), metadata=meta)
    caplog.set_level(logging.WARNING, logger="compresskit")
    r = invoke("prune", *TINY, "--metric", "gblm", "--no-error-report", "--output", str(tmp_path / "o"))
    assert r.exit_code == 0 and "checksum mismatch" in caplog.text
    man = json.loads((tmp_path / "o" / "compresskit.json").read_text())
    assert man["gradients"]["statistics"]["grad_l1"]["cache"] == "computed"


def test_cached_gradients_with_nan_are_recomputed(monkeypatch, tmp_path, caplog):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from compresskit.engine.gradcache import content_sha256

    monkeypatch.setenv("COMPRESSKIT_CACHE", str(tmp_path / "cache"))
    assert invoke("prune", *TINY, "--metric", "gblm", "--no-error-report").exit_code == 0
    (cached,) = (tmp_path / "cache" / "gradients").glob("*.safetensors")
    with safe_open(str(cached), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["mlp.down_proj_layer_1"][0, 0] = float("nan")
    meta["content_sha256"] = content_sha256(tensors)  # a consistent file that holds a NaN
    save_file(tensors, str(cached), metadata=meta)
    caplog.set_level(logging.WARNING, logger="compresskit")
    r = invoke("prune", *TINY, "--metric", "gblm", "--no-error-report", "--output", str(tmp_path / "o"))
    assert r.exit_code == 0 and "non-finite or negative values (layer mlp.down_proj_layer_1)" in caplog.text
    man = json.loads((tmp_path / "o" / "compresskit.json").read_text())
    assert man["gradients"]["statistics"]["grad_l1"]["cache"] == "computed"


def test_reconstruction_error_never_hides_nan():
    import math

    from compresskit.ops import reconstruction_error

    w = torch.ones(2, 3)
    gram = torch.eye(3)
    gram[1, 1] = float("nan")
    assert math.isnan(reconstruction_error(w, w * 0, gram))
    assert reconstruction_error(w, w, torch.zeros(3, 3)) == 0.0  # a layer that saw only zeros


# --------------------------------------------------------------------------- settings that contradict or are ignored


def test_pattern_shorthand_contradicted_by_option():
    r = invoke("prune", *WANDA, "--pattern", "2:4", "-o", "pattern.n=1")
    assert r.exit_code == 1 and "--pattern 2:4 sets n=2" in r.output and "drop one" in r.output


def test_pattern_contradicts_sparsity():
    r = invoke("prune", *WANDA, "--pattern", "2:4", "--sparsity", "0.6")
    assert r.exit_code == 1 and "contradicts" in r.output


def test_gradient_file_with_gradient_free_metric(tmp_path):
    f = gradient_file(tmp_path / "g.pth")
    r = invoke("prune", *WANDA, "--gradients", str(f), "--output", str(tmp_path / "o"))
    assert r.exit_code == 1 and "uses no gradients" in r.output and not (tmp_path / "o").exists()


def test_gradient_option_with_gradient_free_metric():
    r = invoke("prune", *WANDA, "-o", "gradient.checkpointing=true")
    assert r.exit_code == 1 and "uses no gradients" in r.output


def test_seqlen_beyond_context(tmp_path):
    r = invoke("prune", *WANDA, "--seqlen", "4096", "--output", str(tmp_path / "o"))
    assert r.exit_code == 1 and "exceeds the context length" in r.output and "1024" in r.output
    assert not (tmp_path / "o").exists()


def test_sparsity_that_rounds_to_little_warns(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="compresskit")
    r = invoke("prune", *WANDA, "--sparsity", "0.01", "--output", str(tmp_path / "o"))
    assert r.exit_code == 0 and "rounds down" in caplog.text and "prunes 0.0017 overall instead of 0.01" in caplog.text  # docs/howto/errors.md quotes it
    man = json.loads((tmp_path / "o" / "compresskit.json").read_text())
    assert "rounds down" in man["notes"]["compresskit"]["warnings"][0]


def test_sparsity_that_prunes_nothing_is_an_error(tmp_path):
    r = invoke("prune", *WANDA, "--sparsity", "0.005", "--output", str(tmp_path / "o"))
    assert r.exit_code == 1 and "prunes nothing" in r.output and "pattern.scope=layer" in r.output
    assert not (tmp_path / "o").exists()


def test_sparsity_map_overrides_a_uniform_target_that_would_round_to_nothing(tmp_path):
    (tmp_path / "map.json").write_text(json.dumps({"*": 0.5}))
    r = invoke("prune", *WANDA, "--sparsity", "0.005", "--sparsity-map", str(tmp_path / "map.json"),
               "--output", str(tmp_path / "o"))
    assert r.exit_code == 0 and "overall sparsity 0.5000" in r.output


@pytest.mark.parametrize("value", ["1.5", "nan"])
def test_sparsity_out_of_range(value):
    r = invoke("prune", *WANDA, "--sparsity", value)
    assert r.exit_code == 1 and "sparsity must be" in r.output


def test_nsamples_zero():
    r = invoke("prune", "--adapter", "llama", "--model", "random:tiny", "--metric", "wanda", "--nsamples", "0")
    assert r.exit_code == 1 and "nsamples must be >= 1" in r.output


def test_negative_eval_windows():
    r = invoke("prune", *WANDA, "--eval-windows", "-1")
    assert r.exit_code == 1 and "--eval-windows" in r.output and ">= 0" in r.output


def test_unknown_adapter_dtype():
    r = invoke("prune", *WANDA, "-o", "adapter.dtype=float8")
    assert r.exit_code == 1 and "adapter.dtype='float8' is not one of float32, bfloat16, float16" in r.output


def test_unknown_metric_option_names_its_scope():
    r = invoke("prune", *WANDA, "-o", "metric.scope=row")
    assert r.exit_code == 1 and "unknown option 'metric.scope'" in r.output and "-o pattern.scope=" in r.output


def test_option_without_scope():
    r = invoke("prune", *WANDA, "-o", "alpha=1")
    assert r.exit_code == 2 and "SCOPE.KEY=VALUE" in r.output


def test_update_typo_suggests():
    r = invoke("prune", *WANDA, "--update", "obz")
    assert r.exit_code == 1 and "Did you mean 'obs'" in r.output


def test_sparsity_map_glob_matching_nothing(world):
    r = invoke("prune", *WANDA, "--sparsity-map", str(world["root"] / "map_nomatch.json"))
    assert r.exit_code == 1 and "matches no prunable layer" in r.output


def test_sparsity_map_not_json(world):
    r = invoke("prune", *WANDA, "--sparsity-map", str(world["root"] / "map_bad.json"))
    assert r.exit_code == 1 and "not valid JSON" in r.output


def test_device_bogus(tmp_path):
    r = invoke("prune", *WANDA, "--device", "bogus", "--output", str(tmp_path / "o"))
    assert r.exit_code == 1 and "'bogus' is not a device" in r.output and "use auto, cpu" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_gpu():
    r = invoke("prune", *WANDA, "--device", "cuda")
    assert r.exit_code == 1 and "no CUDA device is available" in r.output and "--device cpu" in r.output


# --------------------------------------------------------------------------- calibration data


@pytest.mark.parametrize("name, words", [
    ("empty.txt", "holds no text"),
    ("binary.txt", "is not UTF-8 text"),
    ("bad.jsonl", "line 2 is not valid JSON"),
    ("notext.jsonl", "no string 'text' field"),
    ("table.csv", "unsupported file type '.csv'"),
    ("short.txt", "no document is longer than seqlen=16"),
    ("does-not-exist.txt", "unknown text source"),
])
def test_bad_calibration_file(world, tmp_path, name, words):
    r = invoke("prune", *WANDA, "--calibration", str(world["root"] / name), "--output", str(tmp_path / "o"))
    assert r.exit_code == 1 and words in r.output and not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- the Python API


@pytest.mark.parametrize("bad, words", [
    (dict(sparsity="0.5"), "sparsity must be a number"),
    (dict(nsamples=2.5), "nsamples must be an integer"),
    (dict(propagate="sideways"), "propagate must be one of pruned, dense"),
    (dict(device=3), "device must be a name"),
    (dict(metric_options="alpha=1"), "metric_options must be a dict"),
    (dict(nsample=2), "Did you mean 'nsamples'"),
    (dict(seqlen=True), "seqlen must be an integer"),
])
def test_api_wrong_types(bad, words):
    with pytest.raises(OptionError, match=words):
        compresskit.prune(**{**API, **bad})


def test_api_update_typo():
    with pytest.raises(UnknownPluginError, match="Did you mean 'obs'"):
        compresskit.prune(**API, update="obz")


def test_api_update_in_capitals_runs_obs():
    res = compresskit.prune(**API, update="OBS", report_error=False)
    assert res.manifest["resolved"]["solver"] == "obs"


# --------------------------------------------------------------------------- eval


def test_eval_json_of_broken_model_is_valid_json(world, tmp_path):
    out = tmp_path / "broken"
    shutil.copytree(world["previous"], out)
    save_tensors(out, lambda d: d["model.layers.0.mlp.down_proj.weight"].fill_(float("nan")))
    (tmp_path / "doc.txt").write_text("hello world, " * 200)
    r = invoke("eval", str(out), "--json", "--no-progress", "--windows", "2", "--seqlen", "32",
               "--data", str(tmp_path / "doc.txt"))
    assert r.exit_code == 1 and "numerically broken" in r.stderr
    res = json.loads(r.stdout)
    assert res["perplexity"] is None and res["status"] == "non_finite" and res["non_finite"] == ["perplexity"]


def test_eval_json_of_intact_model_says_ok(world, tmp_path):
    (tmp_path / "doc.txt").write_text("hello world, " * 200)
    r = invoke("eval", str(world["previous"]), "--json", "--no-progress", "--windows", "2", "--seqlen", "32",
               "--data", str(tmp_path / "doc.txt"))
    assert r.exit_code == 0
    res = json.loads(r.stdout)
    assert res["status"] == "ok" and res["perplexity"] > 1


def test_eval_corrupt_manifest(world, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(world["previous"], out)
    (out / "compresskit.json").write_text("{not json")
    r = invoke("eval", str(out), "--json", "--no-progress")
    assert r.exit_code == 1 and "compresskit.json is corrupt" in r.output and "re-run the prune" in r.output
    assert (out / "compresskit.json").read_text() == "{not json"


def test_eval_manifest_not_an_object(world, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(world["previous"], out)
    (out / "compresskit.json").write_text("[1, 2]")
    r = invoke("eval", str(out), "--no-progress")
    assert r.exit_code == 1 and "does not hold a JSON object" in r.output


def test_eval_missing_model(tmp_path):
    r = invoke("eval", str(tmp_path / "nope"), "--no-progress")
    assert r.exit_code == 1 and "no such directory" in r.output


def test_eval_negative_windows(world):
    r = invoke("eval", str(world["previous"]), "--windows", "-1", "--no-progress")
    assert r.exit_code == 1 and "integer >= 0" in r.output


def test_eval_seqlen_beyond_context(world):
    r = invoke("eval", str(world["previous"]), "--seqlen", "5000", "--no-progress")
    assert r.exit_code == 1 and "exceeds the context length" in r.output


# --------------------------------------------------------------------------- outputs: never destroy data


def test_overwrite_refuses_a_foreign_directory(tmp_path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("precious")
    r = invoke("prune", *WANDA, "--output", str(mine), "--overwrite")
    assert r.exit_code == 1 and "not a compresskit output" in r.output
    assert (mine / "chapter1.tex").read_text() == "precious" and sorted(os.listdir(mine)) == ["chapter1.tex"]


def test_output_is_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep").write_text("x")
    r = invoke("prune", *WANDA, "--output", ".", "--overwrite")
    assert r.exit_code == 1 and "working directory" in r.output and (tmp_path / "keep").exists()


def test_output_is_a_parent_of_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    r = invoke("prune", *WANDA, "--output", "..", "--overwrite")
    assert r.exit_code == 1 and "parent of it" in r.output and (tmp_path / "sub").is_dir()


def test_output_symlink_is_refused(earlier, tmp_path):
    out, before = earlier
    link = tmp_path / "link"
    link.symlink_to(out)
    r = invoke("prune", *WANDA, "--output", str(link), "--overwrite")
    assert r.exit_code == 1 and "symbolic link" in r.output and str(out.resolve()) in r.output
    assert link.is_symlink() and snapshot(out) == before


def test_output_is_a_file(tmp_path):
    f = tmp_path / "model.bin"
    f.write_text("data")
    r = invoke("prune", *WANDA, "--output", str(f))
    assert r.exit_code == 2 and f.read_text() == "data"  # click's own path check, before anything


def test_output_parent_is_a_file(tmp_path):
    (tmp_path / "f").write_text("data")
    r = invoke("prune", *WANDA, "--output", str(tmp_path / "f" / "out"))
    assert r.exit_code == 1 and "is not a directory" in r.output and (tmp_path / "f").read_text() == "data"


def test_existing_output_without_overwrite(earlier):
    out, before = earlier
    r = invoke("prune", *WANDA, "--output", str(out))
    assert r.exit_code == 1 and "--overwrite" in r.output and snapshot(out) == before


def test_overwrite_replaces_an_earlier_output(earlier):
    out, before = earlier
    r = invoke("prune", *WANDA, "--sparsity", "0.25", "--output", str(out), "--overwrite")
    assert r.exit_code == 0 and snapshot(out) != before and leftovers(out.parent) == []
    assert json.loads((out / "compresskit.json").read_text())["resolved"]["sparsity"] == 0.25


def test_overwrite_of_an_empty_directory(tmp_path):
    (tmp_path / "o").mkdir()
    r = invoke("prune", *WANDA, "--output", str(tmp_path / "o"), "--overwrite")
    assert r.exit_code == 0 and (tmp_path / "o" / "compresskit.json").is_file() and leftovers(tmp_path) == []


def test_output_keeps_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        r = invoke("prune", *WANDA, "--output", str(tmp_path / "o"))
    finally:
        os.umask(old)
    assert r.exit_code == 0
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "o" / "compresskit.json").stat().st_mode & 0o777 == 0o644


def test_failed_final_rename_restores_the_previous_output(earlier, monkeypatch):
    from compresskit import cache

    out, before = earlier
    real = os.replace

    def flaky(src, dst):
        if Path(src).name.startswith(".out.tmp-"):  # the final rename of the new output
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(cache.os, "replace", flaky)
    r = invoke("prune", *WANDA, "--output", str(out), "--overwrite")
    assert r.exit_code == 1 and "could not write output" in r.output and "nothing was written" in r.output
    assert snapshot(out) == before and leftovers(out.parent) == []


# --------------------------------------------------------------------------- faults found late, found early


def test_read_only_location_fails_before_loading(tmp_path, monkeypatch):
    from compresskit import output

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(output.tempfile, "TemporaryFile", read_only)
    # the model path is broken too: the output error comes first, before any loading
    r = invoke("prune", "--model", str(tmp_path / "no-model"), "--metric", "wanda", "--output", str(tmp_path / "o"))
    assert r.exit_code == 1 and "not writable (Read-only file system)" in r.output
    assert not (tmp_path / "o").exists()


def test_full_disk_fails_before_calibration(tmp_path, monkeypatch):
    from compresskit import output
    from compresskit_plugins.adapters.llama import LlamaAdapter

    monkeypatch.setattr(output.shutil, "disk_usage", lambda p: SimpleNamespace(total=10 << 20, used=9 << 20, free=1 << 20))
    monkeypatch.setattr(LlamaAdapter, "calibration_batches", lambda *a, **k: pytest.fail("calibrated"))
    r = invoke("prune", *WANDA, "--output", str(tmp_path / "o"))
    assert r.exit_code == 1 and "not enough space" in r.output and "1.0 MiB free" in r.output
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_disk_full_while_writing(earlier, monkeypatch):
    from compresskit_plugins.adapters.llama import LlamaAdapter

    out, before = earlier

    def full(self, loaded, directory):
        (directory / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LlamaAdapter, "save", full)
    r = invoke("prune", *WANDA, "--output", str(out), "--overwrite")
    assert r.exit_code == 1 and "No space left on device" in r.output
    assert snapshot(out) == before and leftovers(out.parent) == []


SIGNAL_ADAPTER = """
import os, signal, time
from compresskit_plugins.adapters.llama import LlamaAdapter

class Interrupted(LlamaAdapter):
    '''Writes half a model, then the signal named by $HOSTILE_SIGNAL arrives.'''
    name = "interrupted"
    def save(self, loaded, directory):
        (directory / "model.safetensors").write_bytes(b"half")
        (directory / "READY").write_text("")
        sig = os.environ.get("HOSTILE_SIGNAL", "wait")
        if sig == "wait":
            time.sleep(60)
        os.kill(os.getpid(), getattr(signal, sig))
        time.sleep(5)

@hookimpl
def register_adapters(register):
    register(Interrupted)
"""


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_while_saving_removes_the_temporary_directory(earlier, tmp_path, monkeypatch, capsys, sig, code):
    out, before = earlier
    monkeypatch.setenv("COMPRESSKIT_PLUGINS", plugin_file(tmp_path, "interrupted", SIGNAL_ADAPTER))
    monkeypatch.setenv("HOSTILE_SIGNAL", sig)
    handler = signal.getsignal(signal.SIGTERM)
    status, _, err = run_main(monkeypatch, capsys, "prune", "--adapter", "interrupted", *WANDA[2:],
                              "--output", str(out), "--overwrite")
    assert status == code and ("terminated" in err or "interrupted" in err)
    assert snapshot(out) == before and leftovers(out.parent) == []
    assert signal.getsignal(signal.SIGTERM) == handler  # restored after the save


def test_ignored_signals_stay_ignored_while_saving(monkeypatch):
    from compresskit.output import signals_as_exceptions

    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with signals_as_exceptions():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)


@pytest.mark.skipif(__import__("importlib").util.find_spec("compressed_tensors") is None,
                    reason="needs the export extra")
def test_sigterm_while_saving_another_format_removes_the_scratch_copy(earlier, tmp_path, monkeypatch, capsys):
    out, before = earlier
    monkeypatch.setenv("COMPRESSKIT_PLUGINS", plugin_file(tmp_path, "interrupted", SIGNAL_ADAPTER))
    monkeypatch.setenv("HOSTILE_SIGNAL", "SIGTERM")
    status, _, err = run_main(monkeypatch, capsys, "prune", "--adapter", "interrupted", *WANDA[2:], "--output",
                              str(out), "--overwrite", "--save-format", "compressed-tensors")
    assert status == 143 and "terminated" in err
    assert snapshot(out) == before and leftovers(out.parent) == []


def test_sigterm_to_a_real_process_while_saving(earlier, tmp_path):
    out, before = earlier
    env = {**os.environ, "COMPRESSKIT_PLUGINS": plugin_file(tmp_path, "interrupted", SIGNAL_ADAPTER),
           "HOSTILE_SIGNAL": "wait", "OMP_NUM_THREADS": "1"}
    exe = Path(sys.executable).with_name("compresskit")
    proc = subprocess.Popen([str(exe), "prune", "--adapter", "interrupted", *WANDA[2:], "--output", str(out),
                             "--overwrite"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hang.wait_for(lambda: bool(list(out.parent.glob(".out.tmp-*/READY"))), "the half-written output", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = hang.communicate(proc, "the process after SIGTERM")
    assert proc.returncode == 143 and "terminated by signal SIGTERM" in err and "Traceback" not in err
    assert snapshot(out) == before and leftovers(out.parent) == []


def test_stale_temporaries_of_the_output_are_cleaned(tmp_path):
    stale = tmp_path / ".o.tmp-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"0" * 1000)
    other = tmp_path / ".other.tmp-xyz"  # another output's: not ours to touch
    other.mkdir()
    r = invoke("prune", *WANDA, "--output", str(tmp_path / "o"))
    assert r.exit_code == 0 and not stale.exists() and other.exists()


def test_stale_export_scratch_copy_is_cleaned(tmp_path):
    scratch = tmp_path / ".o.dense-k1ll3d"
    (scratch / "dense").mkdir(parents=True)
    r = invoke("prune", *WANDA, "--output", str(tmp_path / "o"))
    assert r.exit_code == 0 and not scratch.exists() and leftovers(tmp_path) == []


def test_output_orphaned_by_a_killed_overwrite_is_restored(world, tmp_path):
    trash = tmp_path / ".o.old-k1ll3d"
    trash.mkdir()
    shutil.copytree(world["previous"], trash / "old")
    before = snapshot(trash / "old")
    r = invoke("prune", *WANDA, "--output", str(tmp_path / "o"))
    assert r.exit_code == 1 and "--overwrite" in r.output  # the restored output is not replaced silently
    assert snapshot(tmp_path / "o") == before and leftovers(tmp_path) == []


def test_cache_is_a_file(tmp_path):
    (tmp_path / "cachefile").write_text("x")
    r = invoke("prune", *TINY, "--metric", "gblm", "--output", str(tmp_path / "o"),
               env={"COMPRESSKIT_CACHE": str(tmp_path / "cachefile")})
    assert r.exit_code == 1 and "is a file, not a directory" in r.output and "COMPRESSKIT_CACHE" in r.output
    assert not (tmp_path / "o").exists()


def test_unwritable_gradient_cache_is_a_warning(tmp_path, caplog):
    (tmp_path / "f").write_text("x")
    caplog.set_level(logging.WARNING, logger="compresskit")
    r = invoke("prune", *TINY, "--metric", "gblm", "--no-error-report", "--output", str(tmp_path / "o"),
               env={"COMPRESSKIT_CACHE": str(tmp_path / "f" / "cache")})
    assert r.exit_code == 0 and "could not write the gradient cache" in caplog.text
    assert (tmp_path / "o" / "compresskit.json").is_file()


@pytest.mark.skipif(__import__("importlib").util.find_spec("gensim") is None, reason="needs the gensim wheel's files")
def test_unwritable_corpus_cache_is_a_warning(tmp_path, caplog):
    (tmp_path / "f").write_text("x")
    caplog.set_level(logging.WARNING, logger="compresskit")
    r = invoke("prune", *WANDA, "--calibration", "lee", "--output", str(tmp_path / "o"),
               env={"COMPRESSKIT_CACHE": str(tmp_path / "f" / "cache")})
    assert r.exit_code == 0 and "could not cache the cleaned corpus" in caplog.text
    assert (tmp_path / "o" / "compresskit.json").is_file()


@pytest.mark.skipif(__import__("importlib").util.find_spec("gensim") is None, reason="needs the gensim wheel's files")
def test_damaged_corpus_cache_is_rebuilt(tmp_path, monkeypatch, caplog):
    from compresskit_plugins.adapters.llama import corpora

    monkeypatch.setenv("COMPRESSKIT_CACHE", str(tmp_path / "cache"))
    docs = corpora.load_corpus("lee").documents
    (cached,) = (tmp_path / "cache" / "corpora").glob("lee-*.jsonl")
    cached.write_bytes(b'"half a line\n\xff\xfe')
    caplog.set_level(logging.WARNING, logger="compresskit")
    r = invoke("prune", *WANDA, "--calibration", "lee")
    assert r.exit_code == 0 and "unreadable" in caplog.text
    assert [json.loads(x) for x in cached.read_text().splitlines()] == docs


@pytest.mark.skipif(__import__("importlib").util.find_spec("timm") is None, reason="needs timm")
def test_unwritable_probe_cache_is_a_warning(tmp_path, caplog):
    import numpy as np
    from PIL import Image

    for label, name in enumerate(("dark", "light")):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for k in range(4):
            Image.fromarray(np.full((24, 24, 3), 40 + 150 * label + k, np.uint8)).save(tmp_path / "imgs" / name / f"{k}.png")
    (tmp_path / "f").write_text("x")
    caplog.set_level(logging.WARNING, logger="compresskit")
    r = invoke("prune", "--adapter", "vit", "--model", "random:tiny", "--metric", "wanda", "--nsamples", "2",
               "--no-progress", "-o", "adapter.head=probe", "-o", f"adapter.probe_data={tmp_path / 'imgs'}",
               "-o", "adapter.probe_samples=8", "--output", str(tmp_path / "o"),
               env={"COMPRESSKIT_CACHE": str(tmp_path / "f" / "cache")})
    assert r.exit_code == 0 and "could not write the cache file" in caplog.text and "vit-probe" in caplog.text
    assert (tmp_path / "o" / "compresskit.json").is_file()


def test_unwritable_package_cache_falls_back_to_a_temporary_directory(tmp_path, monkeypatch, caplog):
    from compresskit import cache

    (tmp_path / "f").write_text("x")
    caplog.set_level(logging.WARNING, logger="compresskit")
    got = cache.writable_or_temporary(tmp_path / "f" / "debian" / "pkg", "Debian package pkg")
    assert got.name == "pkg" and got.parent.is_dir() and "for this run only" in caplog.text
    assert cache.writable_or_temporary(tmp_path / "ok" / "pkg", "x") == tmp_path / "ok" / "pkg"


# --------------------------------------------------------------------------- one bad plugin must not break the tool


BAD_PLUGINS = {
    "misspelled": ("@hookimpl\ndef register_metric(register):\n    pass\n", "FAILED", "unknown hook 'register_metric'"),
    "raising": ("@hookimpl\ndef register_metrics(register):\n    raise RuntimeError('boom')\n", "FAILED",
                "register_metrics raised RuntimeError: boom"),
    "invalid": ("class NotAMetric:\n    name = 'x'\n@hookimpl\ndef register_metrics(register):\n"
                "    register(NotAMetric)\n", "FAILED", "does not subclass ScoreMetric"),
    "duplicate": ("from compresskit import ScoreMetric\nclass Fake(ScoreMetric):\n    name = 'wanda'\n"
                  "    def score(self, w, s):\n        return -w.abs()\n@hookimpl\ndef register_metrics(register):\n"
                  "    register(Fake)\n", "FAILED", "metric 'wanda' is registered by both"),
    "nohooks": ("def register_metrics(register):\n    pass\n", "WARNING", "defines no @hookimpl function"),
    "importerror": ("import compresskit_no_such_dependency\n", "FAILED", "No module named"),
    "badcommand": ("@hookimpl\ndef register_commands(cli):\n    raise RuntimeError('cmd boom')\n", "FAILED",
                   "register_commands raised RuntimeError: cmd boom"),
    "hijack": ("import click\n@hookimpl\ndef register_commands(cli):\n    @cli.command('prune')\n"
               "    def evil():\n        click.echo('hijacked')\n", "FAILED", "would replace the existing command 'prune'"),
}


@pytest.mark.parametrize("name", list(BAD_PLUGINS))
def test_bad_plugin_is_reported_by_plugins_command(name, tmp_path, monkeypatch, capsys):
    body, level, words = BAD_PLUGINS[name]
    monkeypatch.setenv("COMPRESSKIT_PLUGINS", plugin_file(tmp_path, name, body))
    status, out, _ = run_main(monkeypatch, capsys, "plugins")
    line = next(ln for ln in out.splitlines() if ln.startswith(f"{level}: plugin {name}"))
    assert words in line and "wanda" in out
    assert status == (1 if level == "FAILED" else 0)  # a plugin the user named failed: listed, exit 1
    if name == "importerror":  # a module that never loaded: the fix is to drop it from $COMPRESSKIT_PLUGINS
        assert "fix or remove" in line and "COMPRESSKIT_PLUGINS" in line
    elif level == "FAILED":
        assert f"COMPRESSKIT_DISABLE_PLUGINS={name}" in line


def install_plugin(tmp_path: Path, monkeypatch, name: str, body: str) -> None:
    """``body`` as an *installed* plugin: a distribution ``<name>dist`` with a ``compresskit`` entry point."""
    import importlib

    site = tmp_path / "site"
    info = site / f"{name}dist-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}dist\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[compresskit]\n{name} = {name}_installed\n")
    (site / f"{name}_installed.py").write_text("from compresskit import hookimpl\n" + body)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()


@pytest.mark.parametrize("name", ["raising", "duplicate", "badcommand", "hijack", "importerror"])
def test_other_commands_keep_working_beside_a_bad_installed_plugin(name, tmp_path, monkeypatch, capsys, caplog):
    body, _, words = BAD_PLUGINS[name]
    install_plugin(tmp_path, monkeypatch, name, body)
    status, out, err = run_main(monkeypatch, capsys, "prune", *WANDA, "--output", str(tmp_path / "o"))
    assert f"plugin {name} ({name}dist 0.1)" in caplog.text and words in caplog.text  # isolated, with a warning
    assert status == 0 and "saved to" in out and "hijacked" not in out
    man = json.loads((tmp_path / "o" / "compresskit.json").read_text())
    assert man["plugins"]["metric"].startswith("wanda (compresskit")  # the built-in, never the duplicate


def test_plugins_json_lists_failures(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COMPRESSKIT_PLUGINS", plugin_file(tmp_path, "raising", BAD_PLUGINS["raising"][0]))
    status, out, _ = run_main(monkeypatch, capsys, "plugins", "--json")
    data = json.loads(out)
    assert status == 1 and [f["plugin"] for f in data["failed"]] == ["raising"]


def test_disabled_bad_plugin_is_silent(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COMPRESSKIT_PLUGINS", plugin_file(tmp_path, "raising", BAD_PLUGINS["raising"][0]))
    monkeypatch.setenv("COMPRESSKIT_DISABLE_PLUGINS", "raising")
    status, out, _ = run_main(monkeypatch, capsys, "plugins")
    assert status == 0 and "FAILED" not in out and "raising" not in out


def test_broken_third_party_distribution_is_named(tmp_path, monkeypatch, capsys):
    import importlib

    site = tmp_path / "site"
    (site / "baddist-0.3.dist-info").mkdir(parents=True)
    (site / "baddist-0.3.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: baddist\nVersion: 0.3\n")
    (site / "baddist-0.3.dist-info" / "entry_points.txt").write_text("[compresskit]\nbadplug = baddist_plugin\n")
    (site / "baddist_plugin.py").write_text("raise ImportError('needs libfoo')\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    status, out, _ = run_main(monkeypatch, capsys, "plugins")
    line = next(ln for ln in out.splitlines() if ln.startswith("FAILED"))
    assert status == 0 and "plugin badplug (baddist 0.3)" in line and "needs libfoo" in line
    status, out, _ = run_main(monkeypatch, capsys, "list", "metrics")
    assert status == 0 and "wanda" in out


RAISING_HOOK = """
@hookimpl
def run_started(run):
    raise RuntimeError("monitor lost its socket")
"""


def test_lifecycle_hook_that_raises_names_the_plugin(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COMPRESSKIT_PLUGINS", plugin_file(tmp_path, "monitor", RAISING_HOOK))
    status, out, err = run_main(monkeypatch, capsys, "prune", *WANDA, "--output", str(tmp_path / "o"))
    assert status == 1 and "plugin monitor failed: RuntimeError: monitor lost its socket" in err
    assert "COMPRESSKIT_DISABLE_PLUGINS=monitor" in err and len(err.strip().splitlines()) <= 2
    assert not (tmp_path / "o").exists()


CTRL_C_HOOK = """
@hookimpl
def block_done(run, block_index):
    raise KeyboardInterrupt
"""


def test_ctrl_c_during_the_run_exits_130(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COMPRESSKIT_PLUGINS", plugin_file(tmp_path, "ctrlc", CTRL_C_HOOK))
    status, _, err = run_main(monkeypatch, capsys, "prune", *WANDA, "--output", str(tmp_path / "o"))
    assert status == 130 and "interrupted" in err and not (tmp_path / "o").exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- conformance helpers catch broken plugins


def _metric_with(statistic):
    from compresskit import ScoreMetric

    class Probe(ScoreMetric):
        """A metric around one statistic."""

        name = "probe_metric"
        summary = "test"

        def statistics(self):
            return (statistic,)

        def score(self, weight, stats):
            return weight.abs()

    return Probe


def _sum_statistic(update):
    from compresskit.stats import Statistic

    class Sq(Statistic):
        name = "sq"

        def init(self, layer):
            return {"sum": torch.zeros(layer.in_features)}

        def update(self, parts, x):
            update(parts, x)

    return Sq()


def test_conformance_catches_a_statistic_that_does_not_accumulate():
    from compresskit.testing import PluginConformanceError, check_metric

    def replace(parts, x):
        parts["sum"].copy_(x.pow(2).sum(0))  # overwrites: only the last batch counts

    with pytest.raises(PluginConformanceError, match="does not accumulate"):
        check_metric(_metric_with(_sum_statistic(replace)), end_to_end=False)


def test_conformance_catches_a_no_op_update():
    from compresskit.testing import PluginConformanceError, check_metric

    with pytest.raises(PluginConformanceError, match="did not change its parts"):
        check_metric(_metric_with(_sum_statistic(lambda parts, x: None)), end_to_end=False)


def test_conformance_tests_non_default_options():
    import dataclasses

    from compresskit import ScoreMetric, option
    from compresskit.testing import PluginConformanceError, check_metric

    class Fragile(ScoreMetric):
        """Fine by default, NaN with eps=0."""

        name = "fragile"
        summary = "test"

        @dataclasses.dataclass(frozen=True)
        class Options:
            eps: float = option(1e-3, "added to the denominator")

        def score(self, weight, stats):
            return weight.abs() / (weight.abs() * 0 + self.options.eps) * (weight * 0 + 1)

    assert check_metric(Fragile, end_to_end=False)
    with pytest.raises(PluginConformanceError, match="non-finite"):
        check_metric(Fragile, end_to_end=False, options={"eps": 0.0})


def _pattern(structure, check=None):
    from compresskit import MaskPattern

    class P(MaskPattern):
        """A probe pattern."""

        name = "probe_pattern"
        summary = "test"

        @property
        def structure(self):
            return structure

        def check(self, layer_name, weight_shape, sparsity):
            if check:
                check(layer_name, weight_shape, sparsity)

        def mask(self, scores, sparsity):
            from compresskit.ops import lowest_mask, row_prune_count

            if structure.group == "nm":
                g = scores.reshape(scores.shape[0], -1, structure.m)
                idx = torch.topk(g, structure.n, dim=-1, largest=False)[1]
                return torch.zeros_like(g, dtype=torch.bool).scatter(-1, idx, True).reshape(scores.shape)
            return lowest_mask(scores, row_prune_count(scores.shape[-1], sparsity))

    return P


def test_conformance_pattern_check_raising_the_wrong_error():
    from compresskit import Structure
    from compresskit.testing import PluginConformanceError, check_pattern

    def bad(name, shape, s):
        raise ValueError("bad shape")

    with pytest.raises(PluginConformanceError, match="raised ValueError"):
        check_pattern(_pattern(Structure("row"), bad), end_to_end=False)


def test_conformance_grouped_pattern_must_refuse_indivisible_widths():
    from compresskit import Structure
    from compresskit.testing import PluginConformanceError, check_pattern

    with pytest.raises(PluginConformanceError, match="accepted an indivisible width"):
        check_pattern(_pattern(Structure("triples", 1, 3)), end_to_end=False)  # groups of 3, check() accepts all


def test_conformance_probe_width_fits_the_pattern():
    from compresskit.testing import check_pattern
    from compresskit_plugins.patterns.nm import NMPattern

    assert "check" in check_pattern(NMPattern, end_to_end=False, options={"n": 1, "m": 3})  # probe width 192


def test_conformance_checks_check_of_a_free_pattern():
    from compresskit import IncompatiblePatternError, Structure
    from compresskit.testing import PluginConformanceError, check_pattern

    def refuse(name, shape, s):
        raise IncompatiblePatternError(f"layer {name}: no")

    with pytest.raises(PluginConformanceError, match="rejected a 16x64 probe"):
        check_pattern(_pattern(Structure("row"), refuse), end_to_end=False)



# --------------------------------------------------------------------------- third round (issue 22)
# A plugin the user *named* (-p FILE|MODULE, $COMPRESSKIT_PLUGINS) that fails ends the command before any
# work; every suggested fix is one that works; --no-progress silences the libraries' bars too; a signal
# in the gradient pass or a --select sweep leaves no temporary file and no output; the output may not be
# (or contain) the model directory; two runs of one output; sparsity-map targets that round per shape.

NAMED_FAILURES = [n for n, (_, level, _) in BAD_PLUGINS.items() if level == "FAILED"]


@pytest.mark.parametrize("route", ["-p", "env"])
@pytest.mark.parametrize("name", NAMED_FAILURES)
def test_named_plugin_that_fails_stops_the_command_before_any_work(name, route, tmp_path, monkeypatch, capsys):
    body, _, words = BAD_PLUGINS[name]
    path = plugin_file(tmp_path, name, body)
    out = tmp_path / "o"
    args = ["prune", *WANDA, "--output", str(out)]
    if route == "-p":
        args = ["-p", path, *args]
    else:
        monkeypatch.setenv("COMPRESSKIT_PLUGINS", path)
    status, stdout, err = run_main(monkeypatch, capsys, *args)
    assert status == 1 and f"plugin {name}" in err and words in err and "nothing was run" in err
    assert "overall sparsity" not in stdout and not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("spec, words", [
    ("no_such_module_xyz", "No module named 'no_such_module_xyz'"),
    ("missing_file.py", "no such plugin file missing_file.py"),
    ("raising_at_import_mod", "RuntimeError: plugin import failed"),
])
def test_named_module_or_file_that_does_not_load_stops_the_command(spec, words, tmp_path, monkeypatch, capsys):
    (tmp_path / "raising_at_import_mod.py").write_text("raise RuntimeError('plugin import failed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(monkeypatch, capsys, "-p", spec, "prune", *WANDA, "--output", str(tmp_path / "o"))
    assert status == 1 and words in err and "fix or remove" in err and not (tmp_path / "o").exists()


def test_named_plugin_with_only_a_warning_still_runs(tmp_path, monkeypatch, capsys, caplog):
    body, _, words = BAD_PLUGINS["nohooks"]
    status, out, _ = run_main(monkeypatch, capsys, "-p", plugin_file(tmp_path, "nohooks", body), "prune", *WANDA,
                              "--output", str(tmp_path / "o"))
    assert status == 0 and "saved to" in out and words in caplog.text


def test_named_plugin_disabled_with_no_is_not_an_error(tmp_path, monkeypatch, capsys):
    path = plugin_file(tmp_path, "raising", BAD_PLUGINS["raising"][0])
    status, out, _ = run_main(monkeypatch, capsys, "-p", path, "-p", "no:raising", "prune", *WANDA, "--dry-run")
    assert status == 0 and "ok:" in out


# --- --no-progress silences every bar (transformers' own included), and restores them afterwards

BARS = ("Writing model shards", "Loading weights", "it/s]", "%|")


def test_no_progress_silences_the_save_bar(tmp_path, monkeypatch, capsys):
    status, out, err = run_main(monkeypatch, capsys, "prune", *WANDA, "--output", str(tmp_path / "o"))
    assert status == 0 and not any(b in out + err for b in BARS), err


def test_no_progress_silences_the_loading_bar(world, tmp_path, monkeypatch, capsys):
    status, out, err = run_main(monkeypatch, capsys, "prune", *WANDA[:2], "--model", str(world["good"]),
                                *WANDA[4:], "--output", str(tmp_path / "o"))
    assert status == 0 and not any(b in out + err for b in BARS), err


def test_no_progress_silences_eval(world, monkeypatch, capsys):
    status, out, err = run_main(monkeypatch, capsys, "eval", str(world["previous"]), "--seqlen", "16",
                                "--windows", "2", "--no-progress")
    assert status == 0 and "perplexity" in out and not any(b in out + err for b in BARS), err


def test_no_progress_restores_the_library_bars_afterwards(tmp_path, monkeypatch, capsys):
    from transformers.utils import logging as tf_logging

    assert tf_logging.is_progress_bar_enabled()
    status, _, _ = run_main(monkeypatch, capsys, "prune", *WANDA, "--output", str(tmp_path / "o"))
    assert status == 0 and tf_logging.is_progress_bar_enabled()


# --- SIGTERM / SIGINT in the gradient pass or a --select sweep: no temporary file, no output

SIGNAL_LOSS = """
import os, signal, time
from compresskit_plugins.adapters.llama import LlamaAdapter

CALLS = [0]

class LossSignal(LlamaAdapter):
    '''Sends itself $HOSTILE_SIGNAL at loss call number $HOSTILE_AT (1-based).'''
    name = "losssignal"
    def loss(self, model, batch):
        CALLS[0] += 1
        if CALLS[0] == int(os.environ["HOSTILE_AT"]):
            os.kill(os.getpid(), getattr(signal, os.environ["HOSTILE_SIGNAL"]))
            time.sleep(5)
        return super().loss(model, batch)

@hookimpl
def register_adapters(register):
    register(LossSignal)
"""


def _temporaries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name or "tmp-" in p.name)


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
@pytest.mark.parametrize("where, at, extra", [
    ("gradient pass", 1, []),
    ("gradient pass in groups", 3, ["-o", "gradient.groups=2"]),  # the second group: the first one is on disk
    ("--select sweep", 4, ["--select", "metric.alpha=0,100", "--select-samples", "2"]),
])
def test_signal_in_gradient_pass_or_sweep_leaves_nothing(where, at, extra, sig, code, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("COMPRESSKIT_CACHE", str(cache))
    monkeypatch.setenv("HOSTILE_SIGNAL", sig)
    monkeypatch.setenv("HOSTILE_AT", str(at))  # the gradient pass makes 2 loss calls (2 samples), the sweep after
    handler = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "o"
    status, stdout, err = run_main(monkeypatch, capsys, "-p", plugin_file(tmp_path, "losssignal", SIGNAL_LOSS),
                                   "prune", "--adapter", "losssignal", *TINY[2:], "--metric", "gblm",
                                   "--recompute-gradients", *extra, "--output", str(out))
    assert status == code and ("terminated" in err or "interrupted" in err), err
    assert not out.exists() and leftovers(tmp_path) == [] and _temporaries(cache) == []
    if where.startswith("gradient pass"):  # no gradient statistics that look finished
        assert not list(cache.rglob("gradients/*.safetensors"))
    assert signal.getsignal(signal.SIGTERM) == handler


# --- the output and the model directory

def test_output_equal_to_the_model_directory_is_refused(world, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(world["good"], model)
    before = snapshot(model)
    r = invoke("prune", *WANDA[:2], "--model", str(model), *WANDA[4:], "--output", str(model))
    assert r.exit_code == 1 and "is the model directory" in r.output and snapshot(model) == before


def test_output_equal_to_the_model_directory_is_refused_with_overwrite(earlier):
    out, before = earlier  # a compresskit output is a loadable model too: pruning it again in place
    r = invoke("prune", *WANDA[:2], "--model", str(out), *WANDA[4:], "--output", str(out), "--overwrite")
    assert r.exit_code == 1 and "is the model directory" in r.output
    assert snapshot(out) == before and leftovers(out.parent) == []


def test_output_containing_the_model_directory_is_refused(earlier):
    out, before = earlier
    model = out / "inner-model"
    shutil.copytree(out, model, ignore=shutil.ignore_patterns("inner-model"))
    r = invoke("prune", *WANDA[:2], "--model", str(model), *WANDA[4:], "--output", str(out), "--overwrite")
    assert r.exit_code == 1 and "contains the model directory" in r.output and model.is_dir()


def test_output_inside_the_model_directory_is_allowed_and_touches_no_model_file(world, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(world["good"], model)
    before = snapshot(model)
    r = invoke("prune", *WANDA[:2], "--model", str(model), *WANDA[4:], "--output", str(model / "pruned"))
    assert r.exit_code == 0, r.output
    after = {k: v for k, v in snapshot(model).items() if not k.startswith("pruned/")}
    assert after == before and (model / "pruned" / "compresskit.json").is_file()


def test_api_output_equal_to_the_model_directory_is_refused(world, tmp_path):
    from compresskit.errors import OutputExistsError

    model = tmp_path / "model"
    shutil.copytree(world["good"], model)
    with pytest.raises(OutputExistsError, match="is the model directory"):
        compresskit.prune(**{**API, "model": str(model)}, output=str(model))


# --- two runs writing the same output at once

OTHER_RUN = """
import os, shutil
@hookimpl
def run_finished(run):
    '''Another run saves the same output while this one is still working.'''
    shutil.copytree(os.environ["HOSTILE_OTHER"], os.environ["HOSTILE_OUT"])
"""


def test_second_of_two_runs_to_finish_does_not_clobber_the_first(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    monkeypatch.setenv("HOSTILE_OTHER", str(world["previous"]))
    monkeypatch.setenv("HOSTILE_OUT", str(out))
    status, _, err = run_main(monkeypatch, capsys, "-p", plugin_file(tmp_path, "otherrun", OTHER_RUN),
                              "prune", *WANDA, "--output", str(out))
    assert status == 1 and "exists" in err and "--overwrite" in err  # checked again before saving
    assert snapshot(out) == snapshot(world["previous"]) and leftovers(tmp_path) == []


def test_two_runs_with_overwrite_the_last_to_finish_wins_whole(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    monkeypatch.setenv("HOSTILE_OTHER", str(world["previous"]))
    monkeypatch.setenv("HOSTILE_OUT", str(out))
    status, _, _ = run_main(monkeypatch, capsys, "-p", plugin_file(tmp_path, "otherrun", OTHER_RUN),
                            "prune", *WANDA, "--sparsity", "0.6", "--output", str(out), "--overwrite")
    man = json.loads((out / "compresskit.json").read_text())
    assert status == 0 and man["config"]["sparsity"] == 0.6 and leftovers(tmp_path) == []


def test_a_running_save_is_not_mistaken_for_a_stale_one(tmp_path):
    from compresskit import cache

    live = tmp_path / ".o.tmp-live"
    live.mkdir()
    (live / "model.safetensors").write_bytes(b"being written")
    fd = cache.hold(live)  # as the other run's atomic_directory holds it while it writes
    try:
        r = invoke("prune", *WANDA, "--output", str(tmp_path / "o"))
        assert r.exit_code == 0 and live.is_dir()  # the other run's temporary survives ours
    finally:
        os.close(fd)
    r = invoke("prune", *WANDA, "--output", str(tmp_path / "o"), "--overwrite")  # now it is stale: removed
    assert r.exit_code == 0 and not live.exists()


# --- every suggested fix is possible: targets that round per layer shape, short texts

def _write_map(tmp_path: Path, mapping: dict) -> str:
    p = tmp_path / "map.json"
    p.write_text(json.dumps(mapping))
    return str(p)


def test_map_target_that_rounds_to_nothing_in_a_narrow_layer_is_refused_with_a_working_fix(tmp_path):
    r = invoke("prune", *WANDA, "--sparsity-map", _write_map(tmp_path, {"*": 0.01}))
    assert r.exit_code == 1 and "prunes nothing" in r.output and "0.self_attn.q_proj 64x64" in r.output
    import re

    fix = re.search(r"give it ([0-9.]+) or more in the map", r.output).group(1)
    r = invoke("prune", *WANDA, "--sparsity-map", _write_map(tmp_path, {"*": float(fix)}))
    assert r.exit_code == 0 and "prunes nothing" not in r.output, r.output


def test_map_targets_that_round_weakly_are_warned_per_layer(tmp_path, caplog):
    r = invoke("prune", *WANDA, "--sparsity-map", _write_map(tmp_path, {"*.mlp.down_proj": 0.012, "*": 0.5}),
               "--output", str(tmp_path / "o"))
    assert r.exit_code == 0 and "sparsity map: 2 layers prune less than 90%" in caplog.text
    assert "0.mlp.down_proj 0.012 -> 0.0078" in caplog.text and "q_proj" not in caplog.text.split("sparsity map:")[1]
    man = json.loads((tmp_path / "o" / "compresskit.json").read_text())
    assert any("sparsity map:" in w for w in man["notes"]["compresskit"]["warnings"])


def test_map_zero_target_in_a_layer_is_not_a_rounding_problem(tmp_path):
    r = invoke("prune", *WANDA, "--sparsity-map", _write_map(tmp_path, {"*.self_attn.*": 0.0, "*": 0.5}))
    assert r.exit_code == 0, r.output


def test_uniform_sparsity_suggestion_is_a_value_that_prunes(tmp_path, caplog):
    import re

    r = invoke("prune", *WANDA, "--sparsity", "0.01")
    fix = re.search(r"Use --sparsity ([0-9.]+) or more", caplog.text + r.output)
    assert fix, caplog.text + r.output
    caplog.clear()
    r = invoke("prune", *WANDA, "--sparsity", fix.group(1))
    assert r.exit_code == 0 and "rounds down" not in caplog.text + r.output


def test_short_corpus_suggests_a_seqlen_that_works(world):
    import re

    r = invoke("prune", *WANDA, "--calibration", str(world["root"] / "short.txt"))
    fix = re.search(r"use --seqlen (\d+) or less", r.output)
    assert r.exit_code == 1 and fix and "(<" not in r.output, r.output
    args = [a if a != "16" else fix.group(1) for a in WANDA]
    r = invoke("prune", *args, "--calibration", str(world["root"] / "short.txt"))
    assert r.exit_code == 0, r.output


def test_corpus_of_single_characters_suggests_no_impossible_seqlen(tmp_path):
    (tmp_path / "chars.txt").write_text("a\n\nb\n\nc\n")
    r = invoke("prune", *WANDA, "--calibration", str(tmp_path / "chars.txt"))
    assert r.exit_code == 1 and "longer documents" in r.output and "--seqlen 1" not in r.output, r.output


def test_short_evaluation_text_suggests_a_seqlen_that_works(world):
    import re

    r = invoke("eval", str(world["previous"]), "--data", str(world["root"] / "short.txt"), "--seqlen", "64")
    fix = re.search(r"use --seqlen (\d+) or less", r.output)
    assert r.exit_code == 1 and fix, r.output
    r = invoke("eval", str(world["previous"]), "--data", str(world["root"] / "short.txt"), "--seqlen", fix.group(1))
    assert r.exit_code == 0 and "perplexity" in r.output, r.output
