"""The open core: lifecycle hooks, per-layer targets, plugins by entry point, clean import edges."""

from __future__ import annotations

import ast
import json
import sys
import textwrap
import types
from pathlib import Path

import pytest

import hang
import torch

import compresskit
from compresskit import hookimpl
from compresskit.errors import IncompatiblePatternError, OptionError
from compresskit.testing import fresh_registry

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(adapter="llama", model="random:tiny", metric="wanda", nsamples=2, seqlen=16, device="cpu", progress=False)


def _row_zeros_match(model, targets: dict[str, float]) -> None:
    """Every row of every prunable layer prunes exactly floor(in_features * target)."""
    for i, block in enumerate(model.model.layers):
        for name, m in block.named_modules():
            if isinstance(m, torch.nn.Linear):
                k = int(m.in_features * targets[f"{i}.{name}"] + 1e-9)
                assert ((m.weight == 0).sum(dim=1) == k).all(), (i, name)


# ---- lifecycle hooks ---------------------------------------------------------------------


def test_hooks_fire_in_the_documented_order_and_see_the_run_state():
    calls = []
    mod = types.ModuleType("recorder")

    @hookimpl
    def run_started(run):
        calls.append(("run_started", run.block_index, len(run.report.layers)))

    @hookimpl
    def layer_sparsity(run, block_index, layer_name):
        calls.append(("layer_sparsity", block_index, run.block_index))
        return None

    @hookimpl
    def block_done(run, block_index):
        rows = [r for r in run.report.layers if r.block == block_index]
        calls.append(("block_done", block_index, len(rows), len(run.inputs)))

    @hookimpl
    def run_finished(run):
        calls.append(("run_finished", run.block_index, len(run.report.layers)))

    for f in (run_started, layer_sparsity, block_done, run_finished):
        setattr(mod, f.__name__, f)
    result = compresskit.prune(registry=fresh_registry(mod), **TINY)
    assert calls[0] == ("run_started", None, 0) and calls[-1] == ("run_finished", None, 14)
    assert [c[0] for c in calls[1:-1]] == (["layer_sparsity"] * 7 + ["block_done"]) * 2
    assert all(c[1] == c[2] for c in calls if c[0] == "layer_sparsity")  # asked while that block is current
    assert [c for c in calls if c[0] == "block_done"] == [("block_done", 0, 7, 2), ("block_done", 1, 7, 2)]
    assert result.report.overall_target == 0.5


def test_layer_sparsity_plugin_sets_targets_and_report_records_them():
    mod = types.ModuleType("mlp_heavier")
    mod.layer_sparsity = hookimpl(lambda run, block_index, layer_name: 0.75 if layer_name.startswith("mlp.") else None)
    result = compresskit.prune(registry=fresh_registry(mod), **TINY)
    targets = {f"{r.block}.{r.name}": r.target for r in result.report.layers}
    assert {t for k, t in targets.items() if ".mlp." in f".{k}"} == {0.75}
    assert {t for k, t in targets.items() if ".self_attn." in f".{k}"} == {0.5}
    _row_zeros_match(result.model, targets)
    rows = result.manifest["report"]["layers"]
    assert all({"target", "sparsity"} <= set(r) for r in rows)
    sizes = {f"{r['block']}.{r['name']}": r["shape"][0] * r["shape"][1] for r in rows}
    weighted = sum(targets[k] * n for k, n in sizes.items()) / sum(sizes.values())
    assert result.manifest["report"]["overall_target"] == pytest.approx(weighted)


def test_a_bad_target_names_the_layer():
    mod = types.ModuleType("too_much")
    mod.layer_sparsity = hookimpl(lambda run, block_index, layer_name: 1.5)
    with pytest.raises(OptionError, match=r"target of layer 0\.self_attn\.q_proj must be in \[0, 1\)"):
        compresskit.prune(registry=fresh_registry(mod), **TINY)


