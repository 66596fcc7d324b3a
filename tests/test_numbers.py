"""Figures in README.md and the docs pages come from bench commands, never typed by hand.

Measured numbers reach the docs by including a committed bench output file (``--8<--
"bench/results/..."``, pymdownx.snippets), by generation from its record (the README's main-job
paragraph, ``bench/main_job.py --readme`` from ``main-job.json``), or by restating a value of a
record with a marker right after the figure (and its unit) that names the record and the key::

    shrinks to 0.63<!-- export.json: {sizes.0.ct_fp32_mb} / {sizes.0.dense_fp32_mb} --> of the dense one
    it brings SparseGPT to 135.66<!-- recipes.json: {rows.[recipe=sparsegpt + ro (selected lr), setting=2:4].ppl} -->

(an HTML comment: invisible on the built site). The test reads the key and checks that the figure
is its value as shown (rounded to the figure's places; ``100 * {key}`` for a percentage). Every other
measurement-like figure — any decimal, a percentage, a ratio ("4.6×", "8 times"), a time or size,
a perplexity or accuracy — fails unless it is a setting or a cited/arithmetic value listed in
``SETTINGS``/``ALLOWED`` with the reason; plain integers (counts, settings) are not checked.
Every ``bench/results/*.md`` is listed with how it is tied to its JSON record (rendered from it
and compared here, written beside it, or without one), and cited third-party figures live in
``bench/results/published.json``, apart from our measurements.
"""

from __future__ import annotations

import ast
import json
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
RESULTS = ROOT / "bench" / "results"
MAIN_JOB = runpy.run_path(str(ROOT / "bench" / "main_job.py"))
REPORT_EXAMPLE = runpy.run_path(str(ROOT / "bench" / "docs_examples.py"))

NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?![\w.])")
# a measurement-like number: any decimal (one or more places), a percentage, a ratio ("4.6×", "8 times"),
# a time or a size, or the number after perplexity/accuracy; plain integers (counts, settings) are not
UNIT = r"(?:%|×|x\b|times\b|s\b|sec\b|seconds?\b|min\b|minutes?\b|h\b|hours?\b|ms\b|[KMGT]i?B\b|points?\b)"
FIGURE = re.compile(r"(?<![\w.])(\d+\.\d+|\d+(?=\s*" + UNIT + r")"
                    r"|(?<=perplexity )\d+(?:\.\d+)?|(?<=accuracy )\d+(?:\.\d+)?)(?![\w.])")
