"""Offline, CPU-first test setup shared by every test module."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: a second thread only spins (and CI shares its cores)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run where a CUDA device is present and are skipped elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (where one is present, pytest -m cuda runs these)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def strict_devices(monkeypatch):
    """The strict device mode (compresskit.engine.device): tensors at rest refuse to mix with compute
    tensors, so a CPU-only run finds the device mixes that would crash on CUDA."""
    from compresskit.engine.device import STRICT_ENV

    monkeypatch.setenv(STRICT_ENV, "1")


@pytest.fixture(scope="session")
def _tiny_llama_master():
    from compresskit_plugins.adapters.llama.sources import random_model

    return random_model("tiny")


@pytest.fixture
def tiny_llama(_tiny_llama_master):
    """A fresh deep copy of the seeded tiny random LLaMA and its byte tokenizer (pruning mutates)."""
    model, tok = _tiny_llama_master
    return copy.deepcopy(model), tok


@pytest.fixture
def llama_calibration(tiny_llama):
    """``(adapter, loaded, batches)``: the tiny LLaMA behind the llama adapter and 3 random calibration
    samples of 24 tokens (the gradient engine's tests)."""
    from compresskit.interfaces import Loaded
    from compresskit_plugins.adapters.llama import LlamaAdapter

    model, tok = tiny_llama
    adapter = LlamaAdapter()
    loaded = Loaded(model=model, processor=tok, source="random:tiny")
    return adapter, loaded, adapter.calibration_batches(loaded, 3, 24, 0, "random")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """random:tiny saved as a checkpoint (what a streamed run reads)."""
    from compresskit_plugins.adapters.llama.sources import random_model

    model, tok = random_model("tiny")
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(path, max_shard_size="200KB")
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def registry():
    from compresskit.engine.registry import Registry

    return Registry.from_entrypoints()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep caches of one test session in a temp dir unless the user set one explicitly."""
    if "COMPRESSKIT_TEST_USE_USER_CACHE" not in os.environ:
        monkeypatch.setenv("COMPRESSKIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
