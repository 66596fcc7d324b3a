"""Figures in README.md and the docs pages come from bench commands, never typed by hand.

Measured numbers reach the docs by including a committed bench output file (``--8<--
"bench/results/..."``, pymdownx.snippets), by generation from one (the README's main-job
paragraph, ``bench/main_job.py --readme`` from ``main-job.json``), or by quoting a committed file
the same page names. These tests fail when a generated paragraph or table no longer matches its
record, when an example output is no longer what its command prints, or when a measurement-like
number on a page (two or more decimals, a time, a perplexity or accuracy) is in none of the bench
files that page cites and is not a setting or cited value listed in ``ALLOWED`` with its reason.
"""

from __future__ import annotations

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
# a measurement-like number: 2+ decimals, or a number of seconds/minutes/hours, or a perplexity/accuracy
FIGURE = re.compile(r"(?<![\w.])(\d+\.\d{2,}|\d+(?:\.\d+)?(?=\s*(?:s|sec|seconds?|min|minutes?|h|hours?)\b)"
                    r"|(?<=perplexity )\d+(?:\.\d+)?|(?<=accuracy )\d+(?:\.\d+)?)(?![\w.])")
NOT_FIGURES = [
    re.compile(r"arXiv[ :]\d{4}\.\d{4,5}|arxiv\.org/\w+/\d{4}\.\d{4,5}", re.I),  # paper ids
    re.compile(r"(?:≥|≤|>=|==|<=|<|>|~=|version |v)\s*\d+(?:\.\d+)+"),  # versions
    re.compile(r"\d+\.\d+\.\d+"),  # versions
    re.compile(r"^--8<-- .*$", re.M),  # included files are the bench output itself
]
ALLOWED = {  # numbers on a page that are not our measurements, and why
    "docs/explanation/reference-semantics.md": {
        "6.92": "the GBLM paper's Wanda perplexity on LLaMA-2-7B at L=2048, cited",
        "6.42": "Wanda's README perplexity on LLaMA-2-7B at L=4096, cited",
        "0.01": "the default of the obs solver's percdamp (a setting)",
        "0.001": "the tolerance of Wanda's adaptive-threshold bisection (a setting)"},
    "docs/explanation/algorithms.md": {"0.01": "the default of the obs solver's percdamp (a setting)"},
    "docs/howto/errors.md": {
        "0.005": "a --sparsity value in a quoted example error message (an input, not a result)",
        "0.01": "a --sparsity value in a quoted example warning (an input, not a result)",
        "0.0017": "the overall sparsity that --sparsity 0.01 gives on random:tiny's 64-wide rows, quoted from the "
                  "warning tests/test_hostile.py checks (arithmetic: floor(64 x 0.01) = 0 in most rows)"},
    "docs/explanation/owl.md": {
        "0.08": "OWL's lambda: the paper's and our default (a setting)",
        "0.01": "the reference code's floor for a non-positive target (a setting of the reference)"},
    "docs/explanation/selection.md": {v: "a value in an example --select sweep (an input)" for v in ("0.04", "0.08", "0.12")},
    "docs/explanation/wandapp.md": {"0.01": "the default of the obs solver's percdamp (a setting)"},
    "docs/explanation/swaps.md": {"0.01": "the default of the obs solver's percdamp (a setting)"},
    "docs/benchmarks.md": {"1.45": "the --max-memory budget (GB) of bench/streaming.py's big run (a setting)"},
    "docs/howto/large-models.md": {"1.45": "the --max-memory budget (GB) of bench/streaming.py's big run (a setting)"},
    "docs/plugins/testing.md": {"0.02": "the conformance check's end-to-end sparsity tolerance (a setting)"},
    "docs/howto/export.md": {
        **{v: "a compressed-tensors version" for v in ("0.13", "0.14", "0.15", "0.20")},
        "2.125": "bytes per float32 weight of the bitmask format at 50 %: 0.5 x 4 + 1/8 (arithmetic)",
        "1.125": "bytes per bfloat16 weight of the bitmask format at 50 %: 0.5 x 2 + 1/8 (arithmetic)"},
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


def test_main_job_table_is_the_record():
    assert (RESULTS / "main-job.md").read_text() == MAIN_JOB["table"](_record()), \
        "bench/results/main-job.md differs from main-job.json: rerun scripts/main-job"


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


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_figures_come_from_the_bench_output_their_page_cites(page):
    """A measurement-like number on a page must appear in a bench/results file the page names or includes."""
    rel = str(page.relative_to(ROOT))
    text = page.read_text()
    sources = [RESULTS / name for name in sorted(set(CITED.findall(text)))]
    missing = [s.name for s in sources if not s.is_file()]
    assert not missing, f"{rel} cites bench/results files that are not committed: {missing}"
    values = [v for s in sources for v in _file_values(s)]
    if page == README:
        head, rest = text.split(MAIN_JOB["BEGIN"], 1)
        text = head + rest.split(MAIN_JOB["END"], 1)[1]  # checked against its record above
    for pattern in NOT_FIGURES:
        text = pattern.sub("", text)
    allowed = ALLOWED.get(rel, {})
    found = [(text.count("\n", 0, m.start()) + 1, m.group(0)) for m in FIGURE.finditer(text)
             if m.group(0) not in allowed and not any(_shown(m.group(0), v) for v in values)]
    # whole text: "11\nminutes" across a line break counts too
    assert not found, (f"{rel} has figures that are in none of the bench outputs it cites "
                       f"({', '.join(s.name for s in sources) or 'none'}): {found}; include them from the bench "
                       "output (--8<-- \"bench/results/...\"), generate them (bench/main_job.py --readme), or cite "
                       "the committed file they come from; settings and cited literature go in ALLOWED with the reason")