# a figure's source: right after it (and its unit), <!-- FILE.json: EXPR --> names the bench/results record
# and the key it restates (see _evaluate); the test checks the figure is that value, shown rounded
MARK = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(\s*" + UNIT + r")?<!--\s*([\w.-]+\.json)\s*:\s*(.+?)\s*-->")
NOT_FIGURES = [
    re.compile(r"arXiv[ :]\d{4}\.\d{4,5}|arxiv\.org/\w+/\d{4}\.\d{4,5}", re.I),  # paper ids
    re.compile(r"(?:≥|≤|>=|==|<=|<|>|~=|version |v)\s*\d+(?:\.\d+)+"),  # versions
    re.compile(r"\d+\.\d+\.\d+"),  # versions
    re.compile(r"^--8<-- .*$", re.M),  # included files are the bench output itself
    re.compile(r"\b[A-Za-z]+-\d+(?:\.\d+)+"),  # license and product names: Apache-2.0, CC-BY-SA-3.0
    re.compile(r"--[\w-]+[ =]\d+(?:\.\d+)?|\b[\w.]+=\d+(?:\.\d+)?|\"\w+\": \d+(?:\.\d+)?"),  # option values (inputs)
]
ALLOWED = {  # numbers on a page that are not our measurements, and why
    "docs/explanation/selection.md": {v: "a value in an example --select sweep (an input)" for v in ("0.04", "0.08", "0.12")},
    "docs/explanation/wandapp.md": {"0.01": "the default of the obs solver's percdamp (a setting)"},
    "docs/benchmarks.md": {"1.45": "the --max-memory budget (GB) of bench/streaming.py's big run (a setting)",
                           "1.1": "the parameter count (B) of bench/streaming.py's `1b` preset (a setting)",
                           "32": "the calibration default, 32 x 256 tokens (a setting)",
                           "0.08": "OWL's lambda: the paper's and our default (a setting)",
                           "128": "the papers' calibration, 128 x 2048 tokens (a setting)"},
    "docs/howto/large-models.md": {
        "1.45": "the --max-memory budget (GB) of bench/streaming.py's big run (a setting)",
        "1.1": "the parameter count (B) of bench/streaming.py's `1b` preset (a setting)",
        "90": "the share of available memory the automatic streaming choice allows (a setting)",
        "64": "the piece size (MB) a streamed shard is written in (a setting)",
        "1": "about 1 GB of the CUDA build of torch's runtime (an estimate the memory model uses, a setting) "
             "or one sample/shard (a count)",
        "5": "the --max-memory slack, 5 % (a setting)",
        "3": "the checkpoint is 3x the budget: 4.4 / 1.45 (arithmetic)",
        "32": "glibc's largest adaptive mmap threshold, 32 MB (a property of glibc)"},
    "docs/explanation/algorithms.md": {"0.01": "the default of the obs solver's percdamp (a setting)",
                                       "10": "the dampening factor of a Cholesky retry (a setting)",
                                       "128": "the reference calibration, 128 x 2048 tokens (a setting)"},
    "docs/howto/distributed.md": {"128": "the papers' calibration, 128 x 2048 tokens (a setting)",
                                  "2": "a bound in prose: less than 2x faster with 2 ranks (not a figure of a record)"},
    "docs/howto/nm.md": {"25": "1 weight in 4 is 25 % (arithmetic)"},
    "docs/howto/per-layer-sparsity.md": {v: "a value of an example --sparsity-map (an input)" for v in ("0.3", "0.6")},
    "docs/howto/recipes.md": {v: "a value in an example recipe (an input)" for v in ("0.4", "0.6")},
    "docs/howto/report.md": {"0.7": "an example target: 64 weights at 0.7 prune 44 (arithmetic)"},
    "docs/explanation/reference-semantics.md": {
        "6.92": "the GBLM paper's Wanda perplexity on LLaMA-2-7B at L=2048, cited",
        "6.42": "Wanda's README perplexity on LLaMA-2-7B at L=4096, cited",
        "0.01": "the default of the obs solver's percdamp (a setting)",
        "0.001": "the tolerance of Wanda's adaptive-threshold bisection (a setting)",
        "0.4": "the start of Wanda's adaptive bisection (a setting of the reference)",
        "0.8": "the upper end of Wanda's adaptive bisection (a setting of the reference)"},
    "README.md": {"128": "the papers' calibration, 128 x 2048 tokens (--paper, a setting)"},
    "docs/explanation/owl.md": {
        "0.08": "OWL's lambda: the paper's and our default (a setting)",
        "0.01": "the reference code's floor for a non-positive target (a setting of the reference)",
        "0.2": "a bound by arithmetic: flooring per row loses under one weight in 576 (0.17 %)",
        "60": "the sparsity of the paper's gains (cited)"},
    "docs/howto/zeroshot.md": {
        "25": "the chance level of a four-choice task (arithmetic)",
        "62.2": "BoolQ's majority-class rate on its validation split (2,033 of 3,270: a property of the data)",
        "4": "four tasks (a count)",
        "3.5": "one standard error of an accuracy near 50 % over 200 documents: sqrt(0.25 / 200) (arithmetic)",
        "0.4": "an lm-eval version (0.4)"},
    "docs/howto/errors.md": {
        "0.005": "a --sparsity value in a quoted example error message (an input, not a result)",
        "0.01": "a --sparsity value in a quoted example warning (an input, not a result)",
        "0.0017": "the overall sparsity that --sparsity 0.01 gives on random:tiny's 64-wide rows, quoted from the "
                  "warning tests/test_hostile.py checks (arithmetic: floor(64 x 0.01) = 0 in most rows)",
        "0.3": "restates bench/results/checks.md (0.33-0.54 %), a bench output without a JSON record (NO_RECORD)",
        "3": "restates bench/results/checks.md (2.90 %), a bench output without a JSON record (NO_RECORD)",
        "5": "the free-space margin of the disk check, 5 % (a setting)",
        "90": "the share of a layer's target under which a sparsity map's rounding is warned about (a setting)",
        "16": "the free-space margin of the disk check, 16 MiB (a setting)"},
    "docs/plugins/testing.md": {"75": "a probe sparsity of check_pattern, 25/50/75 % (a setting)","0.02": "the conformance check's end-to-end slack for Wanda's adaptive rule (a setting)",
                                "0.001": "the adaptive rule's bisection tolerance (a setting)",
                                "0.002": "check_pattern's slack for adaptive and third-party groups (a setting)"},
    "docs/howto/gpu.md": {
        "128": "the papers' calibration, 128 x 2048 tokens (a setting)",
        **{v: "an estimate in the memory table, from the model's shapes (arithmetic)"
           for v in ("12.6", "24.2", "4.0", "5.0", "8.0", "24.1", "47.3", "1.5", "24", "38", "0.4", "386")},
        "26": "the published GBLM-Pruner memory on LLaMA-7B (cited), also our target for gblm (a setting)",
        "1": "about 1 GiB of the CUDA runtime (an estimate)",
        "2.11": "a torch version (2.11)",
        **{v: "a target of issue 23 (a setting)" for v in ("25", "120", "180", "16", "99.9")},
        "0.2": "the release 0.2 (a version)",
        "211": "the cap named in gpu-sparsegpt.json's error text (the run's time limit, a setting)",
        **{v: "an estimate of compresskit.engine.gradplan's memory model at 7B/13B/70B (arithmetic; "
              "tests/test_gradient_groups.py checks the 7B plan)"
           for v in ("11.9", "2.3", "18.0", "3.0", "63.6", "6.9", "48.5", "39.0", "89.5", "74.5", "23.0", "136",
                     "39", "12.55", "24.12", "11.86", "48.53", "2.30", "38.98", "12.06", "26.92", "8.12", "22.98")},
        "40": "a GPU memory budget of 40 GiB in the plan table (a setting)",
        "95": "the share of free CUDA memory the gradient plan budgets, gradplan.FREE_SHARE (a setting)",
        **{v: "a constant of the activation formula (arithmetic)" for v in ("4", "3", "2")}},
    "docs/explanation/swaps.md": {"0.01": "the default of the obs solver's percdamp (a setting)",
                                  "0.1": "the default of the admm solver's percdamp (a setting)"},
    "docs/explanation/admm.md": {"0.1": "the default of the admm solver's percdamp (a setting of the reference)",
                                 "1.0": "the default of the admm solver's rho (a setting of the reference)",
                                 "3": "iters / 3: the arithmetic of the update against SparseGPT's sweep (arithmetic)"},
    "docs/howto/export.md": {
        **{v: "a compressed-tensors version" for v in ("0.13", "0.14", "0.15", "0.20")},
        "2.125": "bytes per float32 weight of the bitmask format at 50 %: 0.5 x 4 + 1/8 (arithmetic)",
        "1.125": "bytes per bfloat16 weight of the bitmask format at 50 %: 0.5 x 2 + 1/8 (arithmetic)",
        "53": "2.125 / 4 bytes of a float32 weight (arithmetic)",
        "56": "1.125 / 2 bytes of a bfloat16 weight (arithmetic)",
        "90": "a rule of thumb for when general sparse kernels win (not our measurement)"},
}
SETTINGS = {  # values that are settings on every page (inputs, not results), and why
    "0.5": "the default --sparsity (a setting)",
    "50": "50 % sparsity, the default target (a setting)",
    "60": "60 % sparsity, a target of the benchmarks (a setting)",
    "70": "70 % sparsity, a target of the benchmarks (a setting)",
    "0.0": "a weight value or an input (zero)",
}
CITED = re.compile(r"bench/results/([\w.-]+\.(?:md|json|txt|toml))")


