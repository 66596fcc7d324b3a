"""Device placement: one owner of every crossing, and the strict mode that finds device mixes on a CPU.

On a CPU-only machine the compute device and the place where tensors rest are the same, so a
tensor that was never moved to the compute device goes unnoticed; on CUDA the same code crashes
("Expected all tensors to be on the same device"). In the strict mode (the ``strict_devices``
fixture) tensors at rest are tagged and refuse to mix with compute tensors: the runner matrix
below runs every metric x pattern x solver x allocation, in memory and streamed, under it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import compresskit
from compresskit.engine.device import DeviceMixError, Placement, at_rest_type, to_rest
from device_matrix import combos, config, ids


def _sparsity_reached(result, pattern: str) -> None:
    assert result.report.layers
    for row in result.report.layers:
        assert abs(row.sparsity - row.target) <= 1.0 / row.shape[1] + 1e-9, (row.block, row.name)


# --------------------------------------------------------------------------- the strict mode itself


def test_strict_mode_refuses_a_mix_and_allows_the_crossings(strict_devices):
    rest = to_rest(torch.ones(4))
    assert isinstance(rest, at_rest_type()) and isinstance(rest * 2, at_rest_type())  # derived tensors stay at rest
    with pytest.raises(DeviceMixError, match="Placement.to_compute"):
        torch.ones(4) * rest
    with pytest.raises(DeviceMixError):
        torch.nn.Parameter(torch.ones(4)).add(rest)
    moved = Placement("cpu").to_compute({"g": [rest]})["g"][0]
    assert type(moved) is torch.Tensor and torch.equal(torch.ones(4) * moved, torch.ones(4))
    dst = torch.zeros(4)
    dst.copy_(rest)  # a crossing: allowed, and the destination stays a compute tensor
    assert type(dst) is torch.Tensor and dst.sum().item() == 4.0
    assert isinstance(rest.to(torch.float64), at_rest_type())  # a dtype cast does not move it


def test_without_the_strict_mode_tensors_at_rest_are_plain(monkeypatch):
    from compresskit.engine.device import STRICT_ENV

    monkeypatch.delenv(STRICT_ENV, raising=False)
    assert type(to_rest(torch.ones(2))) is torch.Tensor


def test_a_run_places_gradient_statistics_at_rest(strict_devices):
    result = compresskit.prune(**config("gblm", "unstructured", "none", "uniform", "cpu"), model="random:tiny")
    grads = next(iter(result.run.gradients.values()))
    assert grads and all(isinstance(t, at_rest_type()) for t in grads.values())


# --------------------------------------------------------------------------- the GBLM-on-CUDA crash


def _todays_runner(monkeypatch):
    """The runner before the fix: gradient statistics merged into a layer's statistics where they rest."""
    monkeypatch.setattr(Placement, "to_compute", lambda self, obj: obj)


@pytest.mark.parametrize("metric", ["gblm", "gradient"])
def test_strict_mode_fails_on_the_old_gradient_merge_in_memory(metric, strict_devices, monkeypatch):
    _todays_runner(monkeypatch)
    with pytest.raises(DeviceMixError):
        compresskit.prune(**config(metric, "unstructured", "none", "uniform", "cpu"), model="random:tiny")


def test_strict_mode_fails_on_the_old_gradient_merge_streamed(strict_devices, monkeypatch, tiny_ckpt, tmp_path):
    _todays_runner(monkeypatch)
    with pytest.raises(DeviceMixError):
        compresskit.prune(**config("gblm", "unstructured", "none", "uniform", "cpu"), model=tiny_ckpt,
                          work_dir=str(tmp_path / "work"))


def test_the_old_gradient_merge_passes_unnoticed_without_the_strict_mode(monkeypatch):
    """Why the strict mode exists: on a CPU the old code ran (and on CUDA it crashed)."""
    from compresskit.engine.device import STRICT_ENV

    monkeypatch.delenv(STRICT_ENV, raising=False)
    _todays_runner(monkeypatch)
    compresskit.prune(**config("gblm", "unstructured", "none", "uniform", "cpu"), model="random:tiny")


def test_cached_gradients_are_moved_too(strict_devices, tmp_path, monkeypatch):
    """The second run reads the gradient cache (at rest): it must reach the metric on the compute device."""
    monkeypatch.setenv("COMPRESSKIT_CACHE", str(tmp_path / "cache"))
    cfg = dict(config("gblm", "unstructured", "none", "uniform", "cpu"), model="random:tiny")
    first = compresskit.prune(**cfg)
    second = compresskit.prune(**cfg)
    assert second.manifest["gradients"]["statistics"]["grad_l1"]["cache"] == "hit"
    for name, weight in first.model.state_dict().items():
        assert torch.equal(weight, second.model.state_dict()[name]), name


# --------------------------------------------------------------------------- the runner matrix, strict


@pytest.mark.parametrize("combo", combos(streamed=False), ids=ids)
def test_runner_matrix_in_memory_strict(combo, strict_devices):
    metric, pattern, solver, allocation = combo
    result = compresskit.prune(**config(*combo, "cpu"), model="random:tiny")
    _sparsity_reached(result, pattern)


