"""Pictures of what was pruned: ``compresskit report DIR [DIR2]`` (PNGs plus an HTML page).

* ``layers.png``: achieved sparsity and reconstruction error of every pruned layer across blocks,
  from the manifest's ``report.layers`` (a per-layer ``target`` is drawn when the manifest has one).
* ``mask_<block>_<layer>.png``: the mask of a chosen layer read from the saved weights
  (pruned = exactly zero): a crop, and the kept fraction of every input column and output row.
  Columns or rows far from the overall kept fraction are the structured patterns of a metric that
  weighs input features (Wanda, GBLM) rather than single weights.
* with a second output: ``overlap.png`` (per layer, the fraction of pruned weights both runs
  pruned) and ``diff_<block>_<layer>.png`` (where the two masks agree and differ).

Outputs are LLM ``save_pretrained`` folders or ViT ``model.safetensors`` + ``vit.json``; weights
are found by the suffix ``.<block>.<layer name>.weight``. matplotlib draws without a display.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
from pathlib import Path
from typing import Any

from compresskit.errors import CompressKitError, MissingDependencyError
from compresskit.cache import atomic_directory
from compresskit.output import MANIFEST

DEFAULT_CROP = 128


@dataclasses.dataclass
class Output:
    """A compresskit output directory: its manifest and where each saved tensor lives."""

    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, Path]  # tensor name -> safetensors file

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.manifest.get("report", {}).get("layers", [])

    def weight(self, block: int, name: str):
        """The saved weight of layer ``name`` in block ``block`` (a torch tensor)."""
        from safetensors import safe_open

        suffix = f".{block}.{name}.weight"
        keys = [k for k in self.tensors if k.endswith(suffix)]
        if len(keys) != 1:
            raise CompressKitError(f"{self.path}: expected one saved tensor ending in {suffix!r}, found {len(keys)}; "
                                   f"is this the output the manifest describes?")
        with safe_open(str(self.tensors[keys[0]]), framework="pt") as f:
            return f.get_tensor(keys[0])


def load_output(directory: str | Path) -> Output:
    """Read an output directory's manifest and index its safetensors files.

    Raises:
        CompressKitError: not a directory, no ``compresskit.json`` (not an output), or no weights.
    """
    from safetensors import safe_open

    path = Path(directory)
    if not path.is_dir():
        raise CompressKitError(f"{path} is not a directory; pass an output directory of `compresskit prune --output`")
    if not (path / MANIFEST).is_file():
        raise CompressKitError(f"{path} is not a compresskit output: it has no {MANIFEST}. Pass a directory written "
                               f"by `compresskit prune --output DIR` (a run that did not finish leaves none)")
    manifest = json.loads((path / MANIFEST).read_text())
    tensors: dict[str, Path] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            tensors.update(dict.fromkeys(st.keys(), f))
    if not tensors:
        raise CompressKitError(f"{path} has {MANIFEST} but no *.safetensors weights; the output is incomplete")
    if not manifest.get("report", {}).get("layers"):
        raise CompressKitError(f"{path}/{MANIFEST} has no report.layers; it was not written by `compresskit prune`")
    return Output(path, manifest, tensors)


# ----------------------------------------------------------------------------------- pure math


def kept_fractions(mask) -> tuple[Any, Any]:
    """Per input column and per output row, the fraction of weights kept (``mask`` True = pruned).

    ``mask`` is ``[out, in]``; returns two float tensors of length ``in`` and ``out``.
    """
    kept = (~mask).float()
    return kept.mean(0), kept.mean(1)


def overlap(mask_a, mask_b) -> float:
    """Fraction of the union of pruned weights that both masks prune (Jaccard index; 1.0 if none)."""
    union = (mask_a | mask_b).sum().item()
    return 1.0 if union == 0 else (mask_a & mask_b).sum().item() / union


def diff_codes(mask_a, mask_b):
    """0 kept by both, 1 pruned only by A, 2 pruned only by B, 3 pruned by both."""
    return mask_a.long() + 2 * mask_b.long()


# ----------------------------------------------------------------------------------- drawing


def _figure(*size):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependencyError("pictures need matplotlib: pip install 'compresskit[report]'") from exc
    return Figure(figsize=size, layout="constrained")


def _layer_names(layers: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["name"] for r in layers))


def plot_layers(manifest: dict[str, Any], path: Path, title: str = "") -> Path:
    """Achieved sparsity (and target) and reconstruction error per layer across blocks."""
    layers = manifest["report"]["layers"]
    fig = _figure(9, 6)
    ax_s, ax_e = fig.subplots(2, 1, sharex=True)
    has_error = any(r.get("error") is not None for r in layers)
    for name in _layer_names(layers):
        rows = [r for r in layers if r["name"] == name]
        (line,) = ax_s.plot([r["block"] for r in rows], [r["sparsity"] for r in rows], "o-", ms=3, label=name)
        if any("target" in r for r in rows):
            ax_s.plot([r["block"] for r in rows], [r.get("target") for r in rows], ":", color=line.get_color())
        err = [(r["block"], r["error"]) for r in rows if r.get("error") is not None and r["error"] > 0]
        if err:
            ax_e.plot(*zip(*err), "o-", ms=3, color=line.get_color(), label=name)
    target = manifest.get("resolved", {}).get("sparsity")
    if target is not None and not any("target" in r for r in layers):
        ax_s.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:g}")
    ax_s.set_ylabel("achieved sparsity")
    ax_s.legend(fontsize=7, ncol=4)
    ax_s.set_title(title or "per-layer sparsity and reconstruction error")
    if has_error:
        ax_e.set_yscale("log")
        ax_e.set_ylabel("relative output error")
    else:
        ax_e.text(0.5, 0.5, "no reconstruction error recorded (--no-error-report)", ha="center",
                  transform=ax_e.transAxes)
    ax_e.set_xlabel("block")
    ax_e.xaxis.get_major_locator().set_params(integer=True)
    fig.savefig(path, dpi=110)
    return path


def plot_mask(weight, title: str, path: Path, crop: int = DEFAULT_CROP) -> Path:
    """A crop of the mask (black = kept) and the kept fraction per input column and output row."""
    mask = weight == 0
    cols, rows = kept_fractions(mask)
    fig = _figure(12, 4)
    ax_m, ax_c, ax_r = fig.subplots(1, 3, width_ratios=[1, 1.6, 1.6])
    ax_m.imshow((~mask[:crop, :crop]).numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax_m.set_title(f"mask [:{crop}, :{crop}] (black = kept)", fontsize=9)
    ax_m.set_xlabel("input column")
    ax_m.set_ylabel("output row")
    overall = float((~mask).float().mean())
    for ax, values, label in ((ax_c, cols, "input column"), (ax_r, rows, "output row")):
        ax.plot(values.numpy(), lw=0.6)
        ax.axhline(overall, color="grey", ls="--", lw=1, label=f"overall kept {overall:.3f}")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(label)
        ax.set_ylabel("kept fraction")
        ax.set_title(f"kept per {label} (std {float(values.std()):.3f})", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}  {tuple(mask.shape)}", fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def plot_mask_diff(weight_a, weight_b, labels: tuple[str, str], title: str, path: Path,
                   crop: int = DEFAULT_CROP) -> Path:
    """Where two masks of one layer agree and differ: a crop, and the overlap per input column."""
    from matplotlib.colors import ListedColormap

    a, b = weight_a == 0, weight_b == 0
    if a.shape != b.shape:
        raise CompressKitError(f"{title}: shapes differ ({tuple(a.shape)} vs {tuple(b.shape)}); "
                               f"compare outputs of one model")
    codes = diff_codes(a[:crop, :crop], b[:crop, :crop])
    fig = _figure(11, 4)
    ax_m, ax_c = fig.subplots(1, 2, width_ratios=[1, 1.8])
    colors = ["white", "tab:red", "tab:blue", "black"]
    ax_m.imshow(codes.numpy(), cmap=ListedColormap(colors), vmin=0, vmax=3, interpolation="nearest")
    ax_m.set_title(f"[:{crop}, :{crop}] white kept by both, black pruned by both,\nred pruned only by {labels[0]}, "
                   f"blue only by {labels[1]}", fontsize=8)
    both = (a & b).float().sum(0)
    union = (a | b).float().sum(0).clamp(min=1)
    ax_c.plot((both / union).numpy(), lw=0.6)
    ax_c.set_ylim(-0.02, 1.02)
    ax_c.set_xlabel("input column")
    ax_c.set_ylabel("pruned by both / pruned by either")
    ax_c.set_title(f"overlap of pruned weights per input column (layer: {overlap(a, b):.3f})", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def plot_overlap(out_a: Output, out_b: Output, path: Path, labels: tuple[str, str]) -> tuple[Path, list[dict]]:
    """Per layer across blocks: the fraction of pruned weights that both outputs pruned."""
    rows = []
    for r in out_a.layers:
        a, b = out_a.weight(r["block"], r["name"]) == 0, out_b.weight(r["block"], r["name"]) == 0
        rows.append({"block": r["block"], "name": r["name"], "overlap": overlap(a, b)})
    fig = _figure(9, 3.5)
    ax = fig.subplots()
    for name in _layer_names(rows):
        pts = [(r["block"], r["overlap"]) for r in rows if r["name"] == name]
        ax.plot(*zip(*pts), "o-", ms=3, label=name)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("block")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("pruned by both / by either")
    ax.set_title(f"mask overlap: {labels[0]} vs {labels[1]}")
    ax.legend(fontsize=7, ncol=4)
    fig.savefig(path, dpi=110)
    return path, rows


# ----------------------------------------------------------------------------------- the page


def choose_layers(out: Output, specs: list[str] | None = None) -> list[tuple[int, str]]:
    """``["3:mlp.down_proj", ...]`` -> (block, name) pairs; default: every layer of the middle block."""
    known = {(r["block"], r["name"]) for r in out.layers}
    if not specs:
        blocks = sorted({b for b, _ in known})
        mid = blocks[len(blocks) // 2]
        return [(r["block"], r["name"]) for r in out.layers if r["block"] == mid]
    chosen = []
    for spec in specs:
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\S+)\s*", spec)
        if not m or (int(m.group(1)), m.group(2)) not in known:
            names = ", ".join(_layer_names(out.layers))
            raise CompressKitError(f"--layer {spec!r}: expected BLOCK:NAME of a pruned layer, e.g. "
                                   f"0:{out.layers[0]['name']} (blocks 0-{max(b for b, _ in known)}; names: {names})")
        chosen.append((int(m.group(1)), m.group(2)))
    return chosen


def key_facts(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """The manifest's headline facts as (label, value) rows."""
    cfg, res, rep = manifest.get("config", {}), manifest.get("resolved", {}), manifest.get("report", {})
    info, cal = manifest.get("model_info", {}), manifest.get("calibration", {})
    pattern = cfg.get("pattern", "?")
    if res.get("pattern_options"):
        pattern += " " + json.dumps(res["pattern_options"])
    rows = [
        ("model", f"{res.get('model', '?')} ({info.get('model') or info.get('origin', '')})"),
        ("adapter / metric / pattern", f"{cfg.get('adapter')} / {cfg.get('metric')} / {pattern}"),
        ("target sparsity", f"{res.get('sparsity', '?')}"),
        ("achieved sparsity (pruned layers)",
         f"{rep.get('overall_sparsity', float('nan')):.4f} over {len(rep.get('layers', []))} layers"),
        ("update / propagate", f"{cfg.get('update')} / {cfg.get('propagate')}"),
        ("calibration", f"{cal.get('name') or cal.get('source') or cfg.get('calibration')}: "
                        f"{cal.get('nsamples')} x {cal.get('seqlen')}, seed {manifest.get('seed')}"),
        ("runner time / total", f"{rep.get('seconds', 0):.1f} s / {manifest.get('total_seconds', 0):.1f} s"),
        ("compresskit", str(manifest.get("compresskit_version"))),
    ]
    for which, ev in manifest.get("evaluation", {}).items():
        nums = ", ".join(f"{k} {v:.4g}" for k, v in ev.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool))
        rows.append((f"evaluation ({which})", nums))
    for which, zs in manifest.get("zeroshot", {}).items():
        accs = ", ".join(f"{t} {r['acc']:.3f}" + (f" (norm {r['acc_norm']:.3f})" if "acc_norm" in r else "")
                         for t, r in zs["tasks"].items())
        p = zs["protocol"]
        rows.append((f"zero-shot ({which})", f"{accs}; lm-eval {p['lm_eval_version']}, limit {p['limit']}"))
    return rows


