"""GBLM's finished gradient statistics rest on disk in a single process (compresskit.engine.gradcache):
the runner reads each layer's from the cache file, a pass in groups writes finished groups to disk,
and every fallback (an unwritable cache, a failed group write) gives the same numbers in memory."""

from __future__ import annotations

import logging

import pytest
import torch

from compresskit.cache import tensor_fingerprint
from compresskit.engine import gradcache, gradients
from compresskit.errors import GradientError
from compresskit.stats import GradNorm

CPU = torch.device("cpu")
STATS = [GradNorm("l1", 100.0), GradNorm("l2", 100.0)]


def obtain(llama_calibration, cache, **opts):
    adapter, loaded, batches = llama_calibration
    return gradients.obtain(adapter, loaded, batches, STATS, CPU, {"cache_dir": str(cache), **opts}, progress=False)


def in_memory(llama_calibration, tmp_path, monkeypatch, **opts):
    """The same statistics with the cache unwritable: they rest in memory."""
    with monkeypatch.context() as m:
        m.setattr(gradcache, "save", lambda *a, **k: False)
        grads, info = obtain(llama_calibration, tmp_path / "unwritable", recompute=True, **opts)
    assert {s["rest"] for s in info["statistics"].values()} == {"memory"}
    return {k: dict(v) for k, v in grads.items()}


def assert_equal(got, want):
    assert list(got) == list(want) and len(want) == 14
    for key in want:
        for name in ("grad_l1", "grad_l2"):
            assert torch.equal(got[key][name], want[key][name]), (key, name)


def test_content_checksum_is_hashed_a_few_tensors_at_a_time_and_catches_any_change():
    import threading
    import time

    from compresskit.cache import tensors_digest

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4), "c_10": torch.zeros(1), "c_9": torch.eye(2),
               **{f"w{i}": torch.randn(64, 64, generator=torch.Generator().manual_seed(i)) for i in range(12)}}
    active, most, seen, lock = [0], [0], [], threading.Lock()

    def visit(key, t):  # each tensor is visited by the thread that holds it, between reading and hashing
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
            seen.append(key)
        time.sleep(0.01)
        with lock:
            active[0] -= 1

    digest = tensors_digest(tensors, visit, workers=3)
    assert sorted(seen) == sorted(tensors) and 1 < most[0] <= 3  # in parallel, never more than 3 at once
    assert digest == gradcache.content_sha256(tensors) == tensors_digest(tensors, workers=1)
    changed = [{**tensors, "a": torch.ones(4, dtype=torch.float64)}, {**tensors, "a": torch.ones(2, 2)},
               {**tensors, "a": torch.tensor([1.0, 1.0, 1.0, 1.0 + 2**-20])},
               {("z" if k == "a" else k): v for k, v in tensors.items()}, {k: v for k, v in tensors.items() if k != "a"}]
    assert len({digest, *(tensors_digest(t) for t in changed)}) == 1 + len(changed)
    assert digest != tensor_fingerprint(tensors)  # not the one-stream fingerprint


@pytest.mark.parametrize("groups", [1, 3])
def test_statistics_rest_in_the_cache_file_and_equal_the_in_memory_ones(llama_calibration, tmp_path, monkeypatch,
                                                                         strict_devices, groups):
    want = in_memory(llama_calibration, tmp_path, monkeypatch, groups=groups)
    grads, info = obtain(llama_calibration, tmp_path / "cache", recompute=True, groups=groups)
    assert {s["rest"] for s in info["statistics"].values()} == {"disk"}
    assert all(isinstance(v, gradcache.SumFile) for v in grads.sums.values())
    assert_equal(grads, want)
    assert not list((tmp_path / "cache" / "gradients").glob(".tmp-groups-*"))  # the groups' files are gone
    hit, info = obtain(llama_calibration, tmp_path / "cache", groups=groups)
    assert {s["cache"] for s in info["statistics"].values()} == {"hit"}
    assert {s["rest"] for s in info["statistics"].values()} == {"disk"}
    assert_equal(hit, want)


