"""Text cleaning for the packaged corpora: Debian handbook HTML paragraphs, Wikipedia wikitext."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

from compresskit.errors import MissingDependencyError


class ParaParser(HTMLParser):
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


def handbook_pages(html_dir: Path) -> list[str]:
    seen: set[str] = set()
    pages = []
    for f in sorted(html_dir.glob("*.html")):
        parser = ParaParser()
        parser.feed(f.read_text(encoding="utf-8"))
        keep = [p for p in parser.paras if len(p.split()) >= 12 and not (p in seen or seen.add(p))]
        if keep:
            pages.append("\n\n".join(keep))
    return pages


def wiki_articles(path: Path) -> list[dict]:
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
