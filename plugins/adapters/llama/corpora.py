"""Text sources for calibration and evaluation (the window sampler is :func:`compresskit.data.sample_windows`).

A *data* string names where text comes from:

* ``handbook``: Debian Administrator's Handbook, en-US HTML paragraphs, one document per HTML
  page (Debian ``debian-handbook``; the default calibration corpus for real models);
* ``wiki`` / ``wiki-train``: Wikipedia articles inside the ``gensim`` wheel, cleaned with
  mwparserfromhell and split by article, fixed and deterministic (even dump positions are the
  evaluation half ``wiki``, odd ones ``wiki-train``); ``wiki`` is the default evaluation corpus;
* ``lee``: 300 ABC news articles in gensim's ``lee_background.cor`` (one per line);
* a local ``.txt`` file (documents separated by blank lines) or ``.jsonl`` file (``text`` field);
* ``hf:<name>[:<config>]:<split>``: a dataset from the Hugging Face hub (needs network);
* any ``text`` asset another plugin registered (``compresskit list assets``);
* ``random`` or ``None`` (calibration only): seeded uniform token ids.

Cleaned named corpora are cached as JSON lines under ``<cache>/corpora``.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

from compresskit.cache import atomic_write, cache_dir
from compresskit.data import Corpus, debian_package_version, ensure_debian_package, find_asset, package_file, sample_windows
from compresskit.errors import CompressKitError

from .cleaning import handbook_pages, wiki_articles

log = logging.getLogger(__name__)

GENSIM_PIP = "gensim==4.4.0"
WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "test/test_data/lee_background.cor"
HANDBOOK_HTML = "usr/share/doc/debian-handbook/html/en-US"
NAMED = ("handbook", "wiki", "wiki-train", "lee")
CORPUS_FORMAT = 1  # bump when cleaning changes, so stale caches are rebuilt


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
    asset = find_asset("text", data)
    if asset is not None:
        return asset.load()
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
    (docs/explanation/reference-semantics.md): ``random.Random(seed)``; per sample, draw a document uniformly until its
    tokenization (tokenizer defaults, so BOS if the tokenizer adds one) is strictly longer than
    ``seqlen``, then a start offset uniformly in ``[0, T - seqlen - 1]`` and take ``seqlen`` tokens.

    Raises:
        CompressKitError: no tokenizer, empty corpus, or no document longer than ``seqlen``.
    """
    import torch

    if data in (None, "random"):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (nsamples, seqlen), generator=g)
    if tokenizer is None:
        raise CompressKitError(f"calibration on text {data!r} needs a tokenizer; the model has none. "
                               "Load a model with a tokenizer or use --calibration random")
    corpus = load_corpus(data)
    return sample_windows(corpus, lambda doc: tokenizer(doc, verbose=False)["input_ids"], nsamples, seqlen, seed)


# -- named corpora ---------------------------------------------------------------------------

def _named(name: str) -> Corpus:
    if name == "handbook":
        root = ensure_debian_package("debian-handbook")
        version = debian_package_version(root)
        docs = _cached_docs(f"handbook-{version}", lambda: handbook_pages(root / HANDBOOK_HTML))
        meta = {"origin": "Debian package debian-handbook", "package_file": version,
                "unit": "one document per HTML page (paragraphs >= 12 words, deduplicated)",
                "license": "GPL-2+ or CC-BY-SA-3.0 (Debian Administrator's Handbook)"}
        return Corpus(name, docs, meta)
    if name == "lee":
        path, version = package_file("gensim", LEE_FILE, GENSIM_PIP)
        docs = _cached_docs(f"lee-{version}", lambda: [ln.strip() for ln in path.read_text().splitlines() if ln.strip()])
        meta = {"origin": f"gensim {version} wheel: {LEE_FILE}", "unit": "one news article per line",
                "license": "unclear (ABC news articles in gensim test data): calibration/tests only, do not redistribute"}
        return Corpus(name, docs, meta)
    path, version = package_file("gensim", WIKI_FILE, GENSIM_PIP)
    articles = _cached_docs(f"wiki-articles-{version}", lambda: wiki_articles(path))
    half = 0 if name == "wiki" else 1
    picked = [a for k, a in enumerate(articles) if k % 2 == half]
    meta = {"origin": f"gensim {version} wheel: {WIKI_FILE}",
            "split": f"{'evaluation' if half == 0 else 'training'} half: articles at {'even' if half == 0 else 'odd'} "
                     f"positions of {len(articles)} cleaned articles in dump order",
            "titles": [a["title"] for a in picked],
            "license": "Wikipedia content, CC BY-SA 3.0 / GFDL: attribute to Wikipedia (article titles kept)"}
    return Corpus(name, [a["text"] for a in picked], meta)


def _cached_docs(key: str, build: Callable[[], list]) -> list:
    return _read_or_build(str(cache_dir() / "corpora" / f"{key}.v{CORPUS_FORMAT}.jsonl"), build)


def _read_or_build(path_str: str, build: Callable[[], list]) -> list:
    path = Path(path_str)
    if path.is_file():
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    log.info("cleaning corpus once into %s", path)
    items = build()
    text = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as exc:
        log.warning("could not cache the cleaned corpus in %s (%s); using it uncached (point COMPRESSKIT_CACHE "
                    "at a writable directory to keep it)", path, exc)
    return items


# -- files and the hub ---------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _local(path: str, mtime_ns: int, size: int) -> Corpus:
    kind = Path(path).suffix.lower()
    if kind not in (".txt", ".jsonl"):
        raise CompressKitError(f"{path}: unsupported file type {kind!r}; use .txt (documents separated by blank "
                               "lines) or .jsonl (one JSON object with a 'text' field per line)")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CompressKitError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); give a plain text "
                               "file") from None
    if kind == ".txt":
        docs = [t.strip() for t in text.split("\n\n") if t.strip()]
    else:
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CompressKitError(f"{path} line {n} is not valid JSON ({exc.msg}); write one object per line "
                                       'such as {"text": "..."}') from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise CompressKitError(f"{path} line {n} has no string 'text' field; write objects such as "
                                       '{"text": "..."}')
            docs.append(obj["text"].strip())
        docs = [d for d in docs if d]
    if not docs:
        raise CompressKitError(f"{path} holds no text; give a file with at least one non-empty document")
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