def test_a_failed_group_write_brings_the_groups_back_into_memory(llama_calibration, tmp_path, monkeypatch, caplog):
    want = in_memory(llama_calibration, tmp_path, monkeypatch, groups=3)
    real, calls = gradcache.Spill.add, []

    def add(self, key, sums):
        calls.append(key)
        if len(calls) == 3:  # the second group's first statistic
            raise OSError(28, "No space left on device")
        return real(self, key, sums)

    monkeypatch.setattr(gradcache.Spill, "add", add)
    caplog.set_level(logging.WARNING, logger="compresskit")
    grads, info = obtain(llama_calibration, tmp_path / "cache", recompute=True, groups=3)
    assert "could not write a finished gradient group to disk" in caplog.text
    assert_equal(grads, want)
    assert not list((tmp_path / "cache" / "gradients").glob(".tmp-groups-*"))


def test_a_cache_file_removed_during_the_run_is_a_clear_error(llama_calibration, tmp_path):
    grads, _ = obtain(llama_calibration, tmp_path, recompute=True)
    for f in (tmp_path / "gradients").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(GradientError, match="could not be read during the run .* Rerun"):
        grads[next(iter(grads))]


def test_a_pass_removes_the_temporaries_a_killed_run_left_and_nothing_else(llama_calibration, tmp_path, caplog):
    # A SIGKILLed pass leaves a half-written cache file and its finished groups (at 7B each about
    # as large as the cache file). The next pass that writes there removes them, but not what a
    # live run holds, a temporary created a moment ago, or anything not named as our temporaries.
    import os
    import time

    from compresskit import cache

    root = tmp_path / "cache" / "gradients"
    root.mkdir(parents=True)
    groups = root / ".tmp-groups-killed"
    groups.mkdir()
    (groups / "00000.safetensors").write_bytes(b"x" * 1000)
    half = root / ".l1-abc.safetensors.tmp-killed"
    half.write_bytes(b"y" * 500)
    live = root / ".tmp-groups-live"
    live.mkdir()
    young = root / ".l2-abc.safetensors.tmp-young"
    young.write_bytes(b"z")
    theirs = [root / "notes.tmp-keep", root / ".hidden", root / "l1-other.safetensors"]
    for p in theirs:
        p.write_bytes(b"keep")
    hour_ago = time.time() - 3600
    for p in (groups, half, live, *theirs):
        os.utime(p, (hour_ago, hour_ago))
    fd = cache.hold(live)  # as a concurrent pass holds its groups' directory
    try:
        caplog.set_level(logging.INFO, logger="compresskit")
        obtain(llama_calibration, tmp_path / "cache", recompute=True, groups=2)
        if fd is None:
            pytest.skip("flock does not work on this file system: nothing is swept")
        assert not groups.exists() and not half.exists()
        assert live.is_dir() and young.exists() and all(p.exists() for p in theirs)
        assert "removed 2 temporaries" in caplog.text
    finally:
        if fd is not None:
            os.close(fd)


def test_live_temporaries_are_held_while_they_are_written(tmp_path):
    from compresskit import cache

    seen = []
    cache.atomic_write(tmp_path / "f.bin", lambda p: (p.write_bytes(b"1"), seen.append(cache.in_use(p))))
    spill = gradcache.Spill(tmp_path)
    try:
        seen.append(cache.in_use(spill.dir))
    finally:
        spill.close()
    if spill.lock is None and not seen[0]:
        pytest.skip("flock does not work on this file system")
    assert seen == [True, True] and not spill.dir.exists()


def test_a_cache_without_room_for_the_statistics_is_not_written_in_vain(llama_calibration, tmp_path, monkeypatch,
                                                                        caplog):
    import collections

    want = in_memory(llama_calibration, tmp_path, monkeypatch, groups=3)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(gradcache.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    written = []
    monkeypatch.setattr(gradcache.tensorfile, "write", lambda *a, **k: written.append(a[0]))
    caplog.set_level(logging.WARNING, logger="compresskit")
    grads, info = obtain(llama_calibration, tmp_path / "cache", recompute=True, groups=3)
    assert "has 0.00 GB free, less than the" in caplog.text and "COMPRESSKIT_CACHE" in caplog.text
    assert not written  # neither group files nor the cache file
    assert {s["rest"] for s in info["statistics"].values()} == {"memory"}
    assert {s["path"] for s in info["statistics"].values()} == {None}
    assert_equal(grads, want)
