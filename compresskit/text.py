"""Text sources for calibration and evaluation, and the reference calibration sampler.

A *data* string names where text comes from:

* ``handbook``: Debian Administrator's Handbook, en-US HTML paragraphs, one document per HTML
  page (Debian ``debian-handbook``; the default calibration corpus for real models);
* ``wiki`` / ``wiki-train``: Wikipedia articles inside the ``gensim`` wheel, cleaned with
  mwparserfromhell and split by article, fixed and deterministic (even dump positions are the
  evaluation half ``wiki``, odd ones ``wiki-train``); ``wiki`` is the default evaluation corpus;
* ``lee``: 300 ABC news articles in gensim's ``lee_background.cor`` (one per line);
* a local ``.txt`` file (documents separated by blank lines) or ``.jsonl`` file (``text`` field);
* ``hf:<name>[:<config>]:<split>``: a dataset from the Hugging Face hub (needs network);
* ``random`` or ``None`` (calibration only): seeded uniform token ids.

Cleaned named corpora are cached as JSON lines under ``<cache>/corpora``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import random
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable

import torch

from compresskit import assets
from compresskit.errors import CompressKitError, MissingDependencyError

log = logging.getLogger(__name__)

GENSIM_PIP = "gensim==4.4.0"
WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "test/test_data/lee_background.cor"
HANDBOOK_HTML = "usr/share/doc/debian-handbook/html/en-US"
NAMED = ("handbook", "wiki", "wiki-train", "lee")
CORPUS_FORMAT = 1  # bump when cleaning changes, so stale caches are rebuilt


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A list of cleaned documents plus where they came from."""

    name: str
    documents: list[str]
    meta: dict[str, Any]

    def fingerprint(self) -> str:
        """sha256 of the cleaned text (documents joined by blank lines)."""
        return hashlib.sha256("\n\n".join(self.documents).encode("utf-8")).hexdigest()


def load_corpus(data: str) -> Corpus:
    """Resolve a data string (see module docstring) to a :class:`Corpus`.

    Raises:
        CompressKitError: unknown name, missing or empty file.
        MissingDependencyError: the package holding a named corpus is not installed.
    """
    if data in NAMED:
        return _named(data)
    if data.startswith("hf:"):
        return _hf(data)
    path = Path(data).expanduser()
    if not path.is_file():
        raise CompressKitError(
            f"unknown text source {data!r}: not a corpus name ({', '.join(NAMED)}), not an existing .txt/.jsonl "
            f"file and not 'hf:<name>[:<config>]:<split>'; pass one of those"
        )
    st = path.stat()
    return _local(str(path.resolve()), st.st_mtime_ns, st.st_size)


def describe(data: str | None) -> dict:
    """Provenance of a data source: name, origin, document count, sha256 fingerprint, license."""
    if data in (None, "random"):
        return {"source": "random", "note": "seeded uniform random token ids (no text)"}
    corpus = load_corpus(data)
    return {"source": corpus.name, **corpus.meta, "documents": len(corpus.documents),
            "characters": sum(map(len, corpus.documents)), "sha256": corpus.fingerprint()}


def calibration_token_ids(tokenizer, data: str | None, nsamples: int, seqlen: int, seed: int, vocab_size: int) -> torch.Tensor:
    """``[nsamples, seqlen]`` calibration token ids.

    ``random``/``None`` gives seeded uniform ids. Text corpora use the reference C4 sampler
    (SPEC 1.4): ``random.Random(seed)``; per sample, draw a document uniformly until its
    tokenization (tokenizer defaults, so BOS if the tokenizer adds one) is strictly longer than
    ``seqlen``, then a start offset uniformly in ``[0, T - seqlen - 1]`` and take ``seqlen`` tokens.

    Raises:
        CompressKitError: no tokenizer, empty corpus, or no document longer than ``seqlen``.
    """
    if data in (None, "random"):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (nsamples, seqlen), generator=g)
    if tokenizer is None:
        raise CompressKitError(f"calibration on text {data!r} needs a tokenizer; the model has none. "
                               "Load a model with a tokenizer or use --calibration random")
    corpus = load_corpus(data)
    return sample_windows(corpus, lambda doc: tokenizer(doc, verbose=False)["input_ids"], nsamples, seqlen, seed)