def test_throwaway_entry_point_plugin_changes_a_normal_cli_prune(tmp_path):
    """A package that only implements layer_sparsity, installed by entry point, with no other change."""
    site = tmp_path / "site"
    dist = site / "throwaway_targets-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: throwaway-targets\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[compresskit]\nthrowaway = throwaway_targets\n")
    (site / "throwaway_targets.py").write_text(textwrap.dedent("""
        from compresskit import hookimpl

        @hookimpl
        def layer_sparsity(run, block_index, layer_name):
            return {"mlp.down_proj": 0.25, "self_attn.v_proj": 0.625}.get(layer_name)
    """))
    out = tmp_path / "out"
    env = {"PYTHONPATH": str(site), "COMPRESSKIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "compresskit", "prune", "--model", "random:tiny", "--metric", "wanda",
           "--nsamples", "2", "--seqlen", "16", "--no-progress", "--output", str(out)]
    proc = hang.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    listed = hang.run([sys.executable, "-m", "compresskit", "plugins"], capture_output=True, text=True,
                      env=env, cwd=tmp_path)
    assert "throwaway" in listed.stdout and "throwaway-targets 0.1" in listed.stdout
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    targets = {f"{i}.{n}": {"mlp.down_proj": 0.25, "self_attn.v_proj": 0.625}.get(n, 0.5)
               for i in range(2) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    _row_zeros_match(model, targets)
    manifest = json.loads((out / "compresskit.json").read_text())
    assert {r["target"] for r in manifest["report"]["layers"] if r["name"] == "mlp.down_proj"} == {0.25}


# ---- the sparsity map --------------------------------------------------------------------


def test_sparsity_map_first_matching_glob_wins_and_is_row_exact():
    result = compresskit.prune(sparsity={"1.*": 0.25, "*.mlp.*": 0.75, "*": 0.5}, **TINY)
    targets = {f"{r.block}.{r.name}": r.target for r in result.report.layers}
    assert targets["1.mlp.up_proj"] == 0.25 and targets["0.mlp.up_proj"] == 0.75 and targets["0.self_attn.q_proj"] == 0.5
    _row_zeros_match(result.model, targets)
    assert result.manifest["config"]["sparsity_map"] == {"1.*": 0.25, "*.mlp.*": 0.75, "*": 0.5}


def test_sparsity_map_from_the_cli_and_its_errors(tmp_path):
    from click.testing import CliRunner

    from compresskit.cli import cli

    spec = tmp_path / "map.json"
    spec.write_text(json.dumps({"*.self_attn.*": 0.25}))
    args = ["prune", "--model", "random:tiny", "--metric", "wanda", "--nsamples", "2", "--seqlen", "16", "--no-progress"]
    res = CliRunner().invoke(cli, [*args, "--sparsity-map", str(spec), "--sparsity", "0.6"])
    assert res.exit_code == 0, res.output
    assert "(target 0.4833)" in res.output  # attention (12288 weights) at 0.25, MLP (24576) at 0.6
    spec.write_text(json.dumps({"*.attn.*": 0.25}))
    res = CliRunner().invoke(cli, [*args, "--sparsity-map", str(spec)])
    assert res.exit_code != 0 and "'*.attn.*' matches no prunable layer" in res.output
    spec.write_text("{not json")
    res = CliRunner().invoke(cli, [*args, "--sparsity-map", str(spec)])
    assert res.exit_code != 0 and "not valid JSON" in res.output
    spec.write_text(json.dumps({"*": 0.25}))
    res = CliRunner().invoke(cli, [*args, "--sparsity-map", str(spec), "--pattern", "2:4"])
    assert res.exit_code != 0 and "--sparsity-map sets per-layer targets" in res.output


def test_nm_pattern_refuses_per_layer_targets_from_plugins():
    mod = types.ModuleType("nm_breaker")
    mod.layer_sparsity = hookimpl(lambda run, block_index, layer_name: 0.25)
    with pytest.raises(IncompatiblePatternError, match="contradicts --pattern 2:4.*per-layer target 0.25"):
        compresskit.prune(registry=fresh_registry(mod), **{**TINY, "pattern": "2:4"})


# ---- block layouts ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "opt"])
def test_other_model_types_are_walked_through_the_layout_table(tmp_path, kind):
    import transformers

    cfg = {"mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config, "opt": transformers.OPTConfig}[kind]
    common = dict(vocab_size=256, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
    extra = ({"hidden_size": 64, "ffn_dim": 128, "word_embed_proj_dim": 64} if kind == "opt" else
             {"hidden_size": 64, "intermediate_size": 128, "num_key_value_heads": 2})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg(**common, **extra))
    model.save_pretrained(tmp_path / kind)
    result = compresskit.prune(**{**TINY, "model": str(tmp_path / kind), "calibration": "random"})
    assert result.loaded.info["model_type"] == kind and result.manifest["model_info"]["model_type"] == kind
    assert result.report.overall_sparsity == pytest.approx(0.5) and len(result.report.layers) >= 12


def test_unknown_block_layout_lists_what_is_supported(tmp_path):
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    model.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(compresskit.CompressKitError, match=r"model_type 'gpt2' has no known block layout; supported: "
                       r".*llama.*mistral.*-o adapter.blocks"):
        compresskit.check(**{**TINY, "model": str(tmp_path / "gpt2")})


# ---- edges ----------------------------------------------------------------------------------


def _project_imports() -> dict[str, set[str]]:
    mods = {}
    for base, pkg in ((ROOT / "compresskit", "compresskit"), (ROOT / "plugins", "compresskit_plugins")):
        for f in base.rglob("*.py"):
            parts = [pkg, *f.relative_to(base).with_suffix("").parts]
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for name, f in mods.items():
        is_pkg = f.name == "__init__.py"
        pkg = name.split(".") if is_pkg else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = ".".join(pkg[: len(pkg) - node.level + 1] + [node.module or ""]) if node.level else node.module
                cands = [mod.rstrip(".")] + [f"{mod}.{a.name}".strip(".") for a in node.names]
            else:
                continue
            for c in cands:
                while c and c not in mods:
                    c = c.rpartition(".")[0]
                if c and c != name and not c.startswith(name + "."):
                    deps.add(c)
        graph[name] = deps
    return graph


def test_no_import_cycles_in_core_and_plugins():
    graph, state, stack = _project_imports(), {}, []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(w):] + [w]))
            if w not in state:
                visit(w)
        stack.pop()
        state[v] = "done"

    for v in sorted(graph):
        if v not in state:
            visit(v)