def _record() -> dict:
    return json.loads((RESULTS / "main-job.json").read_text())


def _values(obj) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in _values(x)]
    if isinstance(obj, list):
        return [v for x in obj for v in _values(x)]
    return []


def _shown(token: str, value: float) -> bool:
    """``token`` is how ``value`` reads when rounded to the token's precision (or to 4 significant digits)."""
    decimals = len(token.split(".")[1]) if "." in token else 0
    return round(value, decimals) == float(token) or f"{value:.4g}" == token


def test_readme_paragraph_is_generated_from_the_committed_record():
    text = README.read_text()
    assert MAIN_JOB["readme_text"](_record(), text) == text, \
        "README.md's main-job paragraph differs from bench/results/main-job.json: run bench/main_job.py --readme"


def test_every_number_in_the_readme_paragraph_is_in_the_record():
    rec = _record()
    block = README.read_text().split(MAIN_JOB["BEGIN"], 1)[1].split(MAIN_JOB["END"], 1)[0]
    block = block.replace(rec["date"], "").replace("main-job.json", "")
    values = _values(rec)
    tokens = NUMBER.findall(block)
    assert len(tokens) >= 8, block
    for token in tokens:
        assert any(_shown(token, v) for v in values), f"README figure {token} is not in bench/results/main-job.json"