def sample_windows(corpus: Corpus, encode: Callable[[str], list[int]], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The reference C4 sampler over ``corpus`` with a token encoder (pure apart from ``encode``)."""
    docs = corpus.documents
    if not docs:
        raise CompressKitError(f"corpus {corpus.name!r} has no documents; give a corpus with text")
    rng = random.Random(seed)
    encoded: dict[int, list[int]] = {}
    out = torch.empty(nsamples, seqlen, dtype=torch.long)
    for n in range(nsamples):
        misses = 0
        while True:
            i = rng.randint(0, len(docs) - 1)
            if i not in encoded:
                encoded[i] = encode(docs[i])
            if len(encoded[i]) > seqlen:
                break
            misses += 1
            if misses == 2 * len(docs):  # maybe nothing qualifies: check every document once
                _require_long_document(corpus, encoded, encode, seqlen)
        ids = encoded[i]
        start = rng.randint(0, len(ids) - seqlen - 1)
        out[n] = torch.tensor(ids[start:start + seqlen])
    usable = sum(len(v) for v in encoded.values() if len(v) > seqlen)
    if usable < nsamples * seqlen:
        log.warning("corpus %s: %d samples x %d tokens overlap heavily (sampled documents hold %d tokens)",
                    corpus.name, nsamples, seqlen, usable)
    return out


def _require_long_document(corpus: Corpus, encoded: dict, encode: Callable, seqlen: int) -> None:
    for i, doc in enumerate(corpus.documents):
        if i not in encoded:
            encoded[i] = encode(doc)
    longest = max(len(v) for v in encoded.values())
    if longest <= seqlen:
        raise CompressKitError(
            f"corpus {corpus.name!r}: no document is longer than seqlen={seqlen} tokens (longest has {longest}); "
            f"use a smaller --seqlen (< {longest}) or a corpus with longer documents"
        )


# -- named corpora ---------------------------------------------------------------------------

def _named(name: str) -> Corpus:
    if name == "handbook":
        root = assets.ensure_debian_package("debian-handbook")
        version = assets.debian_package_version(root)
        docs = _cached_docs(f"handbook-{version}", lambda: _handbook_pages(root / HANDBOOK_HTML))
        meta = {"origin": "Debian package debian-handbook", "package_file": version,
                "unit": "one document per HTML page (paragraphs >= 12 words, deduplicated)",
                "license": "GPL-2+ or CC-BY-SA-3.0 (Debian Administrator's Handbook)"}
        return Corpus(name, docs, meta)
    if name == "lee":
        path, version = assets.package_file("gensim", LEE_FILE, GENSIM_PIP)
        docs = _cached_docs(f"lee-{version}", lambda: [ln.strip() for ln in path.read_text().splitlines() if ln.strip()])
        meta = {"origin": f"gensim {version} wheel: {LEE_FILE}", "unit": "one news article per line",
                "license": "unclear (ABC news articles in gensim test data): calibration/tests only, do not redistribute"}
        return Corpus(name, docs, meta)
    path, version = assets.package_file("gensim", WIKI_FILE, GENSIM_PIP)
    articles = _cached_docs(f"wiki-articles-{version}", lambda: _wiki_articles(path))
    half = 0 if name == "wiki" else 1
    picked = [a for k, a in enumerate(articles) if k % 2 == half]
    meta = {"origin": f"gensim {version} wheel: {WIKI_FILE}",
            "split": f"{'evaluation' if half == 0 else 'training'} half: articles at {'even' if half == 0 else 'odd'} "
                     f"positions of {len(articles)} cleaned articles in dump order",
            "titles": [a["title"] for a in picked],
            "license": "Wikipedia content, CC BY-SA 3.0 / GFDL: attribute to Wikipedia (article titles kept)"}
    return Corpus(name, [a["text"] for a in picked], meta)


def _cached_docs(key: str, build: Callable[[], list]) -> list:
    return _read_or_build(str(assets.cache_dir() / "corpora" / f"{key}.v{CORPUS_FORMAT}.jsonl"), build)


def _read_or_build(path_str: str, build: Callable[[], list]) -> list:
    path = Path(path_str)
    if not path.is_file():
        log.info("cleaning corpus once into %s", path)
        items = build()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items), encoding="utf-8")
        os.replace(tmp, path)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


class _ParaParser(HTMLParser):
    """Collects the text of ``<p>`` and ``<div class="para">`` elements, skipping pre/table/script."""

    SKIP = {"pre", "table", "script", "style"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paras: list[str] = []
        self._stack: list[str] = []  # open tags since the outermost paragraph opened
        self._skip = 0
        self._buf: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._skip += 1
        is_para = tag == "p" or (tag == "div" and "para" in (dict(attrs).get("class") or "").split())
        if self._stack or is_para:
            self._stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.SKIP and self._skip:
            self._skip -= 1
        if self._stack and tag in self._stack:
            while self._stack and self._stack.pop() != tag:
                pass
            if not self._stack:
                self.paras.append(" ".join("".join(self._buf).split()))
                self._buf = []

    def handle_data(self, data):
        if self._stack and not self._skip:
            self._buf.append(data)


def _handbook_pages(html_dir: Path) -> list[str]:
    seen: set[str] = set()
    pages = []
    for f in sorted(html_dir.glob("*.html")):
        parser = _ParaParser()
        parser.feed(f.read_text(encoding="utf-8"))
        keep = [p for p in parser.paras if len(p.split()) >= 12 and not (p in seen or seen.add(p))]
        if keep:
            pages.append("\n\n".join(keep))
    return pages


def _wiki_articles(path: Path) -> list[dict]:
    import bz2
    import xml.etree.ElementTree as ET

    try:
        import mwparserfromhell as mw
    except ImportError as exc:
        raise MissingDependencyError("cleaning Wikipedia text needs mwparserfromhell: pip install mwparserfromhell") from exc
    articles = []
    for _, el in ET.iterparse(bz2.open(path)):
        if not el.tag.endswith("}page"):
            continue
        title = el.findtext("{*}title") or ""
        ns = el.findtext("{*}ns") or "0"
        body = el.findtext("{*}revision/{*}text") or ""
        el.clear()
        if ns != "0" or body.lower().startswith("#redirect") or "(disambiguation)" in title or title.startswith("List of"):
            continue
        text = _clean_wikitext(mw, body)
        if len(text.split()) >= 50:
            articles.append({"title": title, "text": text})
    return articles


_LINK_DROP = re.compile(r"^\s*(file|image|category|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)


def _clean_wikitext(mw, body: str) -> str:
    code = mw.parse(body)
    drop = list(code.filter_templates(recursive=False))
    drop += code.filter_tags(matches=lambda n: str(n.tag).lower() in {"ref", "table", "gallery", "math"})
    drop += code.filter_wikilinks(matches=lambda n: bool(_LINK_DROP.match(str(n.title))))
    for node in drop:
        try:
            code.remove(node)
        except ValueError:  # already gone with a removed parent
            pass
    lines = []
    for raw in str(code).splitlines():
        s = raw.strip()
        if not s or s.startswith(("=", "{|", "|", "!")):
            continue
        plain = mw.parse(s).strip_code(normalize=True, collapse=True).strip()
        if len(plain.split()) >= (8 if s[0] in "*#:;" else 6):
            lines.append(" ".join(plain.split()))
    return "\n".join(lines)


# -- files and the hub ---------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _local(path: str, mtime_ns: int, size: int) -> Corpus:
    import datasets

    kind = Path(path).suffix.lower()
    cache = str(assets.cache_dir() / "hf-datasets")
    if kind == ".jsonl":
        ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache)
        if "text" not in ds.column_names:
            raise CompressKitError(f"{path}: JSON lines need a 'text' field (found {ds.column_names}); add one")
    elif kind == ".txt":
        ds = datasets.load_dataset("text", data_files=path, sample_by="paragraph", split="train", cache_dir=cache)
    else:
        raise CompressKitError(f"{path}: unsupported file type {kind!r}; use .txt (blank-line separated) or .jsonl")
    docs = [t.strip() for t in ds["text"] if t and t.strip()]
    meta = {"origin": f"local file {path}", "format": kind[1:], "license": "as given by the user"}
    return Corpus(Path(path).name, docs, meta)


def _hf(data: str) -> Corpus:
    import datasets

    parts = data.split(":")[1:]
    if len(parts) not in (2, 3) or not all(parts):
        raise CompressKitError(f"bad HF dataset spec {data!r}; use hf:<name>[:<config>]:<split>, e.g. hf:wikitext:wikitext-2-raw-v1:test")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # the hub raises many types (connection, missing config, ...)
        raise CompressKitError(f"could not load {data!r} from the hub ({exc}); check the name and network, "
                               "or pass a local .txt/.jsonl file") from exc
    column = "text" if "text" in ds.column_names else next(
        (c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"), None)
    if column is None:
        raise CompressKitError(f"{data!r} has no text column (columns: {ds.column_names}); give a dataset with 'text'")
    docs = [t for t in ds[column] if t and t.strip()]
    return Corpus(data, docs, {"origin": f"Hugging Face dataset {name} config={config} split={split}",
                               "column": column, "license": "see the dataset card"})
