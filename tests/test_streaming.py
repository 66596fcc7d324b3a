"""Streamed runs (compresskit.engine.stream): same masks and gradients as in memory, resumable, honest output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hang

import compresskit
from compresskit import hookimpl
from compresskit.errors import CompressKitError, OptionError
from compresskit.stats import GradNorm
from compresskit.engine.stream import memory, tensorfile
from compresskit.engine.stream.activations import ActivationStore
from compresskit.engine.stream.workdir import ResumeError

RUN = dict(adapter="llama", nsamples=4, seqlen=24, calibration="random", device="cpu", progress=False)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """random:small saved with small shards (the checkpoint a streamed run reads)."""
    from compresskit_plugins.adapters.llama.sources import random_model

    model, tok = random_model("small")
    path = tmp_path_factory.mktemp("ckpt") / "small"
    model.save_pretrained(path, max_shard_size="300KB")
    tok.save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) > 3
    return str(path)


@pytest.fixture
def spill_all(monkeypatch):
    """Every activation goes to disk (an activation budget of 0 bytes)."""
    monkeypatch.setattr(memory, "activation_budget", lambda *a, **k: 0)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _load(directory) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return _weights(AutoModelForCausalLM.from_pretrained(directory))


@pytest.mark.parametrize("metric", ["wanda", "gblm", "sparsegpt", "magnitude", "wandapp", "wanda+ro"])
def test_streamed_pruning_equals_in_memory(metric, small_ckpt, tmp_path, spill_all):
    metric, _, update = metric.partition("+")  # wandapp: block-gradient statistics; +ro: a block solver
    cfg = dict(RUN, model=small_ckpt, metric=metric, **({"update": update} if update else {}))
    ref = _weights(compresskit.prune(**cfg).model)
    result = compresskit.prune(**cfg, max_memory="8GB", work_dir=str(tmp_path / "work"))
    assert result.manifest["streaming"]["activations_spilled"] > 0 or metric == "magnitude"
    result.save(tmp_path / "out")
    got = _load(tmp_path / "out")
    assert got.keys() == ref.keys()
    masks_differ = sum(int(((got[k] == 0) != (ref[k] == 0)).sum()) for k in ref)
    assert masks_differ == 0, f"{masks_differ} mask entries differ"
    for k in ref:  # the same computations in the same order: the weights agree to the bit
        assert torch.equal(got[k], ref[k]), k


def test_streamed_gradients_equal_in_memory(small_ckpt, tmp_path, spill_all):
    from compresskit.engine import gradients
    from compresskit.engine.stream import grads
    from compresskit.engine.stream.checkpoint import Checkpoint, ModelTensors
    from compresskit.engine.stream.session import Session
    from compresskit.engine.stream.workdir import WorkDir
    from compresskit_plugins.adapters.llama import LlamaAdapter

    adapter = LlamaAdapter()
    loaded = adapter.load(small_ckpt)
    batches = adapter.calibration_batches(loaded, 3, 24, 0, "random")
    stats = [GradNorm("l1"), GradNorm("l2", 100.0)]
    ref = gradients.compute(adapter, loaded.model, batches, stats, torch.device("cpu"), progress=False)
    ck = Checkpoint(small_ckpt)
    empty = adapter.load_empty(ck.directory, small_ckpt)
    work = WorkDir(tmp_path / "work", {}, resume=False)
    s = Session(adapter, empty, ModelTensors(empty.model, ck, torch.float32), torch.device("cpu"),
                ActivationStore(work.acts, 0), work, progress=False)
    got, info = grads.obtain(s, batches, stats)
    n_blocks = len(adapter.blocks(loaded.model))
    assert len(got) == 7 * n_blocks and info["statistics"]["grad_l1"]["cache"] == "streamed"
    for st in stats:
        for key, parts in ref[st.key()].items():
            want, have = st.finish(parts), got[key][st.name]
            rel = ((have - want).abs().max() / want.abs().max()).item()
            assert rel <= 1e-6, f"{key} {st.name}: relative difference {rel:.2e}"
    assert s.store.spilled > 0


def test_each_block_is_read_twice_for_gradients_and_once_for_pruning(small_ckpt, tmp_path, monkeypatch):
    from compresskit.engine.stream.checkpoint import ModelTensors

    reads: dict[str, int] = {}  # whole-tensor reads (the output's copy of the rest reads in row chunks)
    real_read = ModelTensors.read

    def read(self, name, rows=None):
        reads[name] = reads.get(name, 0) + (rows is None)
        return real_read(self, name, rows)

    monkeypatch.setattr(ModelTensors, "read", read)
    result = compresskit.prune(**RUN, model=small_ckpt, metric="gblm", work_dir=str(tmp_path / "w"))
    blocks = [k for k in reads if ".layers." in k]
    assert blocks and all(reads[k] == 3 for k in blocks), "each block: 2 gradient passes + 1 pruning pass"
    assert reads["model.embed_tokens.weight"] == 2  # block 0's inputs: gradient pass and pruning pass
    assert reads["lm_head.weight"] == 1 and reads["model.norm.weight"] == 1  # the head, once
    ck_bytes = result.manifest["streaming"]["checkpoint_bytes_read"]
    total = sum(p.stat().st_size for p in Path(small_ckpt).glob("*.safetensors"))
    assert 3 * 0.9 * total < ck_bytes < 5 * total  # blocks 3x, embeddings/head 2x plus the copy of the rest


class _Crash(Exception):
    pass


class _CrashAfter:
    def __init__(self, k: int) -> None:
        self.k = k

    @hookimpl
    def block_done(self, run, block_index):
        if block_index == self.k:
            raise _Crash(f"killed after block {block_index}")


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "compresskit.json"}


@pytest.fixture(scope="module")
def reference_output(small_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    compresskit.prune(**RUN, model=small_ckpt, metric="gblm", work_dir=str(out.parent / "work")).save(out)
    return out


def _crashed_run(cfg: dict, registry, after: int) -> None:
    """Run ``cfg`` with a hook that raises after block ``after`` has been committed."""
    crash = _CrashAfter(after)
    registry.pm.register(crash)
    try:
        with pytest.raises(_Crash):
            compresskit.prune(**cfg, registry=registry)
    finally:
        registry.pm.unregister(crash)


def test_killed_after_block_k_resumes_to_identical_output(small_ckpt, reference_output, tmp_path, registry):
    cfg = dict(RUN, model=small_ckpt, metric="gblm", work_dir=str(tmp_path / "work"))
    _crashed_run(cfg, registry, after=1)
    progress = json.loads((tmp_path / "work" / "progress.json").read_text())
    assert progress["phase"] == "prune" and progress["next"] == 2
    result = compresskit.prune(**cfg, resume=True, registry=registry)
    assert result.manifest["streaming"]["resumed"] == ["pruning, next block 2"]
    assert [r.block for r in result.report.layers] == [b for b in range(4) for _ in range(7)]
    result.save(tmp_path / "out")
    assert _files(tmp_path / "out") == _files(reference_output)
    a, b = (json.loads((d / "compresskit.json").read_text()) for d in (tmp_path / "out", reference_output))
    assert [r["sparsity"] for r in a["report"]["layers"]] == [r["sparsity"] for r in b["report"]["layers"]]


def test_killed_at_every_step_resumes_to_identical_output(tmp_path, monkeypatch, spill_all):
    """A crash right after each commit (gradient forward, head, backward, every pruned block, the
    output) and a resume give the bytes of the uninterrupted run (random:tiny, gblm, all spilled)."""
    from compresskit.engine.stream import workdir

    cfg = dict(RUN, model="random:tiny", metric="gblm", nsamples=2, seqlen=16)
    compresskit.prune(**cfg, work_dir=str(tmp_path / "wref")).save(tmp_path / "ref")
    want = _files(tmp_path / "ref")
    real = workdir.WorkDir.commit
    for j in range(1, 50):
        count = [0]

        def commit(self, **kw):
            real(self, **kw)
            count[0] += 1
            if count[0] == j:
                raise _Crash

        monkeypatch.setattr(workdir.WorkDir, "commit", commit)
        try:
            compresskit.prune(**cfg, work_dir=str(tmp_path / f"w{j}"))
            break  # fewer than j commits: every step was covered
        except _Crash:
            pass
        monkeypatch.setattr(workdir.WorkDir, "commit", real)
        compresskit.prune(**cfg, work_dir=str(tmp_path / f"w{j}"), resume=True).save(tmp_path / f"o{j}")
        assert _files(tmp_path / f"o{j}") == want, f"crash after commit {j}"
    assert j >= 8  # forward x2, head, backward x2 (the last opens pruning), pruning x2, output


def test_sigkill_then_resume_gives_identical_output(small_ckpt, reference_output, tmp_path):
    """A real SIGKILL of a CLI process during pruning; ``--resume`` finishes the same bytes."""
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["prune", "--model", small_ckpt, "--metric", "gblm", "--nsamples", "4", "--seqlen", "24",
            "--calibration", "random", "--device", "cpu", "--no-progress", "--work-dir", str(work),
            "--output", str(out)]
    marker = tmp_path / "pruned-block-0"
    # block_done of block 0 (after the streamed engine committed the block): write the marker, then
    # wait there until killed, so the kill lands between block 0 and block 1 of the pruning phase
    stop = ("import sys, time\nfrom pathlib import Path\nfrom compresskit import hookimpl\n"
            "from compresskit.cli import main, registry\n"
            "class Stop:\n    @hookimpl\n    def block_done(self, run, block_index):\n"
            f"        Path({str(marker)!r}).write_text(str(block_index))\n        time.sleep({hang.HANG_S})\n"
            "registry().pm.register(Stop())\nsys.argv = ['compresskit', *sys.argv[1:]]\nmain()\n")
    proc = subprocess.Popen([sys.executable, "-c", stop, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        hang.wait_for(marker.exists, "pruning reached block_done", proc)
        os.kill(proc.pid, signal.SIGKILL)
        hang.communicate(proc, "the process after SIGKILL")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the process was not killed by the SIGKILL"
    assert marker.read_text() == "0" and not out.exists(), "the run got past block 0 or wrote its output"
    progress = json.loads((work / "progress.json").read_text())
    assert progress["phase"] == "prune" and progress["next"] == 1, progress  # killed during pruning, not done
    from click.testing import CliRunner

    from compresskit.cli import cli

    res = CliRunner().invoke(cli, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert _files(out) == _files(reference_output)


def test_changed_configuration_refuses_to_resume(small_ckpt, tmp_path, registry):
    cfg = dict(RUN, model=small_ckpt, metric="wanda", work_dir=str(tmp_path / "work"))
    _crashed_run(cfg, registry, after=0)
    with pytest.raises(ResumeError, match=r"config\.sparsity: null -> 0\.6"):
        compresskit.prune(**cfg, sparsity=0.6, resume=True, registry=registry)
    with pytest.raises(ResumeError, match="pass --resume"):
        compresskit.prune(**cfg, registry=registry)
    done = compresskit.prune(**cfg, resume=True, registry=registry)  # unchanged: continues
    assert len(done.report.layers) == 28


def test_output_is_a_loadable_sharded_checkpoint(small_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    result = compresskit.prune(**RUN, model=small_ckpt, metric="wanda", max_memory="8GB")
    out = result.save(tmp_path / "out")
    assert not Path(result.manifest["streaming"]["work_dir"]).exists()  # compresskit's own work dir is removed
    index = json.loads((out / "model.safetensors.index.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert set(index["weight_map"]) == set(model.state_dict())
    sizes = 0
    for name, file in index["weight_map"].items():
        t = tensorfile.TensorFile(out / file)
        assert name in t.keys()
        sizes += t.entries[name].nbytes
    assert sizes == index["metadata"]["total_size"]
    assert len({f for f in index["weight_map"].values()}) == 5  # one shard per block + the rest
    mem = tmp_path / "mem"
    compresskit.prune(**RUN, model=small_ckpt, metric="wanda").save(mem)
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (mem / f).read_bytes(), f
    with pytest.raises(CompressKitError, match="keeps no model in memory"):
        result.model


def test_streams_automatically_when_the_model_does_not_fit(small_ckpt, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 1000)
    result = compresskit.prune(**RUN, model=small_ckpt, metric="wanda")
    assert "streaming" in result.manifest


def test_bad_memory_settings_are_refused_with_the_fix(small_ckpt):
    with pytest.raises(OptionError, match="not a size"):
        compresskit.prune(**RUN, model=small_ckpt, metric="wanda", max_memory="lots")
    with pytest.raises(OptionError, match="too small for this model.*give at least"):
        compresskit.prune(**RUN, model=small_ckpt, metric="wanda", max_memory="100MB")
    with pytest.raises(OptionError, match="compresskit eval OUTPUT"):
        compresskit.prune(**RUN, model=small_ckpt, metric="wanda", max_memory="8GB", evaluate=True)
    with pytest.raises(OptionError, match="prunes nothing"):  # the same plan checks as in memory
        compresskit.prune(**RUN, model=small_ckpt, metric="wanda", max_memory="8GB", sparsity=0.001)
    with pytest.raises(OptionError, match="pre-pass.*--sparsity-map"):
        compresskit.prune(**RUN, model=small_ckpt, metric="wanda", max_memory="8GB", allocation="owl", sparsity=0.6)
    with pytest.raises(OptionError, match="--select prunes several times"):
        compresskit.prune(**RUN, model=small_ckpt, metric="gblm", max_memory="8GB", select="metric.alpha=0,100")
    assert memory.parse_size("1.3GB") == 1_300_000_000 and memory.parse_size("2MiB") == 2 << 20


def test_activation_store_spills_beyond_its_budget_and_reads_back_exactly(tmp_path):
    store = ActivationStore(tmp_path, budget=3 * 64 * 4)
    seq = store.sequence("x")
    tensors = [torch.randn(1, 8, 8) for _ in range(5)] + [torch.randn(1, 8, 8).bfloat16()]
    for t in tensors:
        seq.append(t)
    assert store.resident == 3 * 64 * 4 and store.spilled == 2 * 64 * 4 + 64 * 2
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(seq, tensors))
    seq.persist()
    again = ActivationStore(tmp_path, 0).open("x")
    assert all(torch.equal(a, b) for a, b in zip(again, tensors))
    del seq
    assert store.resident == 0


def test_tensorfile_is_read_by_safetensors(tmp_path):
    from safetensors import safe_open

    tensors = {"b": torch.arange(6, dtype=torch.int64).reshape(2, 3), "a": torch.randn(5, 3).bfloat16(),
               "c": torch.zeros(0)}
    tensorfile.write(tmp_path / "x.safetensors", tensors)
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)
    tf = tensorfile.TensorFile(tmp_path / "x.safetensors")
    assert torch.equal(tf.read("a", rows=(1, 4)), tensors["a"][1:4])


def test_resume_without_a_work_dir_finds_the_default_one(tmp_path, registry):
    cfg = dict(RUN, model="random:tiny", metric="wanda")
    crash = _CrashAfter(0)
    registry.pm.register(crash)
    try:
        with pytest.raises(_Crash):
            compresskit.prune(**cfg, max_memory="8GB", registry=registry)
    finally:
        registry.pm.unregister(crash)
    result = compresskit.prune(**cfg, max_memory="8GB", resume=True, registry=registry)
    assert result.manifest["streaming"]["resumed"] == ["pruning, next block 1"]
    work = Path(result.manifest["streaming"]["work_dir"])
    assert work.parent.name == "work" and work.is_dir()
    result.save(tmp_path / "out")
    assert not work.exists()


def test_imported_reference_gradients_stream_like_in_memory(small_ckpt, tmp_path):
    from compresskit.engine import gradients
    from compresskit_plugins.adapters.llama import LlamaAdapter

    adapter = LlamaAdapter()
    loaded = adapter.load(small_ckpt)
    batches = adapter.calibration_batches(loaded, 4, 24, 0, "random")
    stat = GradNorm("l1", 100.0)
    parts = gradients.compute(adapter, loaded.model, batches, [stat], torch.device("cpu"), progress=False)
    path = tmp_path / "gradients_aggregrate_norm_l1_model_small.pth"
    torch.save({k: stat.finish(p).half() for k, p in parts[stat.key()].items()}, path)
    cfg = dict(RUN, model=small_ckpt, metric="gblm", metric_options={"semantics": "reference"},
               gradient_options={"import_path": str(path)})
    ref = _weights(compresskit.prune(**cfg).model)
    compresskit.prune(**cfg, max_memory="8GB").save(tmp_path / "out")
    got = _load(tmp_path / "out")
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_cli_dry_run_and_options(small_ckpt, tmp_path):
    from click.testing import CliRunner

    from compresskit.cli import cli

    args = ["prune", "--model", small_ckpt, "--metric", "wanda", "--device", "cpu", "--max-memory", "8GB"]
    res = CliRunner().invoke(cli, [*args, "--dry-run"])
    assert res.exit_code == 0 and "28 layers in 4 blocks" in res.output
    res = CliRunner().invoke(cli, [*args, "--max-memory", "0.5 lots", "--dry-run"])
    assert res.exit_code != 0 and "not a size" in res.output


def test_tied_embeddings_stream_like_in_memory(tmp_path):
    """A head tied to the embeddings (SmolLM2, ...) is read once, stays tied, and is saved once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compresskit_plugins.adapters.llama.sources import RANDOM_PRESETS, byte_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
                      **RANDOM_PRESETS["tiny"])
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tied")
    byte_tokenizer().save_pretrained(tmp_path / "tied")
    run = dict(RUN, model=str(tmp_path / "tied"), metric="gblm")
    ref = _weights(compresskit.prune(**run).model)
    compresskit.prune(**run, max_memory="8GB").save(tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    got = _load(tmp_path / "out")
    assert all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_peak_rss_is_this_process_not_its_parent():
    """The streaming bench's peak: a child started by a parent that once held 300 MB reports that
    300 MB as its ``ru_maxrss`` (Linux carries it across fork + exec); ``peak_rss`` (VmHWM) does not."""
    import subprocess
    import sys

    child = ("import resource; from compresskit.engine.stream.memory import peak_rss; "
             "print(peak_rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    parent = ("import subprocess, sys; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); del b; "
              f"print(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True, check=True).stdout)")
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout.split()
    peak, inherited = int(out[0]), int(out[1])
    assert inherited >= 300 * 2**20
    assert peak < 200 * 2**20 < inherited