def _facts_table(out: Output) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in key_facts(out.manifest))
    return f"<table>{cells}</table>"


def _slug(block: int, name: str) -> str:
    return f"{block}_{re.sub(r'[^A-Za-z0-9]+', '_', name)}"


def default_destination(dirs: list[str | Path]) -> Path:
    """``A/report`` for one output, ``A/report-vs-<name of B>`` for two."""
    first = Path(dirs[0])
    return first / "report" if len(dirs) == 1 else first / f"report-vs-{Path(dirs[1]).resolve().name}"


def write_report(dirs: list[str | Path], destination: str | Path | None = None, layers: list[str] | None = None,
                 crop: int = DEFAULT_CROP) -> Path:
    """Write the PNGs and ``index.html`` for one output (or two, compared) and return the page.

    The folder is written atomically (a failed report leaves none) and replaces an earlier report
    there; any other existing directory is refused.

    Raises:
        CompressKitError: a directory is not a compresskit output, the outputs have different layers,
            or a ``layers`` spec names no pruned layer.
    """
    if not 1 <= len(dirs) <= 2:
        raise CompressKitError(f"give one output directory, or two to compare (got {len(dirs)})")
    outs = [load_output(d) for d in dirs]
    if len(outs) == 2 and _keys(outs[0]) != _keys(outs[1]):
        raise CompressKitError(f"{outs[0].path} and {outs[1].path} pruned different layers; "
                               f"compare outputs of one model")
    chosen = choose_layers(outs[0], layers)
    labels = ("A", "B")
    dest = Path(destination) if destination else default_destination(dirs)
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not (dest / "index.html").is_file())):
        raise CompressKitError(f"{dest} exists and is not a compresskit report (no index.html); choose another --out")
    sections = []
    with atomic_directory(dest, replace=True) as tmp:
        for label, out in zip(labels, outs):
            tag = f"{label.lower()}_" if len(outs) == 2 else ""
            cfg = out.manifest.get("config", {})
            sparsity = out.manifest.get("resolved", {}).get("sparsity")
            title = f"{out.path.name}: {cfg.get('metric')} {cfg.get('pattern')} {sparsity}"
            imgs = [plot_layers(out.manifest, tmp / f"{tag}layers.png", title).name]
            for block, name in chosen:
                imgs.append(plot_mask(out.weight(block, name), f"{title}  block {block} {name}",
                                      tmp / f"{tag}mask_{_slug(block, name)}.png", crop).name)
            head = f"{label}: {out.path}" if len(outs) == 2 else str(out.path)
            sections.append(f"<h2>{html.escape(head)}</h2>{_facts_table(out)}" + "".join(_img(i) for i in imgs))
        if len(outs) == 2:
            _, rows = plot_overlap(outs[0], outs[1], tmp / "overlap.png", labels)
            imgs = ["overlap.png"] + [
                plot_mask_diff(outs[0].weight(b, n), outs[1].weight(b, n), labels, f"block {b} {n}: A vs B",
                               tmp / f"diff_{_slug(b, n)}.png", crop).name for b, n in chosen]
            mean = sum(r["overlap"] for r in rows) / len(rows)
            sections.append(f"<h2>A vs B</h2><p>Mean per-layer overlap of pruned weights (pruned by both / pruned "
                            f"by either): {mean:.3f}</p>" + "".join(_img(i) for i in imgs))
            (tmp / "overlap.json").write_text(json.dumps(rows, indent=1) + "\n")
        page_title = html.escape("compresskit report: " + ", ".join(map(str, dirs)))
        (tmp / "index.html").write_text(_PAGE.format(title=page_title, body="\n".join(sections)))
    return dest / "index.html"


def _img(name: str) -> str:
    n = html.escape(name)
    return f'<figure><img src="{n}" alt="{n}"><figcaption>{n}</figcaption></figure>'


def _keys(out: Output) -> list[tuple[int, str]]:
    return [(r["block"], r["name"]) for r in out.layers]


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto}} table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:14px}} img{{max-width:100%}}
figure{{margin:1em 0}} figcaption{{font-size:12px;color:#555}}</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""
