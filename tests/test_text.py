"""Text sources and the reference calibration sampler (offline, tiny files)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from compresskit import data
from compresskit_plugins.adapters.llama import cleaning
from compresskit_plugins.adapters.llama import corpora as text
from compresskit.errors import CompressKitError
from compresskit_plugins.adapters.llama.sources import byte_tokenizer


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def txt(tmp_path):
    p = tmp_path / "corpus.txt"
    docs = ["alpha " * 60, "short doc", "gamma delta\nsecond line of gamma " * 10, "x" * 40]
    p.write_text("\n\n".join(d.strip() for d in docs) + "\n")
    return p, [d.strip() for d in docs]


def test_txt_documents_are_blank_line_separated(txt):
    path, docs = txt
    corpus = text.load_corpus(str(path))
    assert corpus.documents == docs
    info = text.describe(str(path))
    assert info["documents"] == 4 and info["source"] == "corpus.txt"
    assert len(info["sha256"]) == 64 and info["sha256"] == corpus.fingerprint()


def test_jsonl_text_field(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(["one two", "three", " "])))
    assert text.load_corpus(str(p)).documents == ["one two", "three"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(CompressKitError, match="'text' field"):
        text.load_corpus(str(bad))


def test_unknown_source_names_the_choices(tmp_path):
    with pytest.raises(CompressKitError, match="handbook"):
        text.load_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(CompressKitError, match="hf:<name>"):
        text.load_corpus("hf:onlyname")


def test_random_ids_are_seeded():
    a = text.calibration_token_ids(None, "random", 3, 8, 0, 100)
    assert a.shape == (3, 8) and a.dtype == torch.long and int(a.max()) < 100
    assert torch.equal(a, text.calibration_token_ids(None, None, 3, 8, 0, 100))
    assert not torch.equal(a, text.calibration_token_ids(None, None, 3, 8, 1, 100))


def _reference_sampler(docs, encode, nsamples, seqlen, seed):
    """The SPEC 1.4 loop written out plainly, for comparison."""
    rng = random.Random(seed)
    rows = []
    for _ in range(nsamples):
        while True:
            ids = encode(docs[rng.randint(0, len(docs) - 1)])
            if len(ids) > seqlen:
                break
        i = rng.randint(0, len(ids) - seqlen - 1)
        rows.append(ids[i:i + seqlen])
    return torch.tensor(rows)


def test_sampler_matches_reference_and_is_deterministic(txt):
    path, docs = txt
    tok = byte_tokenizer()
    got = text.calibration_token_ids(tok, str(path), 6, 32, 0, 256)
    encode = lambda d: tok(d)["input_ids"]  # noqa: E731
    assert torch.equal(got, _reference_sampler(docs, encode, 6, 32, 0))
    assert torch.equal(got, text.calibration_token_ids(tok, str(path), 6, 32, 0, 256))
    assert not torch.equal(got, text.calibration_token_ids(tok, str(path), 6, 32, 1, 256))


def test_sampler_windows_lie_inside_long_documents(txt):
    path, docs = txt
    tok = byte_tokenizer()
    seqlen = 45  # only the two documents longer than 45 bytes can be drawn ("x"*40 is not)
    encoded = [tok(d)["input_ids"] for d in docs]
    out = text.calibration_token_ids(tok, str(path), 20, seqlen, 3, 256)
    for row in out.tolist():
        hits = [e for e in encoded if len(e) > seqlen and any(e[i:i + seqlen] == row for i in range(len(e) - seqlen))]
        assert hits, "a sample is not a window of a document longer than seqlen"


def test_last_token_is_never_sampled():
    corpus = text.Corpus("t", ["ab"], {})
    out = text.sample_windows(corpus, lambda d: [10, 11, 12], 50, 2, 0)
    assert {tuple(r) for r in out.tolist()} == {(10, 11)}  # offset in [0, T - L - 1] = [0, 0]


def test_too_short_corpus_raises_with_fix(txt):
    path, _ = txt
    with pytest.raises(CompressKitError, match=r"corpus\.txt.*use --seqlen \d+ or less"):
        text.calibration_token_ids(byte_tokenizer(), str(path), 2, 10_000, 0, 256)
    with pytest.raises(CompressKitError, match="no documents"):
        data.sample_windows(data.Corpus("empty", [], {}), list, 1, 4, 0)


def test_handbook_html_paragraphs():
    parser = cleaning.ParaParser()
    parser.feed('<div class="para">Keep <code>this</code> text<pre>not this</pre> here.<img src="x"/></div>'
                '<p class="title">Also a paragraph</p><div>outside</div><table><tr><td>t</td></tr></table>')
    assert parser.paras == ["Keep this text here.", "Also a paragraph"]


def test_wikitext_cleaning_drops_markup():
    mw = pytest.importorskip("mwparserfromhell")
    body = ("{{Infobox|x=1}}\n'''Albedo''' is the [[reflection|diffuse reflection]] of solar radiation out of "
            "the total.<ref>cite</ref>\n== History ==\n* short item here only\n[[Category:Physics]]\n"
            "* a list item that is long enough to be kept here ok\nTiny line.")
    assert cleaning._clean_wikitext(mw, body) == (
        "Albedo is the diffuse reflection of solar radiation out of the total.\n"
        "a list item that is long enough to be kept here ok")


@pytest.mark.slow
def test_named_corpora_are_real(monkeypatch):
    monkeypatch.delenv("COMPRESSKIT_CACHE")  # reuse the developer's real cache (cleaning wiki takes ~20 s)
    wiki, train = text.describe("wiki"), text.describe("wiki-train")
    assert wiki["documents"] > 40 and train["documents"] > 40
    assert not set(wiki["titles"]) & set(train["titles"])
    assert text.describe("handbook")["documents"] > 100
