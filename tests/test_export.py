"""compressed-tensors export: format choice, bit-identical round trips, refusals, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import compresskit
from compresskit.cli import cli
from compresskit.errors import OutputExistsError
from compresskit_plugins.adapters.llama.export import ExportError, choose_format, export, load_weights

PATTERNS = {
    "unstructured": dict(pattern="unstructured"),
    "2:4": dict(pattern="nm", pattern_options={"n": 2, "m": 4}),
    "4:8": dict(pattern="nm", pattern_options={"n": 4, "m": 8}),
}
EXPECTED = {"unstructured": ("sparse-bitmask", "unstructured"), "2:4": ("sparse-24-bitmask", "2:4"),
            "4:8": ("sparse-bitmask", "4:8")}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """One dense compresskit output per pattern (random:tiny, wanda): seconds each."""
    root = tmp_path_factory.mktemp("outputs")
    for key, kw in PATTERNS.items():
        compresskit.prune(adapter="llama", model="random:tiny", metric="wanda", nsamples=4, seqlen=16, device="cpu",
                          progress=False, **kw).save(root / key.replace(":", "-"))
    return {key: root / key.replace(":", "-") for key in PATTERNS}


def dense_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def library_decompress(directory: Path) -> dict[str, torch.Tensor]:
    """What a compressed-tensors user does: ModelCompressor from config.json, then decompress."""
    from compressed_tensors import ModelCompressor

    compressor = ModelCompressor.from_pretrained(str(directory))
    return dict(compressor.sparsity_compressor.decompress(str(directory)))


@pytest.mark.parametrize("key", list(PATTERNS))
def test_round_trip_is_bit_identical(outputs, tmp_path, key):
    src = outputs[key]
    r = export(src, tmp_path / "ct", progress=False)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    sc = qc["sparsity_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert (sc["format"], sc["sparsity_structure"]) == EXPECTED[key] == (r.sparsity_format, r.structure)
    assert len(sc["targets"]) == r.layers == 14 and sc["ignore"] == []
    assert abs(sc["global_sparsity"] - 0.5) < 1e-9
    stored = dense_tensors(tmp_path / "ct")
    assert not any(f"{t}.weight" in stored for t in sc["targets"])  # the pruned layers really are compressed
    assert r.output_bytes < r.source_bytes
    dense = dense_tensors(src)
    assert_bit_identical(library_decompress(tmp_path / "ct"), dense)  # every tensor, pruned or not
    assert_bit_identical(load_weights(tmp_path / "ct"), dense)
    man = json.loads((tmp_path / "ct" / "compresskit.json").read_text())
    assert man["export"]["sparsity_format"] == EXPECTED[key][0] and man["config"] == json.loads(
        (src / "compresskit.json").read_text())["config"]


def test_decompress_into_a_transformers_model(outputs, tmp_path):
    """The library's model path: ModelCompressor.decompress(path, model) fills a model built from the config."""
    from compressed_tensors import ModelCompressor
    from transformers import AutoConfig, AutoModelForCausalLM

    export(outputs["2:4"], tmp_path / "ct", progress=False)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(outputs["2:4"]))
    ModelCompressor.from_pretrained(str(tmp_path / "ct")).decompress(str(tmp_path / "ct"), model)
    ref = AutoModelForCausalLM.from_pretrained(outputs["2:4"])
    got, want = model.state_dict(), ref.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_dense_export_restores_the_dense_output(outputs, tmp_path):
    export(outputs["unstructured"], tmp_path / "ct", progress=False)
    r = export(tmp_path / "ct", tmp_path / "dense", format="dense", progress=False)
    assert r.format == "dense" and r.output_bytes == (outputs["unstructured"] / "model.safetensors").stat().st_size
    assert_bit_identical(dense_tensors(tmp_path / "dense"), dense_tensors(outputs["unstructured"]))
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "dense")  # loads as a plain model again


def test_bfloat16_export_matches_the_cast_dense_weights(outputs, tmp_path):
    r = export(outputs["unstructured"], tmp_path / "ct", dtype="bfloat16", progress=False)
    assert r.dtype == "bfloat16" and json.loads((tmp_path / "ct" / "config.json").read_text())["dtype"] == "bfloat16"
    want = {k: v.to(torch.bfloat16) for k, v in dense_tensors(outputs["unstructured"]).items()}
    assert_bit_identical(library_decompress(tmp_path / "ct"), want)


def test_format_choice_from_the_manifest():
    nm = lambda n, m: {"config": {"pattern": "nm"}, "resolved": {"pattern_options": {"n": n, "m": m}}}  # noqa: E731
    assert choose_format({"config": {"pattern": "unstructured"}}).format == "sparse-bitmask"
    assert choose_format(nm(2, 4)).format == "sparse-24-bitmask"
    assert (choose_format(nm(4, 8)).format, choose_format(nm(4, 8)).structure) == ("sparse-bitmask", "4:8")
    assert choose_format(nm(1, 4)).structure == "3:4"  # compresskit counts pruned weights, the format kept ones


