"""Figures in README.md and the docs pages come from bench commands, never typed by hand.

Measured numbers reach the docs in two ways only: a page includes a committed bench output file
(``--8<-- "bench/results/..."``, pymdownx.snippets), or a paragraph is generated from one (the
README's main-job paragraph, by ``bench/main_job.py --readme`` from ``main-job.json``). These
tests fail when a generated paragraph or table no longer matches its record, when one of its
numbers is not in the record, or when a page carries a measurement-like number of its own.
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
REPORT_EXAMPLE = runpy.run_path(str(ROOT / "bench" / "report_example.py"))

NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?![\w.])")
# a measurement-like number: 2+ decimals, or a number of seconds/minutes/hours, or a perplexity/accuracy
FIGURE = re.compile(r"(?<![\w.])(\d+\.\d{2,}|\d+(?:\.\d+)?(?=\s*(?:s|sec|seconds?|min|minutes?|h|hours?)\b)"
                    r"|(?<=perplexity )\d+(?:\.\d+)?|(?<=accuracy )\d+(?:\.\d+)?)(?![\w.])")
NOT_FIGURES = [
    re.compile(r"arXiv[ :]\d{4}\.\d{4,5}|arxiv\.org/\w+/\d{4}\.\d{4,5}", re.I),  # paper ids
    re.compile(r"(?:≥|>=|==|<=|version )\s*\d+(?:\.\d+)+"),  # versions
    re.compile(r"\d+\.\d+\.\d+"),  # versions
    re.compile(r"^--8<-- .*$", re.M),  # included files are the bench output itself
]
ALLOWED = {  # numbers on the pages that are not our measurements, and why
    "6.92": "the GBLM paper's Wanda perplexity on LLaMA-2-7B at L=2048, cited (reference-semantics.md)",
    "6.42": "Wanda's README perplexity on LLaMA-2-7B at L=4096, cited (reference-semantics.md)",
    "0.01": "the default of the obs solver's percdamp (a setting)",
    "0.001": "the tolerance of Wanda's adaptive-threshold bisection (a setting)",
    "0.02": "the conformance check's end-to-end sparsity tolerance (a setting)",
}


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


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_hand_copied_figures(page):
    text = page.read_text()
    if page == README:
        head, rest = text.split(MAIN_JOB["BEGIN"], 1)
        text = head + rest.split(MAIN_JOB["END"], 1)[1]
    for pattern in NOT_FIGURES:
        text = pattern.sub("", text)
    found = [(text.count("\n", 0, m.start()) + 1, m.group(0)) for m in FIGURE.finditer(text)
             if m.group(0) not in ALLOWED]  # whole text: "11\nminutes" across a line break counts too
    assert not found, (f"{page.relative_to(ROOT)} has figures typed by hand {found}: include them from the bench "
                       "output (--8<-- \"bench/results/...\") or generate them (bench/main_job.py --readme); "
                       "settings and cited values go in ALLOWED with the reason")
