"""`compresskit report`: PNGs and an HTML page for LLM and ViT outputs, mask differences, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("matplotlib", reason="report extra not installed: pip install -e '.[report]'")

from compresskit.cli import figures  # noqa: E402
from compresskit.errors import CompressKitError  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def llm_outputs(tmp_path_factory):
    import compresskit

    root = tmp_path_factory.mktemp("llm")
    for metric in ("wanda", "magnitude"):
        compresskit.prune(adapter="llama", model="random:tiny", metric=metric, nsamples=4, seqlen=16, device="cpu",
                          progress=False).save(root / metric)
    return root / "wanda", root / "magnitude"


@pytest.fixture(scope="module")
def vit_output(tmp_path_factory):
    import compresskit

    pytest.importorskip("timm")
    out = tmp_path_factory.mktemp("vit") / "vit"
    compresskit.prune(adapter="vit", model="random:tiny", metric="wanda", nsamples=4, device="cpu",
                      progress=False).save(out)
    return out


def _pngs(folder):
    files = sorted(p.name for p in folder.glob("*.png"))
    for name in files:
        assert (folder / name).read_bytes()[:8] == PNG, name
    return files


def test_report_of_an_llm_output(llm_outputs):
    out = llm_outputs[0]
    page = figures.write_report([out])
    assert page == out / "report" / "index.html"
    files = _pngs(page.parent)
    layers = [r["name"] for r in json.loads((out / "compresskit.json").read_text())["report"]["layers"] if r["block"] == 1]
    assert "layers.png" in files and len(files) == 1 + len(layers)  # middle block of 2: block 1
    text = page.read_text()
    assert all(f'src="{f}"' in text for f in files)
    assert "wanda" in text and "achieved sparsity" in text


def test_report_of_a_vit_output_with_chosen_layers(vit_output, tmp_path):
    page = figures.write_report([vit_output], tmp_path / "rep", layers=["0:attn.qkv", "1:mlp.fc2"], crop=16)
    assert _pngs(page.parent) == ["layers.png", "mask_0_attn_qkv.png", "mask_1_mlp_fc2.png"]


def test_two_outputs_give_their_mask_difference(llm_outputs):
    a, b = llm_outputs
    page = figures.write_report([a, b], layers=["0:mlp.down_proj"])
    assert page.parent == a / f"report-vs-{b.name}"
    files = _pngs(page.parent)
    assert {"a_layers.png", "b_layers.png", "overlap.png", "diff_0_mlp_down_proj.png"} <= set(files)
    rows = json.loads((page.parent / "overlap.json").read_text())
    assert len(rows) == 14 and all(0.0 < r["overlap"] < 1.0 for r in rows)  # wanda and magnitude differ, but overlap


def test_not_an_output_fails_clearly(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CompressKitError, match="not a compresskit output: it has no compresskit.json"):
        figures.write_report([tmp_path])
    assert not (tmp_path / "report").exists()


def test_cli_report_and_its_errors(llm_outputs, tmp_path):
    from click.testing import CliRunner

    from compresskit.cli import cli

    r = CliRunner().invoke(cli, ["report", str(llm_outputs[0]), "--out", str(tmp_path / "r"), "--layer", "1:mlp.up_proj"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r" / "mask_1_mlp_up_proj.png").is_file()
    r = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert r.exit_code != 0 and "no compresskit.json" in r.output
    r = CliRunner().invoke(cli, ["report", str(llm_outputs[0]), "--layer", "7:nope"])
    assert r.exit_code != 0 and "BLOCK:NAME of a pruned layer" in r.output


def test_prune_report_flag_writes_the_pictures(tmp_path):
    from click.testing import CliRunner

    from compresskit.cli import cli

    out = tmp_path / "D"
    r = CliRunner().invoke(cli, ["prune", "--adapter", "llama", "--model", "random:tiny", "--metric", "wanda",
                                 "--nsamples", "2", "--seqlen", "16", "--no-progress", "--output", str(out), "--report"])
    assert r.exit_code == 0, r.output
    assert (out / "report" / "index.html").is_file() and (out / "report" / "layers.png").is_file()
    r = CliRunner().invoke(cli, ["prune", "--adapter", "llama", "--model", "random:tiny", "--report"])
    assert r.exit_code != 0 and "--output" in r.output


def test_kept_fractions_and_overlap_math():
    mask = torch.tensor([[True, False, False], [True, True, False]])  # True = pruned
    cols, rows = figures.kept_fractions(mask)
    assert cols.tolist() == [0.0, 0.5, 1.0] and rows.tolist() == pytest.approx([2 / 3, 1 / 3])
    other = torch.tensor([[True, False, True], [False, True, False]])
    assert figures.overlap(mask, other) == pytest.approx(2 / 4)
    assert figures.diff_codes(mask, other).tolist() == [[3, 0, 2], [1, 3, 0]]
    assert figures.overlap(torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)) == 1.0


def test_layers_plot_uses_a_per_layer_target_when_present(tmp_path):
    layers = [{"block": b, "name": n, "shape": [4, 4], "sparsity": 0.5, "error": 0.1, "target": 0.4 + 0.1 * b}
              for b in range(3) for n in ("a", "b")]
    path = figures.plot_layers({"report": {"layers": layers}, "resolved": {"sparsity": 0.5}}, tmp_path / "l.png")
    assert path.read_bytes()[:8] == PNG
