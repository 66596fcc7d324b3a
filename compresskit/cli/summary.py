"""What the command line prints after a prune or an evaluation: the per-block table, the
selection sweep, headline metrics and zero-shot accuracies (``echo`` is ``click.echo`` or a
rank-aware replacement)."""

from __future__ import annotations

from typing import Any, Callable

import click

Echo = Callable[..., Any]


def print_summary(result, echo: Echo = click.echo) -> None:
    """The per-block table, overall sparsity, the --select sweep and the evaluations of a prune."""
    rep = result.report
    by_block: dict[int, list] = {}
    for r in rep.layers:
        by_block.setdefault(r.block, []).append(r)
    echo(f"{'block':>5}  {'layers':>6}  {'target':>6}  {'sparsity':>8}  {'mean rel. error':>15}  {'seconds':>7}")
    for b, rows in by_block.items():
        errs = [r.error for r in rows if r.error is not None]
        err = f"{sum(errs) / len(errs):.4g}" if errs else "-"
        w = sum(r.shape[0] * r.shape[1] for r in rows)
        sp = sum(r.sparsity * r.shape[0] * r.shape[1] for r in rows) / w
        tg = sum(r.target * r.shape[0] * r.shape[1] for r in rows) / w
        secs = rep.block_seconds[b] if b < len(rep.block_seconds) else sum(r.seconds for r in rows)
        echo(f"{b:>5}  {len(rows):>6}  {tg:>6.3f}  {sp:>8.4f}  {err:>15}  {secs:>7.2f}")
    echo(f"overall sparsity {rep.overall_sparsity:.4f} (target {rep.overall_target:.4f}) in {rep.seconds:.1f}s")
    peak = result.manifest.get("device_peak_bytes")
    if peak is not None:
        echo(f"GPU memory peak {peak / 2**30:.2f} GiB")
    if "selection" in result.manifest:
        from compresskit.engine.select import describe

        echo(describe(result.manifest["selection"]))
    ev = result.manifest.get("evaluation")
    if ev:
        for which in ("dense", "pruned"):
            if which in ev:
                echo(f"{which:>6}: {headline(ev[which])}")
    if "zeroshot" in result.manifest:
        print_zeroshot(result.manifest["zeroshot"], echo)


def print_zeroshot(runs: dict[str, dict], echo: Echo = click.echo) -> None:
    """One row per task: n, then acc (and acc_norm) of each run (dense, pruned)."""
    first = next(iter(runs.values()))
    echo(f"{'task':<15} {'n':>6}  " + "  ".join(f"{(w + ' acc').strip():>11} {(w + ' acc_norm').strip():>16}"
                                                      for w in runs))
    for task, row in first["tasks"].items():
        cells = []
        for res in runs.values():
            r = res["tasks"][task]
            norm = f"{r['acc_norm']:.4f}" if "acc_norm" in r else "-"
            cells.append(f"{r['acc']:>11.4f} {norm:>16}")
        echo(f"{task:<15} {row['n']:>6}  " + "  ".join(cells))
    p = first["protocol"]
    echo(f"zero-shot: lm-eval {p['lm_eval_version']}, {p['source']} data, num_fewshot 0, "
               f"limit {p['limit'] if p['limit'] is not None else 'all'} per task, device {p['device']}")


def headline(res: dict) -> str:
    """The numeric entries of an evaluation result, one line."""
    return ", ".join(f"{k} {v:.4g}" for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
