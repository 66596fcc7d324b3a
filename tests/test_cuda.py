"""Every method on CUDA: the runner matrix in memory and streamed, CPU vs CUDA masks, bf16, evaluation.

Marked ``cuda``: skipped without a CUDA device, selected by ``pytest -m cuda`` where one is
present. They need only what a GPU image has (torch, transformers, pluggy, click, safetensors,
pytest): random models built from a config, random calibration, a text file for perplexity.
The model rests on the CPU and each block visits the GPU, so after an in-memory run every
parameter is back on the CPU and the gradient statistics rest there too.
"""

from __future__ import annotations

import pytest
import torch

import compresskit
from device_matrix import combos, config, ids

pytestmark = pytest.mark.cuda

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
        "Sphinx of black quartz, judge my vow. How vexingly quick daft zebras jump. ") * 40


def _reached(result) -> None:
    assert result.report.layers
    for row in result.report.layers:
        assert abs(row.sparsity - row.target) <= 1.0 / row.shape[1] + 1e-9, (row.block, row.name)
        assert row.error is None or row.error == row.error  # not NaN


def _at_rest(result) -> None:
    assert all(p.device.type == "cpu" for p in result.model.parameters())
    for stats in result.run.gradients.values():
        assert all(t.device.type == "cpu" for t in stats.values())


def _masks(model) -> dict[str, torch.Tensor]:
    from compresskit_plugins.adapters.llama import LlamaAdapter

    adapter = LlamaAdapter()
    return {f"{i}.{n}": layer.weight.detach().cpu() == 0 for i, block in enumerate(adapter.blocks(model))
            for n, layer in adapter.prunable(block).items()}


@pytest.mark.parametrize("combo", combos(streamed=False), ids=ids)
def test_runner_matrix_in_memory_on_cuda(combo):
    result = compresskit.prune(**config(*combo, "cuda"), model="random:tiny")
    _reached(result)
    _at_rest(result)
    assert str(result.run.settings.device).startswith("cuda")
    assert result.manifest["device_peak_bytes"] > 0


@pytest.mark.parametrize("combo", combos(streamed=True), ids=ids)
def test_runner_matrix_streamed_on_cuda(combo, tiny_ckpt, tmp_path):
    result = compresskit.prune(**config(*combo, "cuda"), model=tiny_ckpt, work_dir=str(tmp_path / "work"))
    _reached(result)
    assert result.manifest["device_peak_bytes"] > 0


@pytest.mark.parametrize("metric,pattern,floor", [
    ("magnitude", "unstructured", 0.9999), ("magnitude", "2:4", 0.9999),  # exact ties may break differently
    ("wanda", "unstructured", 0.999), ("wanda", "2:4", 0.999),
    ("gblm", "unstructured", 0.999), ("gblm", "2:4", 0.999),
    ("gradient", "unstructured", 0.999), ("wandapp", "unstructured", 0.99),
    ("sparsegpt", "unstructured", 0.98), ("sparsegpt", "2:4", 0.98),
])
def test_cpu_and_cuda_masks_agree(metric, pattern, floor):
    """float32, the same model and samples: the masks agree up to float rounding (SparseGPT's
    sequential column updates round differently on the GPU; the first GPU run measured 99.5 %)."""
    cfg = dict(config(metric, pattern, "none", "uniform", "cpu"), model="random:small", nsamples=8, seqlen=64)
    cpu = _masks(compresskit.prune(**cfg).model)
    gpu = _masks(compresskit.prune(**dict(cfg, device="cuda")).model)
    total = sum(m.numel() for m in cpu.values())
    same = sum(int((cpu[k] == gpu[k]).sum()) for k in cpu)
    assert same / total >= floor, f"{metric} {pattern}: {same}/{total} mask entries agree"


@pytest.mark.parametrize("metric", ["wanda", "gblm", "sparsegpt", "wandapp"])
def test_bfloat16_model_on_cuda(metric):
    result = compresskit.prune(**config(metric, "unstructured", "none", "uniform", "cuda"), model="random:tiny",
                               adapter_options={"dtype": "bfloat16"})
    _reached(result)
    _at_rest(result)
    assert result.model.dtype == torch.bfloat16


def test_gradient_cache_hit_on_cuda(tmp_path, monkeypatch):
    """The second run reads the cached gradient statistics from disk: they reach the metric on the GPU."""
    monkeypatch.setenv("COMPRESSKIT_CACHE", str(tmp_path / "cache"))
    cfg = dict(config("gblm", "unstructured", "none", "uniform", "cuda"), model="random:tiny")
    first = compresskit.prune(**cfg)
    second = compresskit.prune(**cfg)
    assert second.manifest["gradients"]["statistics"]["grad_l1"]["cache"] == "hit"
    _reached(second)
    a, b = _masks(first.model), _masks(second.model)  # the same statistics; GPU kernels may round apart
    assert sum(int((a[k] == b[k]).sum()) for k in a) / sum(m.numel() for m in a.values()) >= 0.9999


def test_select_on_cuda():
    result = compresskit.prune(**config("gblm", "unstructured", "none", "uniform", "cuda"), model="random:tiny",
                               select="metric.alpha=0,10", select_nsamples=2)
    assert result.manifest["selection"]["chosen"] in (0, 10, 0.0, 10.0, "0", "10")
    _reached(result)


def test_perplexity_on_cuda_equals_cpu(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text(TEXT)
    kw = dict(model="random:tiny", adapter="llama", data=str(path), seqlen=32, limit=4, progress=False)
    cpu = compresskit.evaluate(**kw, device="cpu")
    gpu = compresskit.evaluate(**kw, device="cuda")
    assert gpu["device"].startswith("cuda")
    assert gpu["perplexity"] == pytest.approx(cpu["perplexity"], rel=1e-3)


def test_prune_with_evaluation_on_cuda(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text(TEXT)
    result = compresskit.prune(**config("gblm", "unstructured", "none", "uniform", "cuda"), model="random:tiny",
                               evaluate=True, eval_data=str(path), eval_limit=2)
    ev = result.manifest["evaluation"]
    assert ev["dense"]["perplexity"] > 0 and ev["pruned"]["perplexity"] > 0
    _at_rest(result)


def test_streamed_activations_on_the_gpu_leave_the_host_budget_alone(tiny_ckpt, tmp_path):
    result = compresskit.prune(**config("gblm", "unstructured", "none", "uniform", "cuda"), model=tiny_ckpt,
                               work_dir=str(tmp_path / "work"))
    assert result.manifest["streaming"]["activations_peak_in_memory"] == 0  # host bytes: they all lived on the GPU
    _reached(result)