@pytest.mark.parametrize("combo", combos(streamed=True), ids=ids)
def test_runner_matrix_streamed_strict(combo, strict_devices, tiny_ckpt, tmp_path):
    metric, pattern, solver, allocation = combo
    result = compresskit.prune(**config(*combo, "cpu"), model=tiny_ckpt, work_dir=str(tmp_path / "work"))
    _sparsity_reached(result, pattern)


# --------------------------------------------------------------------------- the source check

FORBIDDEN = re.compile(r"""\.cpu\(\)|\.cuda\(|torch\.device\(|\.to\(\s*(?:["']|[\w.]*(?:device|dev|offload|home|via|gpu)\b"""
                       r"""|[^()]*\bdevice\s*=)|\bdevice\s*=\s*["'](?:cpu|cuda)""")
OWNERS = {"compresskit/engine/device.py", "compresskit/engine/atrest.py", "compresskit/engine/prefetch.py"}
ALLOWED = [  # (file, the code allowed there, why)
    ("compresskit/engine/stream/engine.py", ".store.open(", "an activation sequence read onto the compute device "
     "(Activations.to moves each tensor through the device module)"),
    ("compresskit/engine/stream/grads.py", ".store.open(", "the same: activation sequences read onto the device"),
    ("compresskit/testing/_base.py", 'device="cpu"', "conformance checks run on the CPU by design"),
    ("compresskit/testing/runs.py", 'device="cpu"', "conformance checks run on the CPU by design"),
    ("plugins/adapters/vit/timm_models.py", '"meta"', "a model built on the meta device: no crossing"),
    ("plugins/adapters/vit/timm_models.py", 'to_empty(device="cpu")', "the meta model materialised at rest"),
]


def test_device_moves_live_in_the_device_module():
    """``.cpu()``, ``.cuda()``, ``.to(<device>)`` and ``torch.device(`` only in compresskit.engine.device
    (and the allow-list above, each with its reason): every other crossing goes through it."""
    root = Path(__file__).resolve().parents[1]
    found = []
    for top in ("compresskit", "plugins"):
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel in OWNERS:
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if FORBIDDEN.search(code) and not any(f == rel and snippet in code for f, snippet, _ in ALLOWED):
                    found.append(f"{rel}:{i}: {line.strip()}")
    assert not found, ("device moves outside compresskit.engine.device; use Placement.to_compute/to_rest, "
                       "to_device or to_host there:\n" + "\n".join(found))


def test_activations_on_the_gpu_are_not_counted_against_the_host_budget(tmp_path):
    """A streamed run's store budgets host memory and device memory separately."""
    from compresskit.engine.stream.activations import ActivationStore

    store = ActivationStore(tmp_path, budget=100)
    store.device_budget = 100  # set: no GPU is asked for its free memory
    gpu = torch.device("cuda")
    assert store._take(80, gpu) and store.resident == 0 and store.device_resident == 80
    assert store._take(80, torch.device("cpu")) and store.resident == 80  # the host budget is untouched by the GPU's
    assert not store._take(40, gpu) and not store._take(40, torch.device("cpu"))  # each full on its own
    assert store.device_peak == 80 and store.peak == 80


def test_select_keeps_to_the_placement(strict_devices):
    """--select draws held-out batches (at rest, like the run's) and moves the whole model for its losses."""
    result = compresskit.prune(**config("gblm", "unstructured", "none", "uniform", "cpu"), model="random:tiny",
                               select="metric.alpha=0,10", select_nsamples=2)
    selection = result.manifest["selection"]
    assert len(selection["sweep"]) == 2 and selection["heldout_loss"] == min(r["heldout_loss"] for r in selection["sweep"])


def test_the_gpu_memory_peak_is_reported_on_cuda_only(tiny_ckpt, tmp_path, monkeypatch):
    """The manifest's device_peak_bytes is None on the CPU (in memory and streamed); where a device
    reports one, the command-line summary prints it."""
    from compresskit.cli.summary import print_summary
    from compresskit.engine import device

    mem = compresskit.prune(model="random:tiny", metric="wanda", nsamples=2, seqlen=16, calibration="random",
                            progress=False)
    streamed = compresskit.prune(model=tiny_ckpt, metric="wanda", nsamples=2, seqlen=16, calibration="random",
                                 progress=False, work_dir=str(tmp_path / "work"))
    assert mem.manifest["device_peak_bytes"] is None and streamed.manifest["device_peak_bytes"] is None
    lines = []
    print_summary(mem, echo=lines.append)
    assert not any("GPU memory" in line for line in lines)
    monkeypatch.setattr(device, "is_cuda", lambda dev: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda dev=None: 3 * 2**29)
    assert device.peak_memory("cuda:0") == 3 * 2**29
    mem.manifest["device_peak_bytes"] = 3 * 2**29
    lines.clear()
    print_summary(mem, echo=lines.append)
    assert "GPU memory peak 1.50 GiB" in lines