# every bench/results/*.md, and how it is tied to its record
RENDERED = {  # page: (bench script, its render function, the JSON record it renders)
    "main-job.md": ("bench/main_job.py", "table", "main-job.json"),
    "streaming.md": ("bench/streaming.py", "table", "streaming.json"),
    "zeroshot.md": ("bench/zeroshot.py", "markdown", "zeroshot.json"),
    "gpu.md": ("bench/gpu.py", "page", "gpu.json"),
    "gpu-sparsegpt.md": ("bench/gpu.py", "page", "gpu-sparsegpt.json"),
    "gpu-rehearsal.md": ("bench/gpu.py", "page", "gpu-rehearsal.json"),
    "best-rerun.md": ("bench/best_rerun.py", "page", "best-rerun.json"),
    "best.md": ("bench/best.py", "page", "best-rows.json"),
    "gradrest.md": ("bench/gradrest.py", "render", "gradrest.json"),
    "distributed.md": ("bench/distributed.py", "render", "distributed.json"),
    "export.md": ("bench/export.py", "render", "export.json"),
    "recipes.md": ("bench/recipes.py", "render", "recipes.json"),
    "results.md": ("bench/run.py", "render", "results.json"),
    "vit.md": ("bench/vit.py", "markdown", "vit.json"),
    "vit_seed1.md": ("bench/vit.py", "markdown", "vit_seed1.json"),
    "vit_tuxpaint.md": ("bench/vit.py", "markdown", "vit_tuxpaint.json"),
    "checks.md": ("bench/checks.py", "render", "checks.json"),
    "gradients.md": ("bench/gradients.py", "render", "gradients.json"),
}
NO_RECORD: dict[str, str] = {}  # bench outputs without a JSON record (none left)


def test_every_results_page_is_accounted_for():
    pages = {p.name for p in RESULTS.glob("*.md")}
    listed = set(RENDERED) | set(NO_RECORD)
    assert pages == listed, (f"bench/results pages not listed in RENDERED/NO_RECORD: {pages - listed}; "
                             f"listed but absent: {listed - pages}")