def test_non_compresskit_directory_fails_clearly(outputs, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(outputs["unstructured"] / f, plain / f)
    with pytest.raises(ExportError, match="not a compresskit output.*prune"):
        export(plain, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    with pytest.raises(ExportError, match="not a directory"):
        export(tmp_path / "missing", tmp_path / "ct")


def test_vit_output_is_refused(tmp_path):
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "compresskit.json").write_text(json.dumps({"config": {"adapter": "vit", "pattern": "unstructured"}}))
    (vit / "vit.json").write_text("{}")
    save_file({"w": torch.zeros(2, 2)}, str(vit / "model.safetensors"))
    with pytest.raises(ExportError, match="ViT.*dense"):
        export(vit, tmp_path / "ct")


def test_refuses_to_overwrite_what_is_not_ours(outputs, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError):
        export(outputs["unstructured"], foreign)
    with pytest.raises(ExportError, match="not a compresskit output"):
        export(outputs["unstructured"], foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ExportError, match="source"):
        export(outputs["unstructured"], outputs["unstructured"], overwrite=True)
    export(outputs["unstructured"], tmp_path / "ct", progress=False)
    export(outputs["2:4"], tmp_path / "ct", overwrite=True, progress=False)  # ours: replaced
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["sparsity_config"][
        "format"] == "sparse-24-bitmask"
    with pytest.raises(ExportError, match="already in compressed-tensors"):
        export(tmp_path / "ct", tmp_path / "ct2", format="compressed-tensors")


def test_a_non_2_4_layer_fails_and_leaves_nothing(outputs, tmp_path):
    """An unstructured output whose manifest claims 2:4 is caught before anything is published."""
    fake = tmp_path / "fake"
    shutil.copytree(outputs["unstructured"], fake)
    man = json.loads((fake / "compresskit.json").read_text())
    man["config"].update(pattern="nm", pattern_options={"n": 2, "m": 4})
    man["resolved"]["structure"] = {"group": "nm", "n": 2, "m": 4}
    (fake / "compresskit.json").write_text(json.dumps(man))
    with pytest.raises(ExportError, match="not 2:4 sparse"):
        export(fake, tmp_path / "ct", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake"]  # no output, no temporary directory


def test_failed_verification_publishes_nothing(outputs, tmp_path, monkeypatch):
    from compresskit_plugins.adapters.llama import ct_backend

    real = ct_backend.decompress

    def corrupt(compressor, tensors):
        out = real(compressor, tensors)
        k = next(k for k in out if k.endswith("q_proj.weight"))
        out[k] = out[k].clone()
        out[k].view(-1)[0] += 1.0
        return out

    monkeypatch.setattr(ct_backend, "decompress", corrupt)
    with pytest.raises(ExportError, match="does not decompress"):
        export(outputs["unstructured"], tmp_path / "ct", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_weights_changed_after_pruning_are_detected(outputs, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(outputs["unstructured"], changed)
    sd = dense_tensors(changed)
    sd["model.layers.0.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"][:, :32].contiguous()
    save_file(sd, str(changed / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportError, match="does not match one saved weight"):
        export(changed, tmp_path / "ct")


# ---- the command line ------------------------------------------------------------------------

def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_cli_export_and_back(outputs, tmp_path):
    r = run("export", outputs["4:8"], "--format", "compressed-tensors", "--output", tmp_path / "ct", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "sparse-bitmask (4:8), 14 layers" in r.output
    r = run("export", tmp_path / "ct", "--output", tmp_path / "dense")  # --format dense is the default
    assert r.exit_code == 0, r.output
    assert_bit_identical(dense_tensors(tmp_path / "dense"), dense_tensors(outputs["4:8"]))


def test_cli_export_of_a_foreign_directory_fails(tmp_path):
    (tmp_path / "x").mkdir()
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "x"), "--format", "compressed-tensors"])
    assert r.exit_code == 1 and "not a compresskit output" in r.output


def test_cli_prune_save_format(tmp_path):
    out = tmp_path / "D"
    r = run("prune", "--adapter", "llama", "--model", "random:tiny", "--nsamples", "2", "--seqlen", "16",
            "--no-progress", "--metric", "wanda", "--pattern", "2:4", "--output", out,
            "--save-format", "compressed-tensors")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"][
        "format"] == "sparse-24-bitmask"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["D"]  # the temporary dense copy is gone
    w = load_weights(out)
    q = w["model.layers.0.self_attn.q_proj.weight"]
    assert ((q.reshape(q.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


def test_cli_prune_save_format_refuses_vit_before_work(tmp_path):
    r = CliRunner().invoke(cli, ["prune", "--adapter", "vit", "--model", "random:tiny", "--save-format",
                                 "compressed-tensors", "--output", str(tmp_path / "D")])
    assert r.exit_code == 1 and "adapter 'vit' saves dense" in r.output and not (tmp_path / "D").exists()


def test_compresskit_loads_an_export_as_the_dense_model(outputs, tmp_path):
    """The llama adapter decompresses an export (transformers 5 would not): same weights, same perplexity."""
    from compresskit_plugins.adapters.llama.sources import load

    export(outputs["2:4"], tmp_path / "ct", progress=False)
    got = load(str(tmp_path / "ct"), torch.float32)[0].state_dict()
    want = load(str(outputs["2:4"]), torch.float32)[0].state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    (tmp_path / "text.txt").write_text("Sparse weights are stored as values and a bitmask. " * 20)
    args = ["--json", "--windows", "2", "--seqlen", "16", "--data", tmp_path / "text.txt"]
    r_ct, r_dense = run("eval", tmp_path / "ct", *args), run("eval", outputs["2:4"], *args)
    ppl = [json.loads(r.stdout)["perplexity"] for r in (r_ct, r_dense)]
    assert ppl[0] == ppl[1] and ppl[0] > 1