def test_core_never_imports_plugins():
    bad = {m: d for m, d in _project_imports().items() if (m == "compresskit" or m.startswith("compresskit."))
           and any(x.startswith("compresskit_plugins") for x in d)}
    assert not bad


@pytest.mark.parametrize("argv", [None, ["--help"], ["list"], ["list", "metrics"], ["info", "metric", "gblm"],
                                  ["plugins"]])
def test_import_and_light_commands_do_not_import_torch(argv):
    if argv is None:
        code = "import sys, compresskit; print('torch' in sys.modules)"
    else:
        code = ("import sys, atexit; atexit.register(lambda: print('TORCH', 'torch' in sys.modules)); "
                f"sys.argv = ['compresskit', *{argv!r}]; from compresskit.cli import main; main()")
    out = hang.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("False"), out.stdout[-300:]


def test_the_documented_per_layer_plugin_works_and_keeps_the_mean():
    import importlib.util

    from compresskit.testing import check_hooks

    spec = importlib.util.spec_from_file_location("mlp_heavier", ROOT / "examples" / "plugins" / "mlp_heavier.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert len((ROOT / "examples/plugins/mlp_heavier.py").read_text().split("[start:plugin]")[1]
               .split("[end:plugin]")[0].strip().splitlines()) < 30
    check_hooks(mod)
    result = compresskit.prune(registry=fresh_registry(mod), **TINY)
    assert result.manifest["notes"] == {"mlp_heavier": {"shift": 0.1}}
    assert {r.target for r in result.report.layers if r.name.startswith("mlp.")} == {0.6}
    assert result.report.overall_target == pytest.approx(0.5 + 0.1 * (24576 - 2 * 12288) / 36864)