@pytest.mark.parametrize("page", sorted(RENDERED))
def test_results_page_is_the_rendering_of_its_record(page):
    script, fn, record = RENDERED[page]
    render = runpy.run_path(str(ROOT / script))[fn]
    assert (RESULTS / page).read_text() == render(json.loads((RESULTS / record).read_text())), \
        f"bench/results/{page} is not the rendering of {record}: rerun {script} (or render it from the record)"


def test_cited_figures_live_apart_from_our_measurements():
    """Model-card scores are in bench/results/published.json, with their source, not in a record of ours."""
    published = json.loads((RESULTS / "published.json").read_text())
    assert published["source"] and "not measured" in published["what"]
    for record in RESULTS.glob("*.json"):
        if record.name != "published.json":
            assert "published" not in json.loads(record.read_text()), f"{record.name} holds cited figures"


def test_report_example_is_what_its_command_prints(monkeypatch, tmp_path):
    """The docs' example summary and recipe: same command, same numbers (only the seconds may differ)."""
    from click.testing import CliRunner

    from compresskit.cli import cli

    committed = (RESULTS / "report-example.txt").read_text().splitlines()
    assert committed[0] == "$ compresskit " + " ".join(REPORT_EXAMPLE["ARGS"])
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(cli, REPORT_EXAMPLE["ARGS"], catch_exceptions=False).stdout.splitlines()

    def timeless(lines):  # drop the seconds column and the "in 2.7s" of the total
        return [re.sub(r"\s+\d+\.\d+$", "", re.sub(r" in \d+\.\d+s$", "", line)) for line in lines]

    assert timeless(out) == timeless(committed[1:])
    recipe = CliRunner().invoke(cli, ["recipe", "example"], catch_exceptions=False).stdout

    def settings(text):  # the header names the compresskit version: compare what follows it
        return [line for line in text.splitlines() if not line.startswith("# compresskit recipe")]

    assert settings(recipe) == settings((RESULTS / "recipe-example.toml").read_text())


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _file_values(path: Path) -> list[float]:
    text = path.read_text()
    values = [float(t) for t in NUMBER.findall(text)]
    if path.suffix == ".json":
        values += _values(json.loads(text))
    return values


def _path(obj, path: str) -> list:
    """Values at a dotted ``path``: ``a.0.b`` indexes lists by number, ``*`` takes every item,
    ``[recipe=wanda, setting=70%]`` the list items whose fields read so (``!=``: do not),
    ``'key with spaces'`` is quoted."""
    values = [obj]
    for part in re.findall(r"'[^']*'|\[[^\]]*\]|[^.]+", path):
        nxt = []
        if part.startswith("["):
            conds = [re.match(r"\s*([^!=]+?)\s*(!?=)\s*(.*?)\s*$", c).groups() for c in part[1:-1].split(",")]
            nxt = [item for v in values for item in v
                   if all((str(item.get(k)) == x) == (op == "=") for k, op, x in conds)]
            if not nxt:
                raise KeyError(part)
            values = nxt
            continue
        part = part.strip("'")
        for v in values:
            if part == "*":
                nxt += list(v.values()) if isinstance(v, dict) else list(v)
            elif isinstance(v, list):
                nxt.append(v[int(part)])
            else:
                nxt.append(v[part])
        values = nxt
    return values


SAFE = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.USub, ast.Call,
        ast.Name, ast.Load, ast.Constant)


def _evaluate(record, expr: str) -> list[float]:
    """An arithmetic ``expr`` over ``{path}`` values of ``record`` (see ``_path``; a path of several
    values is an array, item by item), numbers, ``+ - * /`` and ``min``/``max``; e.g.
    ``{sizes.0.ct_fp32_mb} / {sizes.0.dense_fp32_mb}`` or ``max({rows.*.a} / {rows.*.b})``."""
    import numpy as np

    names = {"min": np.min, "max": np.max}

    def value(m: re.Match) -> str:
        names[f"v{len(names)}"] = np.array([float(v) for v in _path(record, m.group(1))])
        return f"v{len(names) - 1}"

    code = re.sub(r"\{([^{}]+)\}", value, expr)
    tree = ast.parse(code, mode="eval")
    bad = [type(n).__name__ for n in ast.walk(tree) if not isinstance(n, SAFE)]
    if bad:
        raise ValueError(f"not allowed in a marker: {bad}")
    return [float(v) for v in np.atleast_1d(eval(compile(tree, "marker", "eval"), {"__builtins__": {}}, names))]


def _marked(text: str) -> tuple[str, list[str]]:
    """Check every marked figure against its record; the text without them, and the mismatches."""
    bad = []
    for m in MARK.finditer(text):
        token, file, expr = m.group(1), m.group(3), m.group(4)
        path = RESULTS / file
        try:
            values = _evaluate(json.loads(path.read_text()), expr)
        except (OSError, KeyError, IndexError, ValueError, TypeError) as exc:
            bad.append(f"{token} <!-- {file}: {expr} -->: no such record/key ({type(exc).__name__}: {exc})")
            continue
        if len(values) != 1 or not _shown(token, values[0]):
            bad.append(f"{token} is not {file}: {expr} = {values}")
    return MARK.sub(" ", text), bad


def _unsourced(rel: str, text: str) -> list[str]:
    """Measurement-like figures of a page that are neither marked with their record nor allowed."""
    if rel == "README.md":
        head, rest = text.split(MAIN_JOB["BEGIN"], 1)
        text = head + rest.split(MAIN_JOB["END"], 1)[1]  # checked against its record above
    text, bad = _marked(text)
    for pattern in NOT_FIGURES:
        text = pattern.sub("", text)
    allowed = {**SETTINGS, **ALLOWED.get(rel, {})}
    bad += [f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}" for m in FIGURE.finditer(text)
            if m.group(0) not in allowed]
    return bad


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_figure_is_its_records_value_or_a_setting(page):
    """A measurement-like figure on a page is included from a bench output (--8<--), generated from
    its record, or marked with the record and key it restates; settings and cited values are listed."""
    rel = str(page.relative_to(ROOT))
    text = page.read_text()
    sources = [RESULTS / name for name in sorted(set(CITED.findall(text)))]
    missing = [s.name for s in sources if not s.is_file()]
    assert not missing, f"{rel} cites bench/results files that are not committed: {missing}"
    bad = _unsourced(rel, text)
    assert not bad, (f"{rel} has figures without their source: {bad}; include them from the bench output "
                     "(--8<-- \"bench/results/...\"), generate them, or mark each with the record and key it "
                     "restates (12.3<!-- file.json: {key.0.name} -->); settings and cited literature go in "
                     "ALLOWED with the reason")


# a page with one figure changed must fail: the three kinds the loose check let through
@pytest.mark.parametrize("page, right, wrong", [
    ("docs/howto/export.md", "0.66<!--", "0.67<!--"),  # one decimal place more or less: a wrong ratio
    ("docs/howto/export.md", "(53 %)", "(54 %)"),  # a percentage
    ("docs/howto/export.md", "4.6<!--", "4.5<!--"),  # an "N times" range end
    ("docs/benchmarks.md", "63.00<!--", "63.10<!--"),
])
def test_a_wrong_figure_fails(page, right, wrong):
    text = (ROOT / page).read_text()
    assert text.count(right) == 1, f"{page} no longer has {right!r}: pick another figure for this test"
    assert not _unsourced(page, text)
    assert _unsourced(page, text.replace(right, wrong)), f"{page}: {wrong!r} passed"


@pytest.mark.parametrize("figure", ["12.4 s", "37.5 %", "4.7×", "3 times", "63.9"])
def test_an_unmarked_figure_fails(figure):
    assert _unsourced("docs/howto/nm.md", f"2:4 pruning took {figure} here.\n")
    assert not _unsourced("docs/howto/nm.md", "2:4 pruning at `--sparsity 0.5` here.\n")
